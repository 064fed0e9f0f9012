// The report's Print button (a script file: the site's Content-Security-Policy allows no inline handlers).
const printButton = document.getElementById("print-report");
printButton.hidden = false;  // hidden until now: without this script it would do nothing
printButton.addEventListener("click", () => window.print());
