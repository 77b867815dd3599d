// multimae demo page: patch grids of every input modality, masks, edits, predictions.
// Plain JavaScript, no build step. State lives here; the server is asked for samples, random
// masks, edits and predictions (see multimae/apps/demo/app.py for the endpoints).
"use strict";

const S = {
  info: null,        // GET /api/info
  sample: null,      // current sample {id, title, inputs: {name: {image, origin}}}
  hidden: {},        // name -> Set of hidden patch indices
  selected: {},      // name -> Set of patches selected for editing
  images: {},        // name -> loaded HTMLImageElement of the input
  canvases: {},      // name -> canvas
  seed: 0,
  inflight: false,
  pending: false,
  predictions: 0,
};

const $ = (id) => document.getElementById(id);

function showError(msg) {
  const box = $("error");
  if (msg) { box.textContent = msg; box.hidden = false; } else { box.textContent = ""; box.hidden = true; }
}

async function api(path, body, raw) {
  const opts = body === undefined ? {} : {
    method: "POST",
    body: raw ? body : JSON.stringify(body),
    headers: {"Content-Type": raw ? (body.type || "application/octet-stream") : "application/json"},
  };
  const res = await fetch(path, opts);
  let data;
  try { data = await res.json(); } catch (e) { data = {error: `HTTP ${res.status}`}; }
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function tokens() { return S.info.grid[0] * S.info.grid[1]; }
function inputNames() { return S.info.inputs.map((m) => m.name).filter((n) => S.sample && n in S.sample.inputs); }
function alpha() { return Math.pow(10, parseFloat($("alpha").value)); }
function textName() { return S.info.text && hasCaption() ? S.info.text.name : null; }
function hasCaption() { return !!(S.sample && S.sample.text && S.sample.text.origin !== "none"); }
function hiddenObject() {
  const out = {};
  for (const n of inputNames()) out[n] = [...(S.hidden[n] || [])].sort((a, b) => a - b);
  const t = textName();
  if (t) out[t] = [...(S.hidden[t] || [])].sort((a, b) => a - b);
  return out;
}

// ---------------------------------------------------------------- the caption (M3AE)
function drawCaption() {
  if (!S.info.text) return;
  const box = $("caption-words"), t = S.info.text.name, words = hasCaption() ? S.sample.text.tokens : [];
  const hid = S.hidden[t] || new Set();
  box.textContent = "";
  words.forEach((w, i) => {
    const span = document.createElement("span");
    span.className = "word" + (hid.has(i) ? " masked" : "");
    span.textContent = w;
    span.dataset.index = String(i);
    span.addEventListener("click", () => {
      S.hidden[t] = S.hidden[t] || new Set();
      if (S.hidden[t].has(i)) S.hidden[t].delete(i); else S.hidden[t].add(i);
      drawCaption();
      predict();
    });
    box.append(span);
  });
  $("caption-visible").textContent = `${words.length - [...hid].filter((i) => i < words.length).length} / ${words.length} words visible`;
}

function showCaption(texts) {
  const out = $("caption-output"), t = S.info.text && S.info.text.outputs[0];
  const o = t && texts ? texts[t] : null;
  out.hidden = !o;
  if (!o) return;
  const box = $("caption-pred");
  box.textContent = "";
  o.tokens.forEach((w, i) => {
    const span = document.createElement("span");
    span.className = "word" + (o.hidden[i] ? " predicted" : "");
    span.textContent = w;
    box.append(span);
  });
  box.dataset.caption = o.caption;
  $("caption-target").textContent = `target: ${o.target}`;
}

// ---------------------------------------------------------------- drawing the input grids
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot decode an image from the server"));
    img.src = src;
  });
}

function drawGrid(name) {
  const cv = S.canvases[name], img = S.images[name];
  if (!cv || !img) return;
  const ctx = cv.getContext("2d");
  const [gh, gw] = S.info.grid;
  const W = cv.width, H = cv.height, pw = W / gw, ph = H / gh;
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, W, H);
  ctx.drawImage(img, 0, 0, W, H);
  const hid = S.hidden[name] || new Set(), sel = S.selected[name] || new Set();
  ctx.fillStyle = "rgba(120, 120, 120, 0.88)";
  for (const i of hid) ctx.fillRect((i % gw) * pw, Math.floor(i / gw) * ph, pw, ph);
  ctx.strokeStyle = "rgba(255, 255, 255, 0.18)";
  ctx.lineWidth = 1;
  for (let c = 1; c < gw; c++) { ctx.beginPath(); ctx.moveTo(c * pw, 0); ctx.lineTo(c * pw, H); ctx.stroke(); }
  for (let r = 1; r < gh; r++) { ctx.beginPath(); ctx.moveTo(0, r * ph); ctx.lineTo(W, r * ph); ctx.stroke(); }
  ctx.strokeStyle = "#ffd400";
  ctx.lineWidth = 2;
  for (const i of sel) ctx.strokeRect((i % gw) * pw + 1, Math.floor(i / gw) * ph + 1, pw - 2, ph - 2);
  const vis = tokens() - hid.size;
  $(`visible-${name}`).textContent = `${vis} / ${tokens()} visible`;
}

function drawAll() {
  for (const n of inputNames()) drawGrid(n);
  let total = 0;
  for (const n of inputNames()) total += tokens() - (S.hidden[n] || new Set()).size;
  const sel = inputNames().map((n) => `${n} ${(S.selected[n] || new Set()).size}`).join(", ");
  $("selection-info").textContent = `selected: ${sel}`;
  document.body.dataset.visible = String(total);
}

function patchAt(cv, ev) {
  const r = cv.getBoundingClientRect();
  const [gh, gw] = S.info.grid;
  const c = Math.floor(((ev.clientX - r.left) / r.width) * gw);
  const row = Math.floor(((ev.clientY - r.top) / r.height) * gh);
  if (c < 0 || c >= gw || row < 0 || row >= gh) return -1;
  return row * gw + c;
}

function attachPointer(name, cv) {
  let drag = null;  // {set, value, changed}
  cv.addEventListener("pointerdown", (ev) => {
    const i = patchAt(cv, ev);
    if (i < 0) return;
    cv.setPointerCapture(ev.pointerId);
    const editing = document.querySelector("input[name=mode]:checked").value === "edit";
    const set = editing ? (S.selected[name] = S.selected[name] || new Set()) : (S.hidden[name] = S.hidden[name] || new Set());
    drag = {set, value: !set.has(i), changed: false, editing, x: ev.clientX, y: ev.clientY};
    apply(i);
  });
  function apply(i) {
    if (i < 0 || drag.set.has(i) === drag.value) return;
    if (drag.value) drag.set.add(i); else drag.set.delete(i);
    drag.changed = true;
    drawAll();
  }
  cv.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    // a fast drag moves several patches between two events: visit every patch on the way
    const r = cv.getBoundingClientRect();
    const stepPx = Math.min(r.width / S.info.grid[1], r.height / S.info.grid[0]) / 3;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    const steps = Math.max(1, Math.ceil(Math.hypot(dx, dy) / stepPx));
    for (let k = 1; k <= steps; k++) {
      apply(patchAt(cv, {clientX: drag.x + (dx * k) / steps, clientY: drag.y + (dy * k) / steps}));
    }
    drag.x = ev.clientX;
    drag.y = ev.clientY;
  });
  const end = () => {
    if (drag && drag.changed && !drag.editing) predict();
    drag = null;
  };
  cv.addEventListener("pointerup", end);
  cv.addEventListener("pointercancel", end);
}

function buildInputs() {
  const box = $("inputs");
  box.textContent = "";
  S.canvases = {};
  for (const m of S.info.inputs) {
    if (!(m.name in S.sample.inputs)) continue;
    const card = document.createElement("div");
    card.className = "card";
    card.id = `input-${m.name}`;
    const h = document.createElement("h3");
    const origin = S.sample.inputs[m.name].origin;
    h.innerHTML = `${m.name} <span class="origin ${origin.startsWith("predicted") ? "predicted" : ""}"></span>`;
    h.querySelector(".origin").textContent = `(${origin})`;
    const cv = document.createElement("canvas");
    cv.className = "grid";
    cv.width = 448; cv.height = 448;
    cv.dataset.modality = m.name;
    attachPointer(m.name, cv);
    const vis = document.createElement("div");
    vis.id = `visible-${m.name}`;
    card.append(h, cv, vis);
    if (m.classes) card.append(legend(m.classes));
    box.append(card);
    S.canvases[m.name] = cv;
  }
}

function legend(classes) {
  const div = document.createElement("div");
  div.className = "legend";
  for (const c of classes.slice(0, 40)) {
    const item = document.createElement("span");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = c.color;
    item.append(sw, document.createTextNode(c.name));
    div.append(item);
  }
  return div;
}

// ---------------------------------------------------------------- outputs
function buildOutputs() {
  const box = $("outputs");
  box.textContent = "";
  for (const m of S.info.outputs) {
    const card = document.createElement("div");
    card.className = "card";
    card.id = `output-${m.name}`;
    card.innerHTML = `<h3></h3><div class="pair">
      <figure><img class="pred" alt=""><figcaption>prediction</figcaption></figure>
      <figure><img class="target" alt=""><figcaption class="target-label">target</figcaption></figure></div>`;
    card.querySelector("h3").textContent = m.name;
    card.querySelector(".pred").alt = `${m.name} prediction`;
    card.querySelector(".target").alt = `${m.name} target`;
    box.append(card);
  }
}

function showOutputs(res) {
  for (const [task, o] of Object.entries(res.outputs)) {
    const card = $(`output-${task}`);
    if (!card) continue;
    card.querySelector(".pred").src = o.pred;
    const tgt = card.querySelector(".target");
    if (o.target) { tgt.src = o.target; tgt.hidden = false; } else { tgt.removeAttribute("src"); }
    const origin = o.target_origin;
    card.querySelector(".target-label").textContent =
      !o.target ? "no target" : origin.startsWith("predicted") ? `target: ${origin} (not ground truth)` : `target (${origin})`;
  }
}

async function predict() {
  if (!S.sample) return;
  if (S.inflight) { S.pending = true; return; }
  S.inflight = true;
  document.body.dataset.busy = "1";
  try {
    do {
      S.pending = false;
      const t0 = performance.now();
      const res = await api("/api/predict", {sample: S.sample.id, hidden: hiddenObject()});
      showOutputs(res);
      showCaption(res.texts);
      const rt = performance.now() - t0;
      $("timing").textContent = `prediction: model ${res.model_ms.toFixed(0)} ms, round trip ${rt.toFixed(0)} ms`;
      S.predictions += 1;
      document.body.dataset.predictions = String(S.predictions);
      showError(null);
    } while (S.pending);
  } catch (e) {
    showError(e.message);
  } finally {
    S.inflight = false;
    document.body.dataset.busy = "0";
  }
}

// ---------------------------------------------------------------- samples, masks, edits
async function setSample(sample, keepMask) {
  const sameInputs = S.sample && Object.keys(S.sample.inputs).join() === Object.keys(sample.inputs).join();
  S.sample = sample;
  const names = Object.keys(sample.inputs);
  S.images = {};
  await Promise.all(names.map(async (n) => { S.images[n] = await loadImage(sample.inputs[n].image); }));
  $("sample-title").textContent = sample.title;
  if (!sameInputs) { S.selected = {}; buildInputs(); }
  else {
    for (const n of names) {
      const h = $(`input-${n}`).querySelector(".origin");
      h.textContent = `(${sample.inputs[n].origin})`;
      h.classList.toggle("predicted", sample.inputs[n].origin.startsWith("predicted"));
    }
  }
  const total = names.length * tokens();
  const b = $("budget");
  b.max = String(total);
  if (parseInt(b.value, 10) > total) b.value = String(total);
  $("budget-val").textContent = b.value;
  if (S.info.text) {
    const t = S.info.text.name, n = hasCaption() ? sample.text.tokens.length : 0;
    $("caption-box").hidden = false;
    $("caption-origin").textContent = `(${hasCaption() ? sample.text.origin : "no caption: type one"})`;
    $("caption-text").value = hasCaption() ? sample.text.caption : "";
    S.hidden[t] = new Set([...(S.hidden[t] || [])].filter((i) => i < n));
    drawCaption();
  }
  if (keepMask && sameInputs) { drawAll(); await predict(); } else { await randomMask(); }
}

async function randomMask() {
  const res = await api("/api/mask", {sample: S.sample.id, budget: parseInt($("budget").value, 10),
                                      alpha: alpha(), seed: S.seed});
  S.hidden = {};
  for (const [n, idx] of Object.entries(res.hidden)) S.hidden[n] = new Set(idx);
  drawAll();
  drawCaption();
  await predict();
}

function setOnly(keep) {
  for (const n of inputNames()) {
    S.hidden[n] = new Set();
    if (keep !== null && n !== keep) for (let i = 0; i < tokens(); i++) S.hidden[n].add(i);
  }
  const t = textName();
  if (t) {
    S.hidden[t] = new Set();
    if (keep !== null && t !== keep) S.sample.text.tokens.forEach((_, i) => S.hidden[t].add(i));
  }
  drawAll();
  drawCaption();
  predict();
}

async function edit(modality, extra) {
  const patches = [...(S.selected[modality] || [])];
  const res = await api("/api/edit", Object.assign({sample: S.sample.id, modality, patches}, extra));
  await setSample(res, true);
}

function guard(fn) {
  return async (...args) => {
    try { await fn(...args); } catch (e) { showError(e.message); }
  };
}

async function loadSource(source, index) {
  const res = await api("/api/sample", {source, index});
  await setSample(res, true);
}

async function init() {
  S.info = await api("/api/info");
  const i = S.info;
  $("model-info").textContent =
    `inputs ${i.inputs.map((m) => m.name).join(", ")}; outputs ${i.outputs.map((m) => m.name).join(", ")}; ` +
    `${i.image_size}px, ${i.grid[0]}x${i.grid[1]} patches; ${i.precision}, ${i.threads} thread(s)`;
  $("budget").max = String(i.tokens);
  $("budget").value = String(Math.min(i.budget, i.tokens));
  $("budget-val").textContent = $("budget").value;
  $("alpha").value = String(Math.log10(i.alpha));
  $("alpha-val").textContent = alpha().toFixed(2);
  $("hue-val").textContent = `${$("hue").value}°`;
  $("synthetic-row").hidden = !i.sources.includes("synthetic");
  $("folder-row").hidden = !i.sources.includes("folder");
  $("folder-size").textContent = i.folder_size ? `of ${i.folder_size}` : "";
  $("folder-index").max = String(Math.max(0, i.folder_size - 1));
  const buttons = $("mask-buttons");
  for (const m of i.inputs) {
    const b = document.createElement("button");
    b.type = "button";
    b.id = `only-${m.name}`;
    b.textContent = `only ${m.name}`;
    b.addEventListener("click", () => setOnly(m.name));
    buttons.append(b);
  }
  if (i.text) {
    const b = document.createElement("button");
    b.type = "button";
    b.id = `only-${i.text.name}`;
    b.textContent = `only ${i.text.name}`;
    b.addEventListener("click", () => setOnly(i.text.name));
    buttons.append(b);
    $("caption-name").textContent = i.text.name;
    $("set-caption").addEventListener("click", guard(() => edit(i.text.name, {caption: $("caption-text").value})));
    $("caption-text").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("set-caption").click(); });
  }
  const hueIn = i.inputs.find((m) => m.edit === "hue"), clsIn = i.inputs.find((m) => m.edit === "class");
  $("hue-row").hidden = !hueIn;
  $("class-row").hidden = !clsIn;
  if (clsIn) {
    for (const c of clsIn.classes) {
      const o = document.createElement("option");
      o.value = String(c.id);
      o.textContent = `${c.id}: ${c.name}`;
      o.style.background = c.color;
      $("class-select").append(o);
    }
  }
  buildOutputs();

  $("load-scene").addEventListener("click", guard(() => loadSource("synthetic", parseInt($("scene-index").value, 10) || 0)));
  $("next-scene").addEventListener("click", guard(() => {
    $("scene-index").value = String((parseInt($("scene-index").value, 10) || 0) + 1);
    return loadSource("synthetic", parseInt($("scene-index").value, 10));
  }));
  $("load-folder").addEventListener("click", guard(() => loadSource("folder", parseInt($("folder-index").value, 10) || 0)));
  $("upload").addEventListener("change", guard(async (ev) => {
    const f = ev.target.files[0];
    if (!f) return;
    ev.target.value = "";  // choosing the same file again fires "change" again
    const res = await api("/api/upload", f, true);
    await setSample(res, true);
  }));
  $("budget").addEventListener("input", () => { $("budget-val").textContent = $("budget").value; });
  $("budget").addEventListener("change", guard(() => { $("budget-val").textContent = $("budget").value; return randomMask(); }));
  $("alpha").addEventListener("input", () => { $("alpha-val").textContent = alpha().toFixed(2); });
  $("alpha").addEventListener("change", guard(() => { $("alpha-val").textContent = alpha().toFixed(2); return randomMask(); }));
  $("random-mask").addEventListener("click", guard(() => { S.seed += 1; return randomMask(); }));
  $("show-all").addEventListener("click", () => setOnly(null));
  $("hue").addEventListener("input", () => { $("hue-val").textContent = `${$("hue").value}°`; });
  $("apply-hue").addEventListener("click", guard(() => edit(hueIn.name, {hue: parseFloat($("hue").value)})));
  $("apply-class").addEventListener("click", guard(() => edit(clsIn.name, {class: parseInt($("class-select").value, 10)})));
  $("clear-selection").addEventListener("click", () => { S.selected = {}; drawAll(); });

  if (i.sources.includes("synthetic")) await loadSource("synthetic", 0);
  else if (i.sources.includes("folder")) await loadSource("folder", 0);
  document.body.dataset.ready = "1";
}

window.addEventListener("DOMContentLoaded", guard(init));
