// Every page: the menu button of narrow screens and the case filters' toggle. Without JavaScript the
// menu simply wraps and the filters stay open, so nothing depends on this file.
(function () {
  "use strict";
  var narrow = window.matchMedia("(max-width: 760px)");
  var toggle = document.getElementById("menu-toggle"), nav = document.getElementById("site-nav");
  if (toggle && nav) {
    var apply = function () {
      toggle.hidden = !narrow.matches;
      var open = toggle.getAttribute("aria-expanded") === "true";
      nav.classList.toggle("collapsed", narrow.matches && !open);
    };
    toggle.addEventListener("click", function () {
      toggle.setAttribute("aria-expanded", toggle.getAttribute("aria-expanded") === "true" ? "false" : "true");
      apply();
    });
    narrow.addEventListener("change", apply);
    apply();
  }
  // The 17 case filters would push the results below the fold of a phone: closed there unless in use.
  var filters = document.querySelector("details.filter-toggle");
  if (filters && narrow.matches && filters.dataset.active !== "true") filters.open = false;
})();
