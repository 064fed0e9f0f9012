// A page left open on a shared workstation: once the sign-in has ended for want of activity
// (SESSION_IDLE_MINUTES), the page stops showing the patient data it holds; it sends no request of
// its own that the server could refuse. It asks only after that long without a key press or click
// here: someone typing a long note keeps it, and is told when they send it.
(function () {
  "use strict";
  const body = document.body;
  const idleSeconds = Number(body.dataset.idleSeconds);
  if (!body.dataset.signedInAs || !idleSeconds) return;
  let lastInput = Date.now();
  ["keydown", "pointerdown", "wheel", "touchstart"].forEach((kind) => {
    document.addEventListener(kind, () => { lastInput = Date.now(); }, { capture: true, passive: true });
  });

  function signedOut() {
    const notice = document.createElement("p");
    notice.className = "errors";
    notice.setAttribute("role", "alert");
    notice.textContent = "You were signed out after " + idleSeconds / 60 + " minutes without activity, so this "
      + "page no longer shows what it held. ";
    const link = document.createElement("a");
    link.href = body.dataset.loginUrl + "?next=" + encodeURIComponent(location.pathname + location.search);
    link.textContent = "Sign in again";
    notice.appendChild(link);
    document.getElementById("main").replaceChildren(notice);
    document.title = "Signed out · Malaria cell screening";
  }

  let asking = false;  // one question at a time: a slow answer must not pile up others
  const timer = setInterval(async () => {
    if (asking || Date.now() - lastInput < idleSeconds * 1000) return;
    asking = true;
    try {
      // The status endpoint: asking it is no activity, so it does not keep the sign-in alive.
      const answer = await fetch(body.dataset.sessionUrl, { headers: { "X-Requested-With": "XMLHttpRequest" } });
      if (answer.status !== 401) return;
    } catch (error) {
      return;  // the server unreachable: the sign-in may stand
    } finally {
      asking = false;
    }
    clearInterval(timer);
    signedOut();
  }, 30000);
})();
