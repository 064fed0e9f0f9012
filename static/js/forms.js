// Shared by every page with a form: each submission carries the current CSRF token. Signing in
// again (in another tab, after the session ended) gives the browser a new one, and the copy this
// page was rendered with would be refused, with what was typed on it lost.
(function () {
  "use strict";
  const name = "csrftoken=";  // Django's CSRF_COOKIE_NAME, which the settings leave as it is
  window.refreshCsrfToken = function (form) {
    const field = form.querySelector("input[name=csrfmiddlewaretoken]");
    // Another site under the same domain or a path may set a cookie of that name too: the server
    // reads the last one of its Cookie header, which lists them in document.cookie's order.
    const cookie = document.cookie.split("; ").filter((part) => part.startsWith(name)).pop();
    if (field && cookie) field.value = decodeURIComponent(cookie.slice(name.length));
  };
  // Captured on the document: before a page's own handler reads the form (upload.js sends it itself).
  document.addEventListener("submit", (event) => window.refreshCsrfToken(event.target), true);
})();
