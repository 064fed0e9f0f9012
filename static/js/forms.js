// Shared by every page with a form: each submission carries the current CSRF token. Signing in
// again (in another tab, after the session ended) gives the browser a new one, and the copy this
// page was rendered with would be refused, with what was typed on it lost.
(function () {
  "use strict";
  window.refreshCsrfToken = function (form) {
    const field = form.querySelector("input[name=csrfmiddlewaretoken]");
    const cookie = document.cookie.split("; ").find((part) => part.startsWith("csrftoken="));  // CSRF_COOKIE_NAME
    if (field && cookie) field.value = decodeURIComponent(cookie.slice("csrftoken=".length));
  };
  // Captured on the document: before a page's own handler reads the form (upload.js sends it itself).
  document.addEventListener("submit", (event) => window.refreshCsrfToken(event.target), true);
})();
