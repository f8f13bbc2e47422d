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
          var error = new Error(data.summary || data.error || ("HTTP " + r.status));
          error.rows = data.rows || [];
          throw error;
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

  // The metadata rows to fix, in the same table the page renders without JavaScript (batches/new.html).
  function showRows(rows) {
    var old = document.getElementById("csv-errors");
    if (old) old.remove();
    if (!rows.length) return;
    var table = document.createElement("table");
    table.className = "list"; table.id = "csv-errors";
    table.createCaption().textContent = "Metadata rows that need fixing";
    var head = table.createTHead().insertRow();
    ["Row", "image_id", "Problem"].forEach(function (h) { var th = document.createElement("th"); th.scope = "col"; th.textContent = h; head.appendChild(th); });
    var body = table.createTBody();
    rows.forEach(function (x) {
      var tr = body.insertRow();
      [x.row, x.image_id, x.error].forEach(function (v) { tr.insertCell().textContent = v; });
    });
    var box = document.createElement("div");
    box.className = "table-scroll"; box.tabIndex = 0; box.setAttribute("role", "region"); box.setAttribute("aria-label", "Metadata rows that need fixing");
    box.id = "csv-errors-box"; box.appendChild(table);
    var previous = document.getElementById("csv-errors-box");
    if (previous) previous.remove();
    form.insertAdjacentElement("afterend", box);
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
      // Every other file is named to the server without its bytes: the batch lists it as skipped
      // ("not a .jpg, .jpeg or .png file") instead of dropping it silently.
      var skipped = all.filter(function (f) { return images.indexOf(f) < 0 && f !== metadata; });
      var status = document.getElementById("upload-status"), bar = document.getElementById("upload-progress");
      var text = document.getElementById("upload-text"), button = document.getElementById("batch-submit");
      if (!images.length && !archive) { status.hidden = false; text.textContent = "Choose a folder with images or a .zip file."; return; }
      status.hidden = false; button.disabled = true;
      var create = new FormData();
      create.append("name", form.elements.name.value);
      if (metadata) create.append("metadata", metadata, metadata.name);
      if (archive) create.append("archive", archive, archive.name);
      if (images.length || skipped.length) create.append("expected_files", String(images.length + skipped.length));
      text.textContent = archive ? "Uploading and checking the archive…" : "Creating the batch…";
      post(form.action, csrf, create).then(function (batch) {
        var parts = chunks(images, perRequest), sent = 0;
        if (skipped.length) parts.push(skipped.map(function (f) { return { name: f.name, webkitRelativePath: f.webkitRelativePath, skipped: true }; }));
        bar.max = images.length + skipped.length || 1;
        function next(i) {
          if (i >= parts.length) { window.location.href = batch.url; return; }
          var body = new FormData();
          parts[i].forEach(function (f) { body.append("images", f.skipped ? new Blob([]) : f, f.webkitRelativePath || f.name); });
          return post(batch.files_url, csrf, body).then(function () {
            sent += parts[i].length; bar.value = sent;
            text.textContent = "Sent " + sent + " of " + (images.length + skipped.length) + " files";
            return next(i + 1);
          });
        }
        return next(0);
      }).catch(function (err) {
        text.textContent = "Upload stopped: " + err.message; button.disabled = false;
        showRows(err.rows || []);
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
          ["done", "failed", "running", "queued", "pending"].forEach(function (k) { document.getElementById("count-" + k).textContent = c[k]; });
          document.getElementById("count-total").textContent = p.total;
          document.getElementById("count-duplicates").textContent = p.duplicates;
          document.getElementById("count-ood").textContent = p.out_of_distribution;
          ["done", "running", "queued", "failed"].forEach(function (k) { document.getElementById("maps-" + k).textContent = p.explanations[k]; });
          var table = document.getElementById("batch-errors"), body = table.tBodies[0];
          body.textContent = "";
          p.errors.slice(0, 500).forEach(function (e) {
            var tr = body.insertRow(); tr.insertCell().textContent = e.file; tr.insertCell().textContent = e.error;
          });
          table.hidden = !p.errors.length;
          if (p.predictions_finished && !p.finished) {
            document.getElementById("batch-finished").textContent = "Predictions finished; explanation maps still being computed";
          }
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
