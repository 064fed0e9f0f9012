// Keyboard shortcuts for reviewers: A agrees, D disagrees (then pick the label and press Enter).
(function () {
  "use strict";
  const form = document.getElementById("review-form");
  if (!form) return;
  document.addEventListener("keydown", (event) => {
    if (event.target.closest("textarea, input[type=text], select") || event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key.toLowerCase();
    if (key === "a") {
      form.querySelector('input[value="agree"]').checked = true;
      form.requestSubmit();
    } else if (key === "d") {
      form.querySelector('input[value="disagree"]').checked = true;
      const select = form.querySelector("select[name=corrected_label]");
      if (select.options.length === 2) select.selectedIndex = 1;
      select.focus();
    }
  });
})();
