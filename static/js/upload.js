// Drag-and-drop and folder uploads with a progress bar. Without JavaScript the plain form still works.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const input = document.getElementById("id_images");
  const folder = document.getElementById("folder-picker");
  const zone = document.getElementById("dropzone");
  const list = document.getElementById("file-list");
  const bar = document.getElementById("upload-progress");
  const button = document.getElementById("upload-button");
  const maxFiles = Number(form.dataset.maxFiles);
  const maxBytes = Number(form.dataset.maxBytes);  // in bytes, as the server counts
  const maxRequestBytes = Number(form.dataset.maxRequestBytes);
  const errors = document.getElementById("client-errors");
  const status = document.getElementById("upload-status");
  const accepted = /\.(png|jpe?g|tiff?|bmp)$/i;
  let chosen = [];
  let notes = []; // the per-file status line of each chosen file
  let sending = false;
  // What only works with this script (dropping files, choosing a folder) is offered once it runs.
  form.querySelectorAll("[data-needs-script]").forEach((el) => { el.hidden = false; });
  zone.tabIndex = 0;
  zone.setAttribute("aria-label", "Cell images: drop them here, or press Enter to choose");

  // While one upload is on its way the selection stays as sent: a new one would be listed as
  // "uploaded" while the request still carries the old files.
  function lock(locked) {
    sending = locked;
    button.disabled = locked;
    input.disabled = locked;
    folder.disabled = locked;
    zone.setAttribute("aria-disabled", String(locked));
  }

  // Per-file progress from the one request's byte count: files are sent in order, so a file is
  // uploaded once the bytes sent pass its end (multipart overhead makes this slightly early).
  function showFileProgress(loaded, total) {
    const scale = total / Math.max(1, chosen.reduce((sum, file) => sum + file.size, 0));
    let end = 0;
    chosen.forEach((file, i) => {
      const start = end;
      end += file.size * scale;
      if (loaded >= end) notes[i].textContent = "uploaded";
      else if (loaded > start) notes[i].textContent = "uploading " + Math.round((100 * (loaded - start)) / (end - start)) + "%";
    });
  }

  function reason(file) {
    // macOS leaves "._cell.png" twins on USB sticks: they look like images, and the server would
    // refuse the whole batch for them.
    if (file.name.startsWith(".")) return "hidden file";
    if (!accepted.test(file.name)) return "not a PNG, JPEG, TIFF or BMP file";
    if (file.size === 0) return "empty file";
    if (file.size > maxBytes) return "larger than " + form.dataset.maxSize;
    return "";
  }

  // As the page writes its limits: a crop under half a kilobyte was "0 KB", as if it were empty.
  function sizeText(bytes) {
    if (bytes < 1024) return bytes + (bytes === 1 ? " byte" : " bytes");
    if (bytes < 1048576) return Math.round(bytes / 1024) + " KB";
    return (bytes / 1048576).toFixed(1) + " MB";
  }

  // `paths` names dropped folders' files, whose webkitRelativePath the browser leaves empty.
  function choose(files, paths) {
    if (sending) return;
    errors.hidden = true;
    chosen = [];
    notes = [];
    list.textContent = "";
    let total = 0;
    Array.from(files).forEach((file, i) => {
      const why = reason(file);
      const li = document.createElement("li");
      li.textContent = (paths && paths[i]) || file.webkitRelativePath || file.name;
      const note = document.createElement("span");
      if (why) { li.className = "rejected"; note.textContent = "skipped: " + why; }
      else if (chosen.length >= maxFiles) { li.className = "rejected"; note.textContent = "skipped: over " + maxFiles + " files"; }
      else if (total + file.size + 1024 * (chosen.length + 1) + 65536 > maxRequestBytes) { // multipart adds a little
        li.className = "rejected";
        note.textContent = "skipped: one upload takes at most " + Math.floor(maxRequestBytes / 1048576) + " MB in all; upload it next";
      }
      else { chosen.push(file); notes.push(note); total += file.size; note.textContent = sizeText(file.size); }
      li.appendChild(note);
      list.appendChild(li);
    });
    showCount();
    // The list marks what is skipped; a screen reader hears it only from this live region.
    const skipped = list.children.length - chosen.length;
    status.textContent = skipped ? counted(chosen.length) + " to upload; " + skipped + " skipped (see the list)." : "";
    // Dropped files and folders never reach the file input, whose `required` would block the submit
    // (and the message saying why none of the listed files can go).
    input.required = !list.children.length;
  }

  function showCount() {
    button.textContent = chosen.length ? "Upload and analyse " + counted(chosen.length) : "Upload and analyse";
  }

  function counted(n) {
    return n === 1 ? "1 image" : n + " images";
  }

  input.addEventListener("change", () => choose(input.files));
  // A folder or a drop replaces what the file input holds: the form must not send files no
  // longer listed.
  folder.addEventListener("change", () => { input.value = ""; choose(folder.files); });
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
    event.preventDefault();
    if (!sending) zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
  // A dropped folder arrives as one entry without its files: read them through its directory entry.
  function entryFile(entry) {
    return new Promise((resolve, reject) => entry.file(resolve, reject));
  }
  async function entryChildren(directory) {
    const reader = directory.createReader();
    const children = [];
    for (;;) { // readEntries hands over a directory's entries a batch at a time, then an empty one
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) return children;
      children.push(...batch);
    }
  }
  async function filesIn(entry) {
    if (entry.isFile) return [{ file: await entryFile(entry), path: entry.fullPath.replace(/^\//, "") }];
    const nested = await Promise.all((await entryChildren(entry)).map(filesIn));
    return nested.flat();
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (sending) return;
    input.value = "";
    // The entries must be taken now: the drop's data is gone once this handler returns.
    const entries = Array.from(event.dataTransfer.items || [], (item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
    if (!entries.some((entry) => entry && entry.isDirectory)) { choose(event.dataTransfer.files); return; }
    Promise.all(entries.filter(Boolean).map(filesIn))
      .then((found) => {
        const files = found.flat().sort((a, b) => a.path.localeCompare(b.path));
        choose(files.map((f) => f.file), files.map((f) => f.path));
      })
      .catch(() => fail("The dropped folder could not be read. Choose its files with the button instead."));
  });
  // A file dropped just outside the zone would make the browser open it in place of this page,
  // losing what was typed in the form.
  ["dragover", "drop"].forEach((type) => document.addEventListener(type, (event) => {
    if (!zone.contains(event.target)) event.preventDefault();
  }));
  // The focusable drop zone opens the file chooser from the keyboard too.
  zone.addEventListener("keydown", (event) => {
    if (event.target === zone && !sending && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); input.click(); }
  });

  // `fileNote` is what each sent file's row says: "not stored", unless the server may have kept it.
  function fail(message, fileNote = "not stored") {
    if (sending) notes.forEach((note) => { note.textContent = fileNote; });
    bar.hidden = true;
    lock(false);
    status.textContent = "";
    errors.textContent = message;
    errors.hidden = false;
    errors.focus();
  }

  // The server refused some files (damaged, not images it can read): they are marked and left out,
  // the others stay chosen, so the next click sends only those; nothing of this attempt was stored.
  // Refused rows go to the top of the list, which scrolls: below its fold they went unseen.
  function refuse(refused) {
    const positions = new Set(refused.map((file) => file.position));
    const names = refused.map((file) => chosen[file.position].name);
    refused.slice().reverse().forEach((file) => {
      const name = chosen[file.position].name;
      // The server's reason starts with the file's name, which its row shows already.
      const reason = file.message.startsWith(name + ": ") ? file.message.slice(name.length + 2) : file.message;
      notes[file.position].textContent = "refused: " + reason;
      const row = notes[file.position].parentElement;
      row.className = "rejected";
      list.prepend(row);
    });
    list.scrollTop = 0;
    chosen = chosen.filter((_, i) => !positions.has(i));
    notes = notes.filter((_, i) => !positions.has(i)); // fail() marks these "not stored"
    showCount();
    const which = names.length <= 3 ? names.join(", ") : names.length + " files";
    fail(
      "Nothing was stored: " + which + " cannot be analysed (marked at the top of the list). " +
      (chosen.length ? "Upload again to send the other " + counted(chosen.length) + "." : "Choose other files.")
    );
  }

  form.addEventListener("submit", (event) => {
    if (!chosen.length) {
      if (!list.children.length) return; // nothing chosen: let the server explain what is missing
      event.preventDefault();
      fail("None of the chosen files can be uploaded: the list says why for each.");
      return;
    }
    event.preventDefault();
    let allSent = false;
    const data = new FormData(form);
    data.delete("images");
    chosen.forEach((file) => data.append("images", file, file.name));
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action || window.location.href);
    xhr.setRequestHeader("X-Requested-With", "XMLHttpRequest");
    bar.hidden = false;
    lock(true);
    status.textContent = "Uploading " + counted(chosen.length) + "…";
    xhr.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      bar.value = (100 * e.loaded) / e.total;
      showFileProgress(e.loaded, e.total);
    });
    // The server checks every image before it answers, which can take a while for a large batch.
    xhr.upload.addEventListener("load", () => {
      allSent = true;
      // Every byte is sent: the last file too, which the sum of scaled sizes may put a hair past the end.
      chosen.forEach((file, i) => { notes[i].textContent = "uploaded"; });
      status.textContent = "All files sent. The server is checking them…";
    });
    xhr.addEventListener("load", () => {
      const type = xhr.getResponseHeader("Content-Type") || "";
      if (xhr.status === 200 && type.startsWith("application/json")) {
        window.location.assign(JSON.parse(xhr.responseText).redirect);
      } else if (xhr.status < 400 && xhr.responseURL.includes(document.body.dataset.loginUrl)) {
        // The session ended before the upload: going to the sign-in page would drop the chosen files unsaid.
        fail("Your session has ended, so nothing was stored. Sign in again, then choose the files again.");
      } else if (xhr.status < 400 && xhr.responseURL && xhr.responseURL !== window.location.href) {
        window.location.assign(xhr.responseURL);
      } else if (xhr.status === 400 && type.startsWith("application/json") && JSON.parse(xhr.responseText).refused) {
        refuse(JSON.parse(xhr.responseText).refused);
      } else if (xhr.status === 403) {
        // The CSRF check (forms.js already sent the latest sign-in's token): the browser keeps no
        // cookie for this site, or the address is not the one the server is configured for.
        fail("The upload was refused (HTTP 403): this page has expired, or the browser blocks this site's "
          + "cookies. Reload the page and upload again. Nothing was stored.");
      } else if (xhr.status === 400 && type.startsWith("text/html")) {  // the form with its errors
        document.open(); document.write(xhr.responseText); document.close();
      } else if (xhr.status === 507 && type.startsWith("application/json")) {  // the server's storage is full
        fail(JSON.parse(xhr.responseText).detail + " Nothing was stored.");
      } else if (xhr.status >= 500) {
        // The server failed, or a proxy gave up waiting for it: the upload may have been stored after all.
        fail("The server did not finish the upload (HTTP " + xhr.status + "). It may have been stored: look for it "
          + "under Samples before you upload again.", "may have been stored");
      } else {
        // A refusal before the form was read (the request too large, too many requests): say why,
        // and keep the page and what was typed on it.
        let message = "The upload was refused (HTTP " + xhr.status + ").";
        try { message = JSON.parse(xhr.responseText).detail || message; } catch (error) { /* not JSON */ }
        fail(message + " Nothing was stored.");
      }
    });
    xhr.addEventListener("error", () => {
      if (allSent) {
        // The connection dropped while the server was checking the files: it may have stored them.
        fail("The connection was lost after every file was sent, so the upload may have been stored: look for it "
          + "under Samples before you upload again.", "may have been stored");
      } else {
        fail("The upload did not reach the server: check the connection, or upload fewer or smaller files at a time. "
          + "Nothing was stored.");
      }
    });
    xhr.send(data);
  });

  // Back to this page after an upload, the browser may have put the files it sent back in the
  // input: list them, so what a click would send is shown (the server refuses the same form twice).
  if (input.files.length) choose(input.files);
})();
