// snipserve demo page: POST the chosen image to /v1/detect and draw the boxes on a canvas.
// No dependencies, no build step. Colours match service/render.py's PALETTE (by class id).
"use strict";

const PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#0082c8", "#f58230", "#911eb4", "#46f0f0"];
const $ = (id) => document.getElementById(id);

const state = { file: null, image: null, response: null, hiddenLevels: new Set() };

function headers() {
  const key = $("apikey").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, phase) {
  $("status").textContent = text;
  $("status").dataset.state = phase;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
    const model = body.models[0];
    $("model").textContent = `model ${model.id} on ${model.engine.name}`;
    const select = $("preset");
    select.replaceChildren();
    for (const name of ["default", ...Object.keys(model.card.presets || {})]) {
      select.append(new Option(name, name));
    }
    $("threshold").value = model.card.score_threshold;
    $("threshold-value").textContent = Number(model.card.score_threshold).toFixed(2);
  } catch (err) {
    $("model").textContent = `model unavailable (${err.message})`;
  }
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  state.response = null;
  showError("");
  const img = new Image();
  img.onload = () => { state.image = img; draw(); };
  img.onerror = () => { state.image = null; draw(); };  // e.g. TIFF: the browser cannot show it, the server can
  img.src = URL.createObjectURL(file);
  $("detect").disabled = false;
  setStatus(`${file.name} ready.`, "ready");
}

async function detect() {
  if (!state.file) return;
  const form = new FormData();
  form.append("file", state.file);
  form.append("preset", $("preset").value);
  form.append("score_threshold", $("threshold").value);
  $("detect").disabled = true;
  showError("");
  setStatus("Detecting…", "busy");
  try {
    const resp = await fetch("/v1/detect", { method: "POST", body: form, headers: headers() });
    const body = await resp.json();
    if (!resp.ok) {
      const err = body.error || {};
      throw new Error(`${resp.status} ${err.code || ""}: ${err.message || resp.statusText}`);
    }
    state.response = body;
    state.hiddenLevels.clear();
    renderLevels(body.levels || []);
    renderSummary();
    renderTimings(body.timings || {});
    draw();
    setStatus(`Done: ${body.detections.length} detections on ${body.chips} chips.`, "done");
  } catch (err) {
    showError(err.message);
    setStatus("Failed.", "error");
  } finally {
    $("detect").disabled = false;
  }
}

function visibleDetections() {
  if (!state.response) return [];
  return state.response.detections.filter((d) => !state.hiddenLevels.has(d.level));
}

function renderLevels(levels) {
  const box = $("levels");
  box.replaceChildren(Object.assign(document.createElement("legend"), { textContent: "Levels" }));
  for (const lv of levels) {
    const label = document.createElement("label");
    const input = Object.assign(document.createElement("input"), { type: "checkbox", checked: true });
    input.dataset.level = lv.index;
    input.addEventListener("change", () => {
      if (input.checked) state.hiddenLevels.delete(lv.index); else state.hiddenLevels.add(lv.index);
      renderSummary();
      draw();
    });
    const hi = lv.valid[1] === null ? "∞" : lv.valid[1];
    label.append(input, ` level ${lv.index}: scale ${lv.scale}, ${lv.chips} chips, valid ${lv.valid[0]}…${hi} px`);
    box.append(label);
  }
  box.hidden = levels.length === 0;
}

function renderSummary() {
  const dets = visibleDetections();
  $("count").textContent = String(dets.length);
  const counts = new Map();
  for (const d of dets) counts.set(d.label, { id: d.class_id, n: (counts.get(d.label)?.n || 0) + 1 });
  const list = $("labels");
  list.replaceChildren();
  for (const [label, { id, n }] of [...counts].sort()) {
    const item = document.createElement("li");
    item.dataset.label = label;
    const swatch = Object.assign(document.createElement("span"), { className: "swatch" });
    swatch.style.background = PALETTE[id % PALETTE.length];
    item.append(swatch, `${label}: ${n}`);
    list.append(item);
  }
  $("summary").hidden = false;
}

function renderTimings(timings) {
  const body = $("timings").querySelector("tbody");
  body.replaceChildren();
  for (const [stage, ms] of Object.entries(timings)) {
    const row = document.createElement("tr");
    row.dataset.stage = stage;
    row.append(Object.assign(document.createElement("td"), { textContent: stage }),
               Object.assign(document.createElement("td"), { textContent: Number(ms).toFixed(1) }));
    body.append(row);
  }
  $("timings").hidden = Object.keys(timings).length === 0;
}

function draw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const size = state.response ? state.response.image : null;
  const w = state.image ? state.image.naturalWidth : size ? size.width : 640;
  const h = state.image ? state.image.naturalHeight : size ? size.height : 480;
  canvas.width = w;
  canvas.height = h;
  ctx.fillStyle = "#dde1e7";
  ctx.fillRect(0, 0, w, h);
  if (state.image) ctx.drawImage(state.image, 0, 0);
  const line = Math.max(2, Math.round(Math.max(w, h) / 500));
  ctx.lineWidth = line;
  ctx.font = `${6 * line + 6}px system-ui, sans-serif`;
  ctx.textBaseline = "bottom";
  for (const d of visibleDetections()) {
    const [x1, y1, x2, y2] = d.box;
    const colour = PALETTE[d.class_id % PALETTE.length];
    ctx.strokeStyle = colour;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.label} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width;
    const th = 6 * line + 8;
    const ty = y1 - th < 0 ? y2 + th : y1;
    ctx.fillStyle = colour;
    ctx.fillRect(x1 - line / 2, ty - th, tw + 6, th);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x1 + 3, ty - 1);
  }
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  $("threshold").addEventListener("input", (e) => {
    $("threshold-value").textContent = Number(e.target.value).toFixed(2);
  });
  $("detect").addEventListener("click", detect);
  $("apikey").addEventListener("change", loadModel);
  loadModel();
  draw();
}

setup();
