// Keyboard shortcuts of the review form: 1-9 pick the diagnosis, a/d agree/disagree, Enter submits,
// n skips (queue only). Keys typed into the notes field are left alone.
(function () {
  "use strict";
  var form = document.getElementById("review-form");
  if (!form) return;
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type === "text"))) return;
    var key = event.key;
    var radio = form.querySelector('input[name="diagnosis"][data-key="' + key + '"]');
    if (radio) { radio.checked = true; event.preventDefault(); return; }
    if (key === "a" || key === "d") {
      // Absent in blind review until the reviewer's own diagnosis is saved.
      var agree = form.querySelector('input[name="agrees_with_model"][value="' + (key === "a" ? "agree" : "disagree") + '"]');
      if (agree) { agree.checked = true; event.preventDefault(); }
    } else if (key === "Enter" && target.tagName !== "BUTTON") {
      event.preventDefault();
      if (form.reportValidity()) form.submit();
    } else if (key === "n") {
      var skip = document.getElementById("skip-form");
      if (skip) { event.preventDefault(); skip.submit(); }
    }
  });
})();
