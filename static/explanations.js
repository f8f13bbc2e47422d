// Explanation maps on the case page: the class selector shows that class's Grad-CAM and SHAP maps,
// the slider sets the CSS opacity of the overlay images laid over the original. When static/case.js
// polls the case status, the maps are redrawn from `explanations_html` as soon as an explanation
// appears or changes status (SHAP arrives after the prediction), keeping the chosen class and opacity.
(function () {
  "use strict";
  var box = document.getElementById("explanations");
  if (!box) return;
  var state = {}; // analysis id -> {cls, opacity}
  var signature = box.dataset.signature || "";

  function apply(panel) {
    var id = panel.dataset.analysis;
    var st = state[id] || (state[id] = {});
    var select = panel.querySelector("select.explanation-class");
    var slider = panel.querySelector("input.explanation-opacity");
    if (select) {
      if (st.cls && select.querySelector('option[value="' + st.cls + '"]')) select.value = st.cls;
      st.cls = select.value;
    }
    if (slider) {
      if (st.opacity != null) slider.value = st.opacity;
      st.opacity = slider.value;
    }
    var ask = panel.querySelector("form.explanation-request select[name=class]");
    if (ask && st.cls) ask.value = st.cls; // "compute" starts from the class on show
    panel.querySelectorAll(".explanation-row").forEach(function (row) {
      row.hidden = row.dataset.class !== st.cls;
    });
    panel.querySelectorAll("img.overlay").forEach(function (img) {
      img.style.opacity = String(Number(st.opacity) / 100);
    });
    var out = panel.querySelector(".explanation-opacity-value");
    if (out) out.textContent = st.opacity + "%";
  }

  function applyAll() {
    box.querySelectorAll(".explanations-panel").forEach(apply);
  }

  function remember(event) {
    var panel = event.target.closest(".explanations-panel");
    if (!panel) return;
    var st = state[panel.dataset.analysis] || (state[panel.dataset.analysis] = {});
    if (event.target.matches("select.explanation-class")) st.cls = event.target.value;
    else if (event.target.matches("input.explanation-opacity")) st.opacity = event.target.value;
    else return;
    apply(panel);
  }

  function signatureOf(data) {
    var parts = [];
    (data.analyses || []).forEach(function (a) {
      parts.push("a" + a.id + ":" + a.status);
      (a.explanations || []).forEach(function (e) { parts.push(e.id + ":" + e.status); });
    });
    return parts.join(",");
  }

  box.addEventListener("input", remember);
  box.addEventListener("change", remember);
  document.addEventListener("case:status", function (event) {
    var data = event.detail || {};
    if (typeof data.explanations_html !== "string") return;
    var next = signatureOf(data);
    if (next === signature) return; // unchanged: keep the images as they are (no flicker)
    signature = next;
    box.innerHTML = data.explanations_html;
    applyAll();
  });
  applyAll();
})();
