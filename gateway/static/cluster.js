// The cluster's state, public: what a visitor or a pending account may see.
"use strict";
(async () => {
  const box = document.getElementById("cluster");
  if (!box) return;
  try {
    const reply = await fetch("/v1/gpus", { headers: { Accept: "application/json" } });
    const data = await reply.json();
    const rows = (data.cluster || []).map((n) =>
      `<tr><td>${esc(n.node)}</td><td>${esc(n.gpu_model)}</td>` +
      `<td class="num">${n.gpu_total ? `${n.gpu_busy} / ${n.gpu_total}` : "CPU only"}</td>` +
      `<td class="num">${n.price_per_hour_credits}</td></tr>`).join("");
    box.classList.remove("muted");
    box.innerHTML = `<table class="list"><thead><tr><th>Node</th><th>Model</th><th class="num">Busy</th>` +
      `<th class="num">Credits / hour</th></tr></thead><tbody>${rows}</tbody></table>`;
  } catch (error) {
    box.textContent = "the cluster's state could not be read";
  }
})();
function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
