// The report's Print button (a script file: the site's Content-Security-Policy allows no inline handlers).
document.getElementById("print-report").addEventListener("click", () => window.print());
