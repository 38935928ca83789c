// The distillsr web page: choose an image, upscale it through POST /v1/upscale, compare.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, models: [], defaults: {}, beforeUrl: null, afterUrl: null, out: null, busy: false };

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + (kind || "idle");
}

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
  return (n / (1 << 20)).toFixed(1) + " MiB";
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models");
    const j = await r.json();
    state.models = j.models;
    state.defaults = j.default;
    const l = j.limits;
    const parts = [];
    if (l.max_pixels) parts.push("up to " + (l.max_pixels / 1e6).toFixed(1) + " MP in");
    if (l.max_output_pixels) parts.push((l.max_output_pixels / 1e6).toFixed(0) + " MP out");
    parts.push(fmtBytes(l.max_upload_bytes) + " per upload");
    parts.push(l.timeout_s + " s per request");
    $("limits").textContent = "Limits: " + parts.join(", ") + ".";
    fillModels();
  } catch (e) {
    setStatus("Cannot reach the server: " + e, "error");
  }
}

function fillModels() {
  const scale = $("scale").value;
  const sel = $("model");
  const keep = sel.value;
  sel.innerHTML = "";
  for (const m of state.models.filter((m) => String(m.scale) === scale)) {
    const opt = document.createElement("option");
    opt.value = m.name;
    let label = m.name;
    if (m.set5_psnr) label += " (Set5 " + m.set5_psnr.toFixed(2) + " dB)";
    else if (m.name === "bicubic") label += " (no network)";
    opt.textContent = label;
    sel.appendChild(opt);
  }
  const wanted = [keep, state.defaults[scale]].find((n) => n && [...sel.options].some((o) => o.value === n));
  if (wanted) sel.value = wanted;
}

function setFile(file) {
  if (!file) return;
  state.file = file;
  $("file-name").textContent = file.name + " · " + fmtBytes(file.size);
  if (state.beforeUrl) URL.revokeObjectURL(state.beforeUrl);
  state.beforeUrl = URL.createObjectURL(file);
  $("run").disabled = false;
  upscale();
}

async function upscale() {
  if (!state.file || state.busy) return;
  state.busy = true;
  $("run").disabled = true;
  $("download").hidden = true;
  $("progress").hidden = false;
  const scale = $("scale").value;
  const t0 = performance.now();
  const tick = () => setStatus("Upscaling ×" + scale + " with " + $("model").value + "… " +
    ((performance.now() - t0) / 1000).toFixed(1) + " s", "busy");
  tick();
  const timer = setInterval(tick, 100);
  try {
    const q = new URLSearchParams({ scale: scale, model: $("model").value });
    if ($("format").value) q.set("format", $("format").value);
    const r = await fetch("/v1/upscale?" + q.toString(), {
      method: "POST", body: state.file,
      headers: { "Content-Type": state.file.type || "application/octet-stream" },
    });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const j = await r.json(); msg = j.error.message + " (" + r.status + " " + j.error.code + ")"; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const blob = await r.blob();
    await show(blob, r.headers.get("X-Distillsr-Model"), scale);
    setStatus("Done in " + ((performance.now() - t0) / 1000).toFixed(1) + " s: " + state.out.w + "×" +
      state.out.h + ", " + fmtBytes(blob.size) + ".", "done");
  } catch (e) {
    setStatus("Failed: " + e.message, "error");
  } finally {
    clearInterval(timer);
    $("progress").hidden = true;
    state.busy = false;
    $("run").disabled = !state.file;
  }
}

async function show(blob, model, scale) {
  if (state.afterUrl) URL.revokeObjectURL(state.afterUrl);
  state.afterUrl = URL.createObjectURL(blob);
  const before = $("before"), after = $("after");
  before.src = state.beforeUrl;
  after.src = state.afterUrl;
  await Promise.all([before.decode().catch(() => {}), after.decode()]);
  state.out = { w: after.naturalWidth, h: after.naturalHeight };
  $("sizes").textContent = before.naturalWidth + "×" + before.naturalHeight + " → " + state.out.w + "×" +
    state.out.h + " (×" + scale + ", " + model + ")";
  $("frame").hidden = false;
  $("placeholder").hidden = true;
  $("split").disabled = false;
  const ext = { "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/tiff": ".tif" }[blob.type] || "";
  const stem = state.file.name.replace(/\.[^.]*$/, "");
  const dl = $("download");
  dl.href = state.afterUrl;
  dl.download = stem + "_x" + scale + ext;
  dl.textContent = "Download " + dl.download;
  dl.hidden = false;
  layout();
  setSplit(parseFloat($("split").value));
}

function layout() {
  if (!state.out) return;
  const z = $("zoom").value;
  const frame = $("frame");
  let w = state.out.w, h = state.out.h;
  if (z === "fit") {
    const stage = $("stage");
    const k = Math.min((stage.clientWidth - 2) / w, (window.innerHeight * 0.72 - 2) / h);
    w *= k; h *= k;
  } else {
    const k = parseFloat(z) / (window.devicePixelRatio || 1);  // 1:1 = one image pixel per screen pixel
    w *= k; h *= k;
  }
  frame.style.width = Math.round(w) + "px";
  frame.style.height = Math.round(h) + "px";
  // enlarged on screen: show the result's pixels as squares too, not smoothed by the browser
  frame.classList.toggle("pixels", (w / state.out.w) * (window.devicePixelRatio || 1) >= 1.5);
}

function setSplit(p) {
  p = Math.max(0, Math.min(100, p));
  $("split").value = p;
  $("after").style.clipPath = "inset(0 0 0 " + p + "%)";
  $("divider").style.left = p + "%";
}

function dragSplit(ev) {
  const r = $("frame").getBoundingClientRect();
  setSplit(((ev.clientX - r.left) / r.width) * 100);
}

function init() {
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  const drop = $("drop");
  for (const t of ["dragenter", "dragover"]) drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const t of ["dragleave", "drop"]) drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => setFile(e.dataTransfer.files[0]));
  $("scale").addEventListener("change", fillModels);
  $("run").addEventListener("click", upscale);
  $("zoom").addEventListener("change", layout);
  window.addEventListener("resize", layout);
  $("split").addEventListener("input", (e) => setSplit(parseFloat(e.target.value)));
  const frame = $("frame");
  frame.addEventListener("pointerdown", (e) => { frame.setPointerCapture(e.pointerId); dragSplit(e); });
  frame.addEventListener("pointermove", (e) => { if (frame.hasPointerCapture(e.pointerId)) dragSplit(e); });
  loadModels();
}

init();
