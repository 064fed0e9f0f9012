// Shared by the pages that poll for results: when an answer means polling cannot go on (the
// session has ended, the record is gone), say so once at the top of the page and stop.
(function () {
  "use strict";
  const reasons = {
    401: "Your session has ended, so this page no longer updates. ",
    404: "This record no longer exists (deleted, perhaps in another window), so this page no longer updates.",
  };

  window.pollingEnds = function (status) {
    const reason = reasons[status];
    if (!reason) return false;
    if (!document.getElementById("polling-ended")) {
      const notice = document.createElement("p");
      notice.id = "polling-ended";
      notice.className = "errors";
      notice.setAttribute("role", "alert");
      notice.textContent = reason;
      if (status === 401) {
        const link = document.createElement("a");
        link.href = document.body.dataset.loginUrl + "?next=" + encodeURIComponent(location.pathname + location.search);
        link.textContent = "Sign in again";
        notice.appendChild(link);
      }
      document.getElementById("main").prepend(notice);
    }
    return true;
  };
})();
