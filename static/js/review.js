// Keyboard shortcuts for reviewers: A agrees, D disagrees (then pick the label and press Enter).
(function () {
  "use strict";
  // The shortcuts are offered (on the queue too) only where this script is running to handle them.
  document.querySelectorAll("[data-needs-script]").forEach((el) => { el.hidden = false; });
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
  const button = form.querySelector("button[type=submit]");
  const sessionEnded = document.getElementById("session-ended");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (submitted) return;
    submitted = true;
    button.disabled = true;
    // A review posted after the session ended would be answered with the sign-in page, and the
    // verdict and note typed here lost: ask first (the status poll does not count as activity).
    fetch(form.dataset.sessionUrl, { headers: { "X-Requested-With": "XMLHttpRequest" } })
      .then((answer) => answer.status !== 401)
      .catch(() => true)  // unreachable: the POST itself will say so
      .then((signedIn) => {
        if (signedIn) { window.refreshCsrfToken(form); form.submit(); return; }
        sessionEnded.hidden = false;
        submitted = false;
        button.disabled = false;
      });
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
      select.value = "";  // agreeing: a label chosen after D would contradict it, and the server refuse it
      form.requestSubmit();
    } else if (key === "d") {
      form.querySelector('input[value="disagree"]').checked = true;
      if (select.options.length === 2) select.selectedIndex = 1;
      select.focus();
    }
  });
})();
