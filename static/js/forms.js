// Shared by every page with a form: each submission goes once and carries the current CSRF token.
// Signing in again (in another tab, after the session ended) gives the browser a new token, and the
// copy this page was rendered with would be refused, with what was typed on it lost.
(function () {
  "use strict";
  const name = "csrftoken=";  // Django's CSRF_COOKIE_NAME, which the settings leave as it is
  window.refreshCsrfToken = function (form) {
    const field = form.querySelector("input[name=csrfmiddlewaretoken]");
    // Another site under the same domain or a path may set a cookie of that name too: the server
    // reads the last one of its Cookie header, which lists them in document.cookie's order.
    const cookie = document.cookie.split("; ").filter((part) => part.startsWith(name)).pop();
    if (field && cookie) field.value = decodeURIComponent(cookie.slice(name.length));
    // Whose page this is: the server refuses it under anyone else's sign-in (SameSignInMiddleware).
    const pageUser = document.body.dataset.signedInAs;
    if (pageUser === undefined || form.method !== "post") return;
    let owner = form.querySelector("input[name=signed_in_as]");
    if (!owner) {
      owner = Object.assign(document.createElement("input"), { type: "hidden", name: "signed_in_as" });
      form.append(owner);
    }
    owner.value = pageUser;
  };
  // Captured on the document: before a page's own handler reads the form (upload.js sends it itself).
  document.addEventListener("submit", (event) => window.refreshCsrfToken(event.target), true);
  // A second click while a form is being sent would send it again: "Issue a key" issued two keys,
  // and the page showed the one that lost. Pages that send their form themselves (upload.js,
  // review.js) have stopped the browser's own submit by now. A send stopped with Esc can be
  // repeated after a while.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (event.defaultPrevented || form.method !== "post") return;
    if (form.dataset.sending) { event.preventDefault(); return; }
    form.dataset.sending = "yes";
    setTimeout(() => { delete form.dataset.sending; }, 15000);
  });
  // A page the browser kept in memory comes back with its forms free to be sent again.
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) document.querySelectorAll("form[data-sending]").forEach((form) => { delete form.dataset.sending; });
  });
})();
