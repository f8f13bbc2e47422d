// Batch upload: creates the batch (with the metadata CSV), then sends the folder's images in chunks
// (at most N files and ~16 MB per request, well under the server's form-part limit), with the
// X-CSRF-Token header; then opens the batch page, which polls its progress.
(function () {
  "use strict";
  var IMAGE = /\.(jpe?g|png)$/i;
  var CHUNK_BYTES = 16 * 1024 * 1024;

  function post(url, csrf, body) {
    return fetch(url, {
      method: "POST", body: body, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json", "X-Requested-With": "fetch" }
    }).then(function (r) {
      return r.json().catch(function () { return { error: "HTTP " + r.status }; }).then(function (data) {
        if (!r.ok) {
          var rows = (data.rows || []).slice(0, 10).map(function (x) { return "row " + x.row + ": " + x.error; });
          throw new Error((data.error || ("HTTP " + r.status)) + (rows.length ? "\n" + rows.join("\n") : ""));
        }
        return data;
      });
    });
  }

  function chunks(files, perRequest) {
    var out = [], current = [], bytes = 0;
    files.forEach(function (f) {
      if (current.length && (current.length >= perRequest || bytes + f.size > CHUNK_BYTES)) {
        out.push(current); current = []; bytes = 0;
      }
      current.push(f); bytes += f.size;
    });
    if (current.length) out.push(current);
    return out;
  }

  var form = document.getElementById("batch-form");
  if (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var csrf = form.dataset.csrf, perRequest = parseInt(form.dataset.perRequest, 10) || 50;
      var all = Array.prototype.slice.call(document.getElementById("folder-input").files || []);
      var images = all.filter(function (f) { return IMAGE.test(f.name) && f.name.charAt(0) !== "."; });
      var archive = (document.getElementById("archive-input").files || [])[0];
      var metadata = (document.getElementById("metadata-input").files || [])[0];
      if (!metadata) {
        var csvs = all.filter(function (f) { return /\.csv$/i.test(f.name); });
        if (csvs.length === 1) metadata = csvs[0];
      }
      var status = document.getElementById("upload-status"), bar = document.getElementById("upload-progress");
      var text = document.getElementById("upload-text"), button = document.getElementById("batch-submit");
      if (!images.length && !archive) { status.hidden = false; text.textContent = "Choose a folder with images or a .zip file."; return; }
      status.hidden = false; button.disabled = true;
      var create = new FormData();
      create.append("name", form.elements.name.value);
      if (metadata) create.append("metadata", metadata, metadata.name);
      if (archive) create.append("archive", archive, archive.name);
      if (images.length) create.append("expected_files", String(images.length));
      text.textContent = archive ? "Uploading and checking the archive…" : "Creating the batch…";
      post(form.action, csrf, create).then(function (batch) {
        var parts = chunks(images, perRequest), sent = 0;
        bar.max = images.length || 1;
        function next(i) {
          if (i >= parts.length) { window.location.href = batch.url; return; }
          var body = new FormData();
          parts[i].forEach(function (f) { body.append("images", f, f.webkitRelativePath || f.name); });
          return post(batch.files_url, csrf, body).then(function () {
            sent += parts[i].length; bar.value = sent;
            text.textContent = "Sent " + sent + " of " + images.length + " files";
            return next(i + 1);
          });
        }
        return next(0);
      }).catch(function (err) {
        text.textContent = "Upload stopped: " + err.message; button.disabled = false;
      });
    });
  }

  var box = document.getElementById("batch-status");
  if (box && box.dataset.finished !== "true") {
    var delay = 1000;
    var poll = function () {
      fetch(box.dataset.progressUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
        .then(function (p) {
          var c = p.counts, total = Math.max(p.total, p.expected || 0) || 1;
          var bar = document.getElementById("batch-progress");
          bar.max = total; bar.value = c.done + c.failed;
          ["done", "failed", "running", "queued"].forEach(function (k) { document.getElementById("count-" + k).textContent = c[k]; });
          document.getElementById("count-total").textContent = p.total;
          document.getElementById("count-duplicates").textContent = p.duplicates;
          var table = document.getElementById("batch-errors"), body = table.tBodies[0];
          body.textContent = "";
          p.errors.slice(0, 500).forEach(function (e) {
            var tr = body.insertRow(); tr.insertCell().textContent = e.file; tr.insertCell().textContent = e.error;
          });
          table.hidden = !p.errors.length;
          if (p.finished) {
            document.getElementById("batch-finished").textContent = "Finished";
            box.dataset.finished = "true";
            return;
          }
          delay = Math.min(delay * 1.2, 5000);
          setTimeout(poll, delay);
        })
        .catch(function () { delay = Math.min(delay * 2, 15000); setTimeout(poll, delay); });
    };
    setTimeout(poll, delay);
  }
})();
