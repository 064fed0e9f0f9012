(function () {
  "use strict";
  document.querySelectorAll("[data-needs-script]").forEach((el) => { el.hidden = false; });  // "refreshes when it finishes"
  const slider = document.getElementById("opacity");
  const overlay = document.getElementById("overlay-image");
  if (slider && overlay) {
    const apply = () => {
      overlay.style.opacity = slider.value / 100;
      slider.setAttribute("aria-valuetext", slider.value + "%");
    };
    slider.addEventListener("input", apply);
    apply();
  }
  // An unfinished analysis reloads once it finishes.
  const facts = document.getElementById("analysis-facts");
  if (facts && facts.dataset.finished === "0") {
    const id = facts.dataset.analysis;
    let delay = 1000;
    const poll = async () => {
      try {
        const response = await fetch(facts.dataset.statusUrl + "?ids=" + id, { credentials: "same-origin" });
        if (window.pollingEnds(response.status)) return;
        if (response.ok) {
          const data = await response.json();
          if (!data.analyses.length && window.pollingEnds(404)) return;
          if (data.analyses[0].finished) { window.location.reload(); return; }
        }
      } catch (error) { /* retry */ }
      delay = Math.min(delay * 1.5, 10000);
      setTimeout(poll, delay);
    };
    setTimeout(poll, delay);
  }
})();
