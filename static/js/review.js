// Keyboard shortcuts for reviewers: A agrees, D disagrees (then pick the label and press Enter).
(function () {
  "use strict";
  const form = document.getElementById("review-form");
  if (!form) return;
  const select = form.querySelector("select[name=corrected_label]");
  // Enter on a <select> does not submit its form in browsers, so the label chosen after D would wait.
  select.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && select.value) { event.preventDefault(); form.requestSubmit(); }
  });
  // One verdict per page: a second key press (or click) while the first is being saved must not
  // land on the next case before its images are even on screen.
  let submitted = false;
  form.addEventListener("submit", (event) => {
    if (submitted) { event.preventDefault(); return; }
    submitted = true;
    form.querySelector("button[type=submit]").disabled = true;
  });
  // Single-key shortcuts can be switched off (WCAG 2.1.4), for speech input or a reviewer who
  // prefers clicks; the choice is remembered on this browser.
  // Where policy blocks site storage, reading it throws: the shortcuts then work, unremembered.
  const toggle = document.getElementById("shortcuts-on");
  try { toggle.checked = localStorage.getItem("review-shortcuts") !== "off"; } catch (error) { toggle.checked = true; }
  toggle.addEventListener("change", () => {
    try { localStorage.setItem("review-shortcuts", toggle.checked ? "on" : "off"); } catch (error) { /* not remembered */ }
  });
  // Shortcuts wait until the cell's images are shown: a verdict needs them to have been seen.
  let imagesShown = false;
  window.addEventListener("load", () => { imagesShown = true; });
  document.addEventListener("keydown", (event) => {
    if (event.target.closest("textarea, input[type=text], select") || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.repeat || submitted || !imagesShown || !toggle.checked) return; // a held key must not agree with case after case unseen
    const key = event.key.toLowerCase();
    if (key === "a") {
      form.querySelector('input[value="agree"]').checked = true;
      form.requestSubmit();
    } else if (key === "d") {
      form.querySelector('input[value="disagree"]').checked = true;
      if (select.options.length === 2) select.selectedIndex = 1;
      select.focus();
    }
  });
})();
