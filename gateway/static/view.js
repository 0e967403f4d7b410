// The dashboard's live parts: my drive, my rentals and runs. Everything goes through the same
// /v1 API a shell uses, with the person's own token (shown on this page already); nothing here
// changes state with the session cookie, so these calls need no CSRF token.
"use strict";
const app = document.getElementById("app");
const exportLine = document.getElementById("export-line");
const TOKEN = exportLine ? exportLine.textContent.match(/KGPU_API_TOKEN=(\S+)/)[1] : null;
const QUOTA = Number(app.dataset.quota);
let cwd = "";  // the folder shown, "" or "a/b/"

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function size(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function encodePath(path) { return path.split("/").map(encodeURIComponent).join("/"); }
async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + TOKEN, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const reply = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await reply.text();
  const data = text ? JSON.parse(text) : {};
  if (!reply.ok) throw new Error(data.message || reply.statusText);
  return data;
}

// --- the token --------------------------------------------------------------------------------
document.getElementById("copy-export")?.addEventListener("click", async (event) => {
  try {
    await navigator.clipboard.writeText(exportLine.textContent);
    event.target.textContent = "Copied";
  } catch (error) {
    const range = document.createRange();
    range.selectNodeContents(exportLine);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    event.target.textContent = "Selected: press Ctrl+C";
  }
});

// --- my drive ---------------------------------------------------------------------------------
async function loadDrive() {
  const data = await api("GET", "/v1/files?prefix=" + encodeURIComponent(cwd));
  const used = data.quota.used_bytes, quota = data.quota.quota_bytes || QUOTA;
  document.getElementById("quota-used").style.width = Math.min(100, (100 * used) / quota) + "%";
  document.getElementById("quota-text").textContent = `${size(used)} of ${size(quota)} used`;
  const folders = new Map(), files = [];
  for (const file of data.files) {
    const rest = file.path.slice(cwd.length);
    const cut = rest.indexOf("/");
    if (cut >= 0) {
      const name = rest.slice(0, cut);
      folders.set(name, (folders.get(name) || 0) + file.size);
    } else if (rest) files.push({ ...file, name: rest });
  }
  const rows = [];
  for (const [name, bytes] of [...folders].sort()) {
    rows.push(`<tr><td>📁 <a data-folder="${esc(cwd + name + "/")}">${esc(name)}/</a></td><td class="num">${size(bytes)}</td><td></td>` +
      `<td class="actions"><button data-delete="${esc(cwd + name + "/")}" class="danger">Delete</button></td></tr>`);
  }
  for (const file of files.sort((a, b) => a.name.localeCompare(b.name))) {
    rows.push(`<tr><td><a data-download="${esc(file.path)}">${esc(file.name)}</a></td><td class="num">${size(file.size)}</td>` +
      `<td class="muted">${esc((file.last_modified || "").replace("T", " ").slice(0, 19))}</td>` +
      `<td class="actions"><button data-delete="${esc(file.path)}" class="danger">Delete</button></td></tr>`);
  }
  document.getElementById("files").innerHTML = rows.join("") || `<tr><td colspan="4" class="muted">This folder is empty.</td></tr>`;
  const parts = cwd.split("/").filter(Boolean);
  let crumbs = `<a data-folder="">my drive</a>`, path = "";
  for (const part of parts) { path += part + "/"; crumbs += ` / <a data-folder="${esc(path)}">${esc(part)}</a>`; }
  document.getElementById("crumbs").innerHTML = crumbs;
}

document.getElementById("drive-card").addEventListener("click", async (event) => {
  const target = event.target;
  if (target.dataset.folder !== undefined) { cwd = target.dataset.folder; loadDrive(); }
  else if (target.dataset.download) {
    // The API answers with a short-lived presigned URL: the token never goes into a URL.
    const found = await api("GET", "/v1/files/" + encodePath(target.dataset.download) + "?json=1");
    location.assign(found.url);
  } else if (target.dataset.delete) {
    if (!confirm("Delete " + target.dataset.delete + "?")) return;
    await api("DELETE", "/v1/files/" + encodePath(target.dataset.delete));
    loadDrive();
  }
});

function upload(file) {
  const row = document.createElement("div");
  row.className = "upload";
  row.innerHTML = `<span>${esc(file.name)}</span><progress max="100" value="0"></progress><span class="pct">0%</span>`;
  document.getElementById("uploads").append(row);
  const bar = row.querySelector("progress"), pct = row.querySelector(".pct");
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", "/v1/files/" + encodePath(cwd + file.name));
    xhr.setRequestHeader("Authorization", "Bearer " + TOKEN);
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      bar.value = Math.round((100 * e.loaded) / e.total);
      pct.textContent = bar.value + "%";
    };
    xhr.onload = () => {
      if (xhr.status < 300) { bar.value = 100; pct.textContent = "done"; row.dataset.done = "1"; }
      else { pct.textContent = "failed: " + (JSON.parse(xhr.responseText || "{}").message || xhr.status); row.dataset.done = "error"; }
      resolve();
    };
    xhr.onerror = () => { pct.textContent = "failed: connection lost"; row.dataset.done = "error"; resolve(); };
    xhr.send(file);
  });
}
document.getElementById("upload-input").addEventListener("change", async (event) => {
  for (const file of event.target.files) await upload(file);
  event.target.value = "";
  loadDrive();
});

// --- my shared drives (read here; uploads to them go through the API or /shared in a pod) ------
async function loadShared(org, folder) {
  const data = await api("GET", `/v1/shared/${encodeURIComponent(org)}/${encodePath(folder)}?json=1`);
  const rows = data.entries.map((e) => e.type === "dir"
    ? `<tr><td>📁 <a data-org="${esc(org)}" data-folder="${esc(e.path)}">${esc(e.name)}/</a></td><td></td><td></td></tr>`
    : `<tr><td><a data-org="${esc(org)}" data-file="${esc(e.path)}">${esc(e.name)}</a></td><td class="num">${size(e.size)}</td>` +
      `<td class="muted">${esc((e.last_modified || "").replace("T", " ").slice(0, 19))}</td></tr>`);
  document.getElementById("shared-files").innerHTML = rows.join("") || `<tr><td colspan="3" class="muted">Empty.</td></tr>`;
  let crumbs = `<a data-org="${esc(org)}" data-folder="">${esc(org)}</a>`, path = "";
  for (const part of folder.split("/").filter(Boolean)) {
    path += part + "/";
    crumbs += ` / <a data-org="${esc(org)}" data-folder="${esc(path)}">${esc(part)}</a>`;
  }
  document.getElementById("shared-crumbs").innerHTML = crumbs;
  document.getElementById("shared-browser").hidden = false;
}
document.getElementById("shared-card").addEventListener("click", async (event) => {
  const { org, folder, file } = event.target.closest("a")?.dataset || {};
  if (!org) return;
  if (file) location.assign((await api("GET", `/v1/shared/${encodeURIComponent(org)}/${encodePath(file)}?json=1`)).url);
  else loadShared(org, folder || "");
});

// --- rentals and runs -------------------------------------------------------------------------
const outputs = new Map();  // run_id -> text seen so far (kept across re-renders)

async function loadModels() {
  const data = await api("GET", "/v1/gpu-models");
  document.getElementById("gpu-model").innerHTML = data.models.map((m) =>
    `<option value="${esc(m.gpu_model)}">${esc(m.gpu_model)} (${m.gpu_total ? m.gpu_free + " free, " : "CPU only, "}${m.price_per_hour_credits} credits/h)</option>`).join("");
}

async function loadRentals() {
  const data = await api("GET", "/v1/gpus");
  document.getElementById("balance").textContent = data.credits.balance;
  const box = document.getElementById("rentals");
  if (!data.my_gpus.length) { box.innerHTML = `<p class="muted">No rentals. Rent one above.</p>`; return; }
  const parts = [];
  for (const gpu of data.my_gpus) {
    let runs = [];
    if (gpu.phase === "Running") runs = (await api("GET", "/v1/runs?gpu_id=" + encodeURIComponent(gpu.gpu_id))).runs;
    parts.push(`<div class="rental" data-gpu="${esc(gpu.gpu_id)}">
      <div class="head"><strong>${esc(gpu.name)}</strong><span class="badge ${esc(gpu.phase)} phase">${esc(gpu.phase)}</span>
        <span class="muted">${gpu.phase === "Queued" ? `queue position ${gpu.queue_position}` : `node ${esc(gpu.node)}`} · ${esc(gpu.gpu_model)}${gpu.gpu_count ? " ×" + gpu.gpu_count : ""} · ${gpu.price_per_hour_credits} credits/h · charged ${gpu.credits_charged}</span>
        <span class="grow"></span><button class="danger" data-return="${esc(gpu.gpu_id)}">Return</button></div>
      ${gpu.phase === "Running" && gpu.ready ? `<form class="row run-form" data-gpu="${esc(gpu.gpu_id)}">
        <label>Command (bash) <input name="command" size="50" required placeholder="nvidia-smi; ls /files"></label>
        <button type="submit" class="primary">Run</button></form>` : `<p class="muted">${esc(gpu.pending_reason || "starting…")}</p>`}
      <div class="runs">${runs.map((run) => `<div class="run" data-run="${esc(run.run_id)}">
        <span class="cmd">${esc(run.run_id)}</span> <span class="badge">${esc(run.phase)}</span>
        ${run.exit_code != null ? `<span class="muted">exit ${run.exit_code}</span>` : ""}
        <a data-show="${esc(run.run_id)}" data-gpu="${esc(gpu.gpu_id)}">output</a>
        <pre class="output" ${outputs.has(run.run_id) ? "" : "hidden"}>${esc(outputs.get(run.run_id) || "")}</pre></div>`).join("")}</div>
    </div>`);
  }
  box.innerHTML = parts.join("");
}

async function streamRun(gpuId, runId) {
  // NDJSON: {type: stdout|stderr, chunk} as the run writes, then {type: done, exit_code}.
  outputs.set(runId, "");
  const reply = await fetch(`/v1/runs/${encodeURIComponent(runId)}/stream?gpu_id=${encodeURIComponent(gpuId)}`,
    { headers: { Authorization: "Bearer " + TOKEN } });
  const reader = reply.body.getReader(), decoder = new TextDecoder();
  let buffered = "";
  const show = () => {
    const pre = document.querySelector(`.run[data-run="${CSS.escape(runId)}"] pre`);
    if (pre) { pre.hidden = false; pre.textContent = outputs.get(runId); pre.scrollTop = pre.scrollHeight; }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, cut); buffered = buffered.slice(cut + 1);
      if (!line.trim()) continue;
      const event = JSON.parse(line);
      if (event.type === "stdout" || event.type === "stderr") outputs.set(runId, outputs.get(runId) + event.chunk);
      if (event.type === "done") outputs.set(runId, outputs.get(runId) + `\n[exit ${event.exit_code}]`);
      show();
    }
  }
  await loadRentals();
  show();
}

document.getElementById("rent-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target), status = document.getElementById("rent-status");
  status.textContent = "renting…";
  try {
    const gpu = await api("POST", "/v1/gpus", {
      name: form.get("name"), gpu_model: form.get("gpu_model") || null, duration_hours: Number(form.get("duration_hours")),
      cpu: "1", memory: "1Gi", ephemeral_storage_gib: 1, queue: form.get("queue") === "on",
    });
    status.textContent = gpu.phase === "Queued" ? `queued ${gpu.gpu_id} (position ${gpu.queue_position})` : `rented ${gpu.gpu_id}`;
  } catch (error) { status.textContent = "could not rent: " + error.message; }
  loadRentals();
});

document.getElementById("rentals").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target, gpuId = form.dataset.gpu, command = new FormData(form).get("command");
  try {
    const run = await api("POST", "/v1/runs", { gpu_id: gpuId, command: ["bash", "-c", command], wait_seconds: 0 });
    await loadRentals();
    streamRun(gpuId, run.run_id);
  } catch (error) { document.getElementById("rent-status").textContent = "could not run: " + error.message; }
});

document.getElementById("rentals").addEventListener("click", async (event) => {
  const target = event.target;
  if (target.dataset.return) {
    if (!confirm("Return this GPU? The pod is destroyed.")) return;
    await api("DELETE", "/v1/gpus/" + encodeURIComponent(target.dataset.return));
    loadRentals();
  } else if (target.dataset.show) {
    const pre = target.parentElement.querySelector("pre");
    if (!outputs.has(target.dataset.show)) streamRun(target.dataset.gpu, target.dataset.show);
    else pre.hidden = !pre.hidden;
  }
});

// A rental starting: look again until it runs (the page shows no stale phase for long).
setInterval(() => {
  if (document.querySelector(".phase.Pending, .phase.Queued, .phase.Terminating")) loadRentals();
}, 2000);

loadDrive();
loadModels();
loadRentals();
