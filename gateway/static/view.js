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

// --- copy buttons: the export line, the bastion's known_hosts line, each rental's ssh line -----
// Each sits in a .export box beside the <pre> it copies.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  const shown = button?.closest(".export")?.querySelector("pre");
  if (!shown) return;
  try {
    await navigator.clipboard.writeText(shown.textContent);
    button.textContent = "Copied";
  } catch (error) {
    const range = document.createRange();
    range.selectNodeContents(shown);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl+C";
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

// --- rentals, runs and credits ---------------------------------------------------------------
const outputs = new Map();  // run_id -> text seen so far (kept across re-renders)
const folded = new Set();   // run ids whose output the person hid
const STARTING_MS = 2000;   // a rental on its way in or out: look again soon
const LIVE_MS = 10000;      // a usable rental: its charge and runs move by the minute
let models = [];
let bastion = null;  // GET /v1/gpus's "ssh": where the SSH bastion listens; null where the server runs none
// Private keys the API minted and returned once (rent, or "Mint a new key"), by rental: kept in
// this page's memory only (never localStorage, the URL or a log) until hidden, the rental ends
// or the page goes; each with the blob: URL its Download link saves it from.
const minted = new Map();
let looks = 0, nextLook = null;  // the latest look (an older one's answer is dropped); the next one's timer

function note(text, isError) {
  const status = document.getElementById("rent-status");
  status.textContent = text;
  status.className = isError ? "error" : "muted";
}

async function loadModels() {
  models = (await api("GET", "/v1/gpu-models")).models;
  const select = document.getElementById("gpu-model"), chosen = select.value;
  select.innerHTML = models.map((m) =>
    `<option value="${esc(m.gpu_model)}">${esc(m.gpu_model)} (${m.gpu_total ? m.gpu_free + " free, " : "CPU only, "}${m.price_per_hour_credits} credits/h)</option>`).join("");
  if (models.some((m) => m.gpu_model === chosen)) select.value = chosen;
  else suggestGpuCount();
}

// As the API does when gpu_count is left out: one GPU of a GPU model, none of a CPU-only one.
function suggestGpuCount() {
  const model = models.find((m) => m.gpu_model === document.getElementById("gpu-model").value);
  document.querySelector("#rent-form input[name=gpu_count]").value = model && model.gpu_total ? 1 : 0;
}
document.getElementById("gpu-model").addEventListener("change", suggestGpuCount);

function usable(gpu) { return gpu.phase === "Running" && gpu.ready; }

function rentalHead(gpu) {
  const facts = [
    gpu.phase === "Queued" ? `queue position ${gpu.queue_position}` : `node ${esc(gpu.node)}`,
    esc(gpu.gpu_model) + (gpu.gpu_count ? " ×" + gpu.gpu_count : ""),
    esc(gpu.image),
    `${gpu.price_per_hour_credits} credits/h`,
    `charged <span class="charged">${gpu.credits_charged}</span>`,
  ];
  return `<strong>${esc(gpu.name)}</strong><span class="badge ${esc(gpu.phase)} phase">${esc(gpu.phase)}</span>
    <span class="muted">${facts.join(" · ")}</span>
    <span class="grow"></span><button class="danger" data-return="${esc(gpu.gpu_id)}">Return</button>`;
}

function rentalBody(gpu) {
  if (usable(gpu)) {
    return `<form class="row run-form" data-gpu="${esc(gpu.gpu_id)}">
      <label>Command (bash) <input name="command" size="50" required placeholder="nvidia-smi; ls /files"></label>
      <button type="submit" class="primary">Run</button></form>`;
  }
  const waiting = gpu.phase === "Terminating" ? "returning…" : "starting…";
  return `<p class="muted waiting">${esc(gpu.pending_reason || waiting)}</p>`;
}

function sshCommand(access) { return `ssh -p ${access.ssh_port} ${access.ssh_user}@${access.ssh_host}`; }

// A live rental's SSH door: the line to log in with, the pinned key's fingerprint, and a form to
// pin another public key or mint a new pair (the old key stops at once).
function rentalSsh(gpu) {
  if (!bastion || gpu.phase === "Terminating") return "";
  const id = esc(gpu.gpu_id), access = gpu.ssh_access;
  const door = access
    ? `<div class="export ssh-line"><pre>${esc(sshCommand(access))}</pre><button type="button" data-copy>Copy</button></div>
      <p class="muted">SSH key <code class="fingerprint">${esc(access.fingerprint)}</code></p>`
    : `<p class="muted">No SSH key pinned yet: pin yours or mint one.</p>`;
  return `${door}<form class="row key-form" data-gpu="${id}">
    <label>Public key <textarea name="ssh_pubkey" rows="1" cols="44" required placeholder="ssh-ed25519 AAAA… you@laptop"></textarea></label>
    <button type="submit">Pin this key</button>
    <button type="button" data-mint="${id}">Mint a new key</button></form>
    <p class="key-status"></p>`;
}

function keepMinted(gpuId, privateKey) {
  forgetMinted(gpuId);
  minted.set(gpuId, { key: privateKey, url: URL.createObjectURL(new Blob([privateKey], { type: "application/octet-stream" })) });
}
function forgetMinted(gpuId) {
  const found = minted.get(gpuId);
  if (found) URL.revokeObjectURL(found.url);
  minted.delete(gpuId);
}

function mintedHtml(gpu) {
  const found = minted.get(gpu.gpu_id);
  if (!found) return "";
  const file = "kgpu-" + gpu.gpu_id, access = gpu.ssh_access;
  const login = access ? `ssh -i ~/.ssh/${file} -p ${access.ssh_port} ${access.ssh_user}@${access.ssh_host}` : "";
  return `<p><strong>The new private key of ${esc(gpu.name)}, shown this once.</strong> kgpu keeps only its public
    half: it is not shown again, here or anywhere. Download it now and keep it to yourself.</p>
    <pre class="output private-key">${esc(found.key)}</pre>
    <div class="row"><a class="button primary" download="${esc(file)}" href="${esc(found.url)}">Download ${esc(file)}</a>
      <button type="button" data-forget="${esc(gpu.gpu_id)}">I saved it: hide it</button></div>
    <p class="muted">Then <code>mv ~/Downloads/${esc(file)} ~/.ssh/ &amp;&amp; chmod 600 ~/.ssh/${esc(file)}</code>
      (ssh refuses a key others can read)${login ? ` and <code>${esc(login)}</code>` : ""}.</p>`;
}

function runsHtml(gpu, runs) {
  return runs.map((run) => `<div class="run" data-run="${esc(run.run_id)}">
    <span class="cmd">${esc(run.run_id)}</span> <span class="badge">${esc(run.phase)}</span>
    ${run.exit_code != null ? `<span class="muted">exit ${run.exit_code}</span>` : ""}
    <a data-show="${esc(run.run_id)}" data-gpu="${esc(gpu.gpu_id)}">output</a>
    <pre class="output" ${outputs.has(run.run_id) && !folded.has(run.run_id) ? "" : "hidden"}>${esc(outputs.get(run.run_id) || "")}</pre></div>`).join("");
}

// Parts are redrawn only when what they show changed: a redraw would drop a command being typed.
const drawn = new WeakMap();  // element -> the HTML last put in it
function draw(element, html) {
  if (drawn.get(element) === html) return;
  drawn.set(element, html);
  element.innerHTML = html;
}

function cardOf(box, gpuId) {
  const found = [...box.children].find((card) => card.dataset.gpu === gpuId);
  if (found) return found;
  const card = document.createElement("div");
  card.className = "rental";
  card.dataset.gpu = gpuId;
  card.innerHTML = `<div class="head"></div><div class="body"></div><div class="ssh"></div><div class="minted"></div><div class="runs"></div>`;
  return card;
}

function renderRentals(gpus, runsOf) {
  const box = document.getElementById("rentals");
  for (const gpuId of [...minted.keys()]) if (!gpus.some((gpu) => gpu.gpu_id === gpuId)) forgetMinted(gpuId);
  if (!gpus.length) { draw(box, `<p class="muted">No rentals. Rent one above.</p>`); return; }
  drawn.delete(box);
  const cards = gpus.map((gpu) => {
    const card = cardOf(box, gpu.gpu_id);
    draw(card.querySelector(".head"), rentalHead(gpu));
    draw(card.querySelector(".body"), rentalBody(gpu));
    draw(card.querySelector(".ssh"), rentalSsh(gpu));
    const key = card.querySelector(".minted");
    draw(key, mintedHtml(gpu));
    key.hidden = !minted.has(gpu.gpu_id);
    draw(card.querySelector(".runs"), runsHtml(gpu, runsOf.get(gpu.gpu_id) || []));
    return card;
  });
  // Moving a card that is already in place would take the focus from its command field.
  if (cards.length !== box.children.length || cards.some((card, i) => box.children[i] !== card)) box.replaceChildren(...cards);
}

function chargeRow(charge) {
  return `<tr><td>${esc(charge.name)} <span class="muted">${esc(charge.rental_id)}</span></td><td>${esc(charge.gpu_model)}</td>
    <td class="num">${charge.minutes}</td><td class="num">${charge.credits}</td></tr>`;
}

function renderCredits(credits) {
  document.getElementById("balance").textContent = credits.balance;
  draw(document.getElementById("charges-list"), credits.charges.length
    ? `<table class="list" id="charges"><thead><tr><th>Rental</th><th>GPU model</th><th class="num">Minutes</th>` +
      `<th class="num">Credits</th></tr></thead><tbody>${credits.charges.map(chargeRow).join("")}</tbody></table>`
    : `<p class="muted" id="charges">Nothing charged yet.</p>`);
}

async function runsOf(gpus) {
  const found = new Map();
  for (const gpu of gpus.filter((g) => g.phase === "Running")) {
    found.set(gpu.gpu_id, (await api("GET", "/v1/runs?gpu_id=" + encodeURIComponent(gpu.gpu_id))).runs);
  }
  return found;
}

// Rentals, their runs and the credits card, looked at again while any rental is live: every
// STARTING_MS while one is on its way in or out, every LIVE_MS while they are all usable.
async function refreshRentals() {
  const look = ++looks;
  clearTimeout(nextLook);
  let again = LIVE_MS;  // also after a failed look
  try {
    const listed = await api("GET", "/v1/gpus"), gpus = listed.my_gpus;
    const [runs, credits] = await Promise.all([runsOf(gpus), api("GET", "/v1/balance")]);
    if (look !== looks) return;
    bastion = listed.ssh;
    renderRentals(gpus, runs);
    renderCredits(credits);
    again = gpus.some((gpu) => !usable(gpu)) ? STARTING_MS : gpus.length ? LIVE_MS : null;
  } catch (error) {
    if (look === looks) note("could not read your rentals: " + error.message, true);
  } finally {
    if (look === looks && again) nextLook = setTimeout(refreshRentals, again);
  }
}

async function streamRun(gpuId, runId) {
  // NDJSON: {type: stdout|stderr, chunk} as the run writes, then {type: done, exit_code}.
  outputs.set(runId, "");
  folded.delete(runId);
  const reply = await fetch(`/v1/runs/${encodeURIComponent(runId)}/stream?gpu_id=${encodeURIComponent(gpuId)}`,
    { headers: { Authorization: "Bearer " + TOKEN } });
  const reader = reply.body.getReader(), decoder = new TextDecoder();
  let buffered = "";
  const show = () => {
    const pre = document.querySelector(`.run[data-run="${CSS.escape(runId)}"] pre`);
    if (pre) { pre.hidden = folded.has(runId); pre.textContent = outputs.get(runId); pre.scrollTop = pre.scrollHeight; }
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
  await refreshRentals();
  show();
}

// NAME=VALUE lines of the environment field; null when there are none.
function parseEnv(text) {
  const env = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const cut = line.indexOf("=");
    if (cut < 1) throw new Error(`environment lines are NAME=VALUE, not "${line}"`);
    env[line.slice(0, cut)] = line.slice(cut + 1);
  }
  return Object.keys(env).length ? env : null;
}

// The POST /v1/gpus body of the rent form; a field left empty is left to the API's default.
function rentRequest(form) {
  const text = (name) => (form.get(name) || "").trim();
  const number = (name) => (text(name) === "" ? null : Number(text(name)));
  const body = {
    name: text("name"),
    gpu_model: text("gpu_model") || null,
    gpu_count: number("gpu_count"),
    image: text("image") || null,
    cpu: text("cpu") || null,
    memory: text("memory") || null,
    ephemeral_storage_gib: number("ephemeral_storage_gib"),
    duration_hours: number("duration_hours"),
    env: parseEnv(text("env")),
    queue: form.get("queue") === "on",
    ssh_pubkey: text("ssh_pubkey") || null,  // left out: the API mints a pair and returns its private half once
  };
  return Object.fromEntries(Object.entries(body).filter(([, value]) => value !== null));
}

document.getElementById("rent-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  note("renting…", false);
  try {
    const gpu = await api("POST", "/v1/gpus", rentRequest(new FormData(event.target)));
    const privateKey = gpu.ssh_access?.private_key;
    if (privateKey) keepMinted(gpu.gpu_id, privateKey);
    note((gpu.phase === "Queued" ? `queued ${gpu.gpu_id} (position ${gpu.queue_position})` : `rented ${gpu.gpu_id}`) +
      (privateKey ? ": its new SSH private key is on its card below, shown once" : ""), false);
  } catch (error) {
    note("could not rent: " + error.message, true);
    return;
  }
  refreshRentals();
  loadModels();
});

// A refusal of the API (its envelope's message) on the card of the rental whose key it concerned;
// "" clears it.
function keyNote(gpuId, text) {
  const status = document.querySelector(`.rental[data-gpu="${CSS.escape(gpuId)}"] .key-status`);
  if (status) { status.textContent = text; status.className = text ? "key-status error" : "key-status"; }
}

// PATCH /v1/gpus/{id}: {"ssh_pubkey": …} pins that key, {} mints a new pair (its private half
// in the answer, once). The key pinned before stops working at once.
async function changeKey(gpuId, body) {
  let gpu;
  try {
    gpu = await api("PATCH", "/v1/gpus/" + encodeURIComponent(gpuId), body);
  } catch (error) {
    keyNote(gpuId, (body.ssh_pubkey === undefined ? "could not mint a key: " : "could not pin this key: ") + error.message);
    return;
  }
  keyNote(gpuId, "");
  const privateKey = gpu.ssh_access?.private_key;
  if (privateKey) keepMinted(gpuId, privateKey);
  else forgetMinted(gpuId);  // a key minted before no longer logs in
  await refreshRentals();
}

document.getElementById("rentals").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target, gpuId = form.dataset.gpu;
  if (form.classList.contains("key-form")) {
    changeKey(gpuId, { ssh_pubkey: new FormData(form).get("ssh_pubkey").trim() });
    return;
  }
  const command = new FormData(form).get("command");
  try {
    const run = await api("POST", "/v1/runs", { gpu_id: gpuId, command: ["bash", "-c", command], wait_seconds: 0 });
    await refreshRentals();
    streamRun(gpuId, run.run_id);
  } catch (error) { note("could not run: " + error.message, true); }
});

document.getElementById("rentals").addEventListener("click", async (event) => {
  const target = event.target;
  if (target.dataset.return) {
    if (!confirm("Return this GPU? The pod is destroyed.")) return;
    try {
      await api("DELETE", "/v1/gpus/" + encodeURIComponent(target.dataset.return));
    } catch (error) { note("could not return: " + error.message, true); }
    refreshRentals();
    loadModels();
  } else if (target.dataset.mint) {
    if (!confirm("Mint a new SSH key pair? The key pinned now stops working and its open sessions end.")) return;
    changeKey(target.dataset.mint, {});
  } else if (target.dataset.forget) {
    forgetMinted(target.dataset.forget);
    refreshRentals();
  } else if (target.dataset.show) {
    const runId = target.dataset.show, pre = target.parentElement.querySelector("pre");
    if (!outputs.has(runId)) streamRun(target.dataset.gpu, runId);
    else if (folded.has(runId)) { folded.delete(runId); pre.hidden = false; }
    else { folded.add(runId); pre.hidden = true; }
  }
});

loadDrive();
loadModels();
refreshRentals();
