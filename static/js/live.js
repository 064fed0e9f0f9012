// Keeps the dashboard rows and the batch page current while analyses finish, without reloading.
// Polls a small JSON endpoint for unfinished items only, backing off while nothing changes.
(function () {
  "use strict";
  const progress = document.getElementById("batch-progress");
  const table = document.querySelector("[data-live-table]");
  const url = progress ? progress.dataset.statusUrl : table && table.dataset.statusUrl;
  if (!url) return;
  let delay = 1000;
  // The dashboard's rows change silently; a screen reader hears what finished here. (The batch
  // page's progress sentence is a live region of its own.)
  const announcer = document.getElementById("live-announcer");

  function announcement(items) {
    const tally = {};
    items.forEach((item) => {
      const outcome = item.status === "done" ? (item.label || "done").toLowerCase() : item.status_display.toLowerCase();
      tally[outcome] = (tally[outcome] || 0) + 1;
    });
    const first = ["parasitized", "uninfected"];  // the results before anything else, in one order
    const rank = (outcome) => (first.includes(outcome) ? first.indexOf(outcome) : first.length);
    const parts = Object.keys(tally).sort((a, b) => rank(a) - rank(b)).map((outcome) => tally[outcome] + " " + outcome);
    const borderline = items.filter((item) => item.borderline).length;
    const confirm = borderline ? " (" + borderline + " borderline, to confirm first)" : "";
    return (items.length === 1 ? "1 analysis" : items.length + " analyses") + " finished: " + parts.join(", ") + confirm + ".";
  }

  function pending() {
    return Array.from(document.querySelectorAll('[data-analysis][data-finished="0"]'));
  }

  function apply(item) {
    const el = document.querySelector('[data-analysis="' + item.id + '"]');
    if (!el) return;
    const status = el.querySelector("[data-status]");
    if (status) { status.textContent = item.status_display; status.className = "badge status-" + item.status; }
    const label = el.querySelector("[data-label]");
    if (label && item.label) { label.textContent = item.label; label.className = "badge label-" + item.label.toLowerCase(); }
    const statusNote = el.querySelector("[data-status-note]");  // the status, where a phone has no room for its column
    if (statusNote) { statusNote.textContent = " " + item.status_display; statusNote.hidden = Boolean(item.label); }
    const borderline = el.querySelector("[data-borderline]");
    if (borderline) borderline.hidden = !item.borderline;
    const probability = el.querySelector("[data-probability]");
    if (probability && item.probability_parasitized !== null) probability.textContent = score(item.probability_parasitized);
    const threshold = el.querySelector("[data-threshold]");
    if (threshold && item.decision_threshold !== null) {
      threshold.textContent = "threshold " + item.decision_threshold.toFixed(2);
      threshold.hidden = false;
    }
    const model = el.querySelector("[data-model]");
    if (model && item.model_version) model.textContent = item.model_version;
    const img = el.querySelector("img");
    if (img && item.overlay_url) img.dataset.overlay = item.overlay_url;
    if (item.probability_parasitized !== null) el.dataset.score = suspicion(item);
    el.toggleAttribute("data-parasitized", item.label === "Parasitized");  // a reviewer's correction too
    if (item.finished) el.dataset.finished = "1";
  }

  // Keeps the batch grid "most suspicious first" (cells labelled Parasitized, a reviewer's correction
  // included, before the rest), and the dashboard in the order of suspicion it was asked for, as
  // results arrive: unscored cells last either way, ties as the server orders them (the grid by
  // id, the dashboard newest first). Not while the pointer or the keyboard focus is in
  // the list: a row must not move from under a click. The order catches up when they leave.
  const grid = document.getElementById("cell-grid");
  const rows = table && table.dataset.scoreOrder ? table.tBodies[0] : null;
  const sorted = grid || rows;
  function sortByScore() {
    if (!sorted || sorted.matches(":hover") || sorted.contains(document.activeElement)) return;
    const descending = grid ? true : table.dataset.scoreOrder === "desc";
    const tie = (a, b) => (grid ? 1 : -1) * (a.dataset.analysis - b.dataset.analysis);
    const scored = (el) => el.dataset.score !== undefined;
    // The label the order asks for first (Parasitized when most suspicious first), then the other,
    // then the unscored: as the server orders them.
    const group = (el) => (!scored(el) ? 2 : el.hasAttribute("data-parasitized") === descending ? 0 : 1);
    const items = Array.from(sorted.children);
    const order = items.slice().sort((a, b) => {
      const difference = scored(a) && scored(b) ? Number(a.dataset.score) - Number(b.dataset.score) : 0;
      return group(a) - group(b) || (descending ? -difference : difference) || tie(a, b);
    });
    if (order.every((el, i) => el === items[i])) return;
    order.forEach((el) => sorted.appendChild(el));
  }
  if (sorted) {
    sorted.addEventListener("mouseleave", sortByScore);
    sorted.addEventListener("focusout", () => setTimeout(sortByScore));
  }

  // The score weighed against its own model's threshold (diagnosis.models.SUSPICION): -1 a certain
  // negative, 1 a certain positive, so two models' cells keep one order.
  function suspicion(item) {
    const threshold = item.decision_threshold === null ? 0.5 : item.decision_threshold;
    const p = item.probability_parasitized;
    if (p >= threshold) return threshold < 1 ? (p - threshold) / (1 - threshold) : 0;
    return (p - threshold) / threshold;
  }

  // Rounded down, as the templates' `score` filter does: rounded up, a score just under the
  // threshold could read as the threshold itself.
  function score(probability) {
    return (Math.floor(probability * 1000 + 1e-9) / 1000).toFixed(3);
  }

  function applyCounts(counts) {
    for (const [key, value] of Object.entries(counts)) {
      // Only what changed: the sentence is a live region, read out again on every change.
      progress.querySelectorAll('[data-count="' + key + '"]').forEach((el) => {
        if (el.textContent !== String(value)) el.textContent = value;
      });
    }
    // A cell that fails while the page is open offers the retry at once, not after a reload.
    progress.querySelector("[data-retry-block]").hidden = !counts.failed;
    const bar = document.getElementById("progress-bar");
    bar.max = counts.total; bar.value = counts.finished;
    const block = progress.querySelector("[data-parasitemia-block]");
    if (block && counts.done) {
      block.hidden = false;
      block.querySelector("[data-parasitemia]").textContent = counts.parasitized_percent;  // the server's rounding
    }
  }

  // Cells sent again after a new model was installed finish under it: from then on the batch page
  // says it holds two models' cells, and names each cell's, as a reload would.
  function nameModelsWhenMixed() {
    const note = document.getElementById("mixed-models");
    const names = Array.from(document.querySelectorAll("#cell-grid [data-model]"));
    // Of classified cells only, as the server counts them: a cell that failed names the model it failed under.
    const classified = names.filter((el) => el.closest("[data-analysis]").querySelector("[data-status].status-done"));
    const versions = new Set(classified.map((el) => el.textContent.trim()).filter(Boolean));
    if (!note || versions.size < 2) return;
    names.forEach((el) => { el.hidden = false; });
    note.querySelector("[data-model-count]").textContent = versions.size;
    note.hidden = false;
  }

  async function poll() {
    const waiting = pending();
    if (!waiting.length) return;
    const query = progress ? "" : "?ids=" + waiting.map((el) => el.dataset.analysis).join(",");
    let changed = false;
    try {
      const response = await fetch(url + query, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (window.pollingEnds(response.status)) return;
      if (response.ok) {
        const data = await response.json();
        const finished = [];
        data.analyses.forEach((item) => {
          const el = document.querySelector('[data-analysis="' + item.id + '"]');
          if (el && el.dataset.finished === "0" && item.finished) { changed = true; finished.push(item); }
          apply(item);
        });
        if (announcer && finished.length) announcer.textContent = announcement(finished);
        if (progress) { applyCounts(data.counts); nameModelsWhenMixed(); }
        sortByScore();
      }
    } catch (error) { /* network blip: try again later */ }
    delay = changed ? 1000 : Math.min(delay * 1.5, 10000);
    setTimeout(poll, delay);
  }

  // Hover or focus a batch thumbnail to see its heatmap overlay.
  document.querySelectorAll(".cell img").forEach((img) => {
    const original = img.src;
    const originalAlt = img.alt;  // the picture's text alternative changes with it, for a screen reader
    const show = () => { if (img.dataset.overlay) { img.src = img.dataset.overlay; img.alt = img.dataset.overlayAlt; } };
    const hide = () => { img.src = original; img.alt = originalAlt; };
    img.addEventListener("mouseenter", show); img.addEventListener("mouseleave", hide);
    img.parentElement.addEventListener("focus", show); img.parentElement.addEventListener("blur", hide);
  });
  setTimeout(poll, delay);
})();
