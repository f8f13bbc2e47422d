// Polls the case's JSON status until its jobs are finished and swaps in the rendered results.
(function () {
  "use strict";
  var box = document.getElementById("results");
  if (!box || box.dataset.done === "true") return;
  var url = box.dataset.statusUrl;
  var delay = 1000;
  function poll() {
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (data) {
        box.innerHTML = data.html;
        // static/explanations.js redraws the explanation maps from the same answer.
        document.dispatchEvent(new CustomEvent("case:status", { detail: data }));
        if (!data.done) {
          delay = Math.min(delay * 1.2, 5000);
          setTimeout(poll, delay);
        }
      })
      .catch(function () {
        delay = Math.min(delay * 2, 15000);
        setTimeout(poll, delay);
      });
  }
  setTimeout(poll, delay);
})();
