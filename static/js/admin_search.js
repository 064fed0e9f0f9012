// The admin's search box, where patient references are typed to search every user's records: a
// workstation is shared, and its browser must not offer them to the next user (as the site's own
// search fields do not). Django's admin loads this in the page's head, before the box exists.
document.addEventListener("DOMContentLoaded", () => {
  "use strict";
  const search = document.getElementById("searchbar");
  if (search) search.autocomplete = "off";
});
