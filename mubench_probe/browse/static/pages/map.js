// Map: one run's image embeddings in 2-D (PCA, or UMAP with the extra), drawn with WebGL so that pan and
// zoom stay smooth at a million points; coloured by a metadata column, batch or a head's correct/wrong;
// box or lasso selection lists the selected images; a second model over the same rows sits beside it and
// shares the selection (row i is the same image in both). Data reaches the DOM as text only.
import { api, card, el, hashWith, imageHash, showError, withToken } from "../app.js";

const LIMIT = 60; // thumbnails listed for a selection (the count above them is exact)
const LOD_POINTS = 120000; // while panning or zooming a bigger map, a fixed random subset of this many is drawn
const SETTLE_MS = 180; // ... and the full map once the wheel or drag has been still this long

function cssOnce() {
  if (document.getElementById("map-search-css")) return;
  document.head.append(el("link", { id: "map-search-css", rel: "stylesheet", href: withToken("/static/pages/map-search.css") }));
}

async function binary(path) {
  const headers = {};
  const token = new URLSearchParams(location.search).get("token");
  if (token) headers["X-Probe-Token"] = token;
  const resp = await fetch(path, { headers });
  if (!resp.ok) {
    let msg = `${resp.status} ${resp.statusText}`;
    try { msg = (await resp.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return { buffer: await resp.arrayBuffer(), headers: resp.headers };
}

function query(params) {
  return new URLSearchParams(params).toString();
}

function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

const VERT = `
attribute vec2 a_pos; attribute vec4 a_col; attribute float a_sel;
uniform vec2 u_center; uniform vec2 u_scale; uniform float u_size; uniform float u_dim;
varying vec4 v_col;
void main() {
  bool faded = u_dim > 0.5 && a_sel < 0.5;
  gl_Position = vec4((a_pos - u_center) * u_scale, faded ? 0.5 : 0.0, 1.0);
  gl_PointSize = faded ? u_size : (u_dim > 0.5 ? 1.5 * u_size : u_size);
  v_col = vec4(faded ? mix(a_col.rgb, vec3(0.88), 0.8) : a_col.rgb, 1.0);
}`;
const FRAG = `
precision mediump float; varying vec4 v_col;
void main() {
  vec2 d = gl_PointCoord - vec2(0.5);
  if (dot(d, d) > 0.25) discard;
  gl_FragColor = v_col;
}`;

function compile(gl, type, src) {
  const s = gl.createShader(type);
  gl.shaderSource(s, src);
  gl.compileShader(s);
  if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error("WebGL shader: " + gl.getShaderInfoLog(s));
  return s;
}

/** One scatter panel: a WebGL canvas, an overlay for the selection outline, and its legend. */
class Panel {
  constructor(host, info, onSelect) {
    this.info = info;
    this.onSelect = onSelect;
    this.mode = "pan";
    this.canvas = el("canvas", { class: "map-gl", data: { run: info.run_id } });
    this.overlay = el("canvas", { class: "map-overlay" });
    this.legend = el("ul", { class: "map-legend" });
    this.title = el("h3", {}, `${info.model} · ${info.dataset} · ${info.rows.toLocaleString()} rows`);
    this.status = el("p", { class: "muted map-status" });
    this.box = el("div", { class: "map-box" }, this.canvas, this.overlay);
    host.append(el("div", { class: "map-panel", data: { run: info.run_id } }, this.title, this.box, this.status, this.legend));
    const gl = this.canvas.getContext("webgl2", { antialias: false, preserveDrawingBuffer: true })
      || this.canvas.getContext("webgl", { antialias: false, preserveDrawingBuffer: true });
    if (!gl) throw new Error("this browser has no WebGL: the map cannot be drawn");
    this.gl = gl;
    const prog = gl.createProgram();
    gl.attachShader(prog, compile(gl, gl.VERTEX_SHADER, VERT));
    gl.attachShader(prog, compile(gl, gl.FRAGMENT_SHADER, FRAG));
    gl.linkProgram(prog);
    if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) throw new Error("WebGL program: " + gl.getProgramInfoLog(prog));
    this.prog = prog;
    this.buf = { pos: gl.createBuffer(), col: gl.createBuffer(), sel: gl.createBuffer() };
    this.n = 0;
    this.dirty = false;
    this.selMask = null;
    this.bindEvents();
    new ResizeObserver(() => this.resize()).observe(this.box);
  }

  setPoints(buffer, bounds) {
    const pos = new Float32Array(buffer);
    for (let i = 0; i < pos.length; i++) if (!Number.isFinite(pos[i])) pos[i] = 1e30; // no embedding: off screen
    this.pos = pos;
    this.n = pos.length / 2;
    const gl = this.gl;
    gl.bindBuffer(gl.ARRAY_BUFFER, this.buf.pos);
    gl.bufferData(gl.ARRAY_BUFFER, pos, gl.STATIC_DRAW);
    gl.bindBuffer(gl.ARRAY_BUFFER, this.buf.col);
    gl.bufferData(gl.ARRAY_BUFFER, new Uint8Array(this.n * 4).fill(120), gl.STATIC_DRAW); // grey until coloured
    this.lod = null;
    if (this.n > LOD_POINTS && (gl instanceof WebGL2RenderingContext || gl.getExtension("OES_element_index_uint"))) {
      const pick = new Uint32Array(LOD_POINTS); // a seeded partial shuffle: the same subset every time
      let seed = 12345;
      const perm = new Uint32Array(this.n);
      for (let i = 0; i < this.n; i++) perm[i] = i;
      for (let i = 0; i < LOD_POINTS; i++) {
        seed = (seed * 1103515245 + 12345) >>> 0;
        const j = i + (seed % (this.n - i));
        const t = perm[i]; perm[i] = perm[j]; perm[j] = t;
        pick[i] = perm[i];
      }
      pick.sort();
      this.lod = gl.createBuffer();
      gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, this.lod);
      gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, pick, gl.STATIC_DRAW);
    }
    this.setSelection(null);
    this.bounds = bounds;
    this.fit();
  }

  setColours(codes, legend) {
    const table = new Uint8Array(65536 * 4);
    for (const e of legend) table.set([...hexToRgb(e.colour), 255], e.code * 4);
    const table32 = new Uint32Array(table.buffer), rgba32 = new Uint32Array(this.n); // one RGBA word per point
    for (let i = 0; i < this.n; i++) rgba32[i] = table32[codes[i]];
    const rgba = new Uint8Array(rgba32.buffer);
    const gl = this.gl;
    gl.bindBuffer(gl.ARRAY_BUFFER, this.buf.col);
    gl.bufferData(gl.ARRAY_BUFFER, rgba, gl.STATIC_DRAW);
    this.legend.replaceChildren(...legend.map((e) => {
      const sw = el("span", { class: "swatch" });
      sw.style.backgroundColor = e.colour; // CSSOM, not an inline style attribute (the CSP forbids those)
      return el("li", { data: { code: e.code } }, sw, el("span", { class: "legend-label" }, e.label),
        el("span", { class: "muted" }, ` ${e.count.toLocaleString()}`));
    }));
    this.draw();
  }

  setSelection(mask) {
    this.selMask = mask;
    let k = 0;
    if (mask) for (let i = 0; i < mask.length; i++) k += mask[i];
    this.canvas.dataset.selected = String(k); // how many points this panel highlights (linked panels: the same)
    const gl = this.gl;
    gl.bindBuffer(gl.ARRAY_BUFFER, this.buf.sel);
    gl.bufferData(gl.ARRAY_BUFFER, mask || new Uint8Array(this.n), gl.DYNAMIC_DRAW);
    this.draw();
  }

  fit() {
    const [x0, y0, x1, y1] = this.bounds;
    this.cx = (x0 + x1) / 2;
    this.cy = (y0 + y1) / 2;
    const w = this.box.clientWidth || 600, h = this.box.clientHeight || 500;
    this.s = 0.92 * Math.min(w / Math.max(x1 - x0, 1e-9), h / Math.max(y1 - y0, 1e-9));
    this.draw();
  }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const w = this.box.clientWidth, h = this.box.clientHeight;
    for (const c of [this.canvas, this.overlay]) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    this.draw();
  }

  toData(px, py) {
    const w = this.box.clientWidth, h = this.box.clientHeight;
    return [this.cx + (px - w / 2) / this.s, this.cy - (py - h / 2) / this.s];
  }

  toScreen(x, y) {
    const w = this.box.clientWidth, h = this.box.clientHeight;
    return [(x - this.cx) * this.s + w / 2, h / 2 - (y - this.cy) * this.s];
  }

  /** A pan or zoom step: draw the subset now, the full map once the input has settled. */
  moved() {
    this.interacting = true;
    clearTimeout(this.settle);
    this.settle = setTimeout(() => { this.interacting = false; this.draw(); }, SETTLE_MS);
    this.draw();
  }

  draw() {
    if (this.dirty) return;
    this.dirty = true;
    requestAnimationFrame(() => { this.dirty = false; this.render(); });
  }

  render() {
    const gl = this.gl;
    if (!this.n || !this.s) return;
    const w = this.box.clientWidth, h = this.box.clientHeight;
    gl.viewport(0, 0, this.canvas.width, this.canvas.height);
    gl.clearColor(1, 1, 1, 1);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    gl.enable(gl.DEPTH_TEST); // selected points (z 0) stay in front of faded ones (z 0.5)
    gl.depthFunc(gl.LEQUAL);
    gl.useProgram(this.prog);
    const attr = (name, buf, size, type, norm) => {
      const loc = gl.getAttribLocation(this.prog, name);
      gl.bindBuffer(gl.ARRAY_BUFFER, buf);
      gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, size, type, norm, 0, 0);
    };
    attr("a_pos", this.buf.pos, 2, gl.FLOAT, false);
    attr("a_col", this.buf.col, 4, gl.UNSIGNED_BYTE, true);
    attr("a_sel", this.buf.sel, 1, gl.UNSIGNED_BYTE, false);
    gl.uniform2f(gl.getUniformLocation(this.prog, "u_center"), this.cx, this.cy);
    gl.uniform2f(gl.getUniformLocation(this.prog, "u_scale"), (2 * this.s) / w, (2 * this.s) / h);
    const dpr = window.devicePixelRatio || 1;
    const size = (this.n > 200000 ? 2 : this.n > 20000 ? 3 : 6) * dpr;
    gl.uniform1f(gl.getUniformLocation(this.prog, "u_size"), size);
    gl.uniform1f(gl.getUniformLocation(this.prog, "u_dim"), this.selMask ? 1 : 0);
    if (this.interacting && this.lod) {
      gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, this.lod);
      gl.drawElements(gl.POINTS, LOD_POINTS, gl.UNSIGNED_INT, 0);
    } else {
      gl.drawArrays(gl.POINTS, 0, this.n);
    }
    if (!this.canvas.dataset.painted) {
      const px = new Uint8Array(4);
      gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, px); // waits for the frame: the paint is real
      this.canvas.dataset.painted = "true";
      window.__probeMapPaint = window.__probeMapPaint || performance.now();
      if (this.onPainted) this.onPainted();
    }
  }

  nearest(px, py, radius = 8) {
    let best = -1, bestD = radius * radius;
    for (let i = 0; i < this.n; i++) {
      const [sx, sy] = this.toScreen(this.pos[2 * i], this.pos[2 * i + 1]);
      const d = (sx - px) ** 2 + (sy - py) ** 2;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }

  bindEvents() {
    const target = this.overlay;
    let drag = null;
    const local = (e) => { const r = target.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
    target.addEventListener("wheel", (e) => {
      e.preventDefault();
      const [mx, my] = local(e);
      const [dx, dy] = this.toData(mx, my);
      this.s *= Math.exp(-e.deltaY * 0.0015);
      const w = this.box.clientWidth, h = this.box.clientHeight;
      this.cx = dx - (mx - w / 2) / this.s;
      this.cy = dy + (my - h / 2) / this.s;
      this.moved();
    }, { passive: false });
    target.addEventListener("pointerdown", (e) => {
      target.setPointerCapture(e.pointerId);
      drag = { start: local(e), path: [local(e)], cx: this.cx, cy: this.cy, moved: false };
    });
    target.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const p = local(e);
      if (Math.hypot(p[0] - drag.start[0], p[1] - drag.start[1]) > 3) drag.moved = true;
      if (this.mode === "pan") {
        this.cx = drag.cx - (p[0] - drag.start[0]) / this.s;
        this.cy = drag.cy + (p[1] - drag.start[1]) / this.s;
        this.moved();
      } else {
        drag.path.push(p);
        this.outline(drag, p);
      }
    });
    target.addEventListener("pointerup", (e) => {
      if (!drag) return;
      const d = drag;
      drag = null;
      const p = local(e);
      this.clearOutline();
      if (!d.moved) {
        const row = this.nearest(p[0], p[1]);
        if (row >= 0) location.hash = imageHash(this.info.run_id, row);
        return;
      }
      if (this.mode === "box") this.onSelect(this, { box: [...this.toData(...d.start), ...this.toData(...p)] });
      else if (this.mode === "lasso" && d.path.length >= 3) this.onSelect(this, { lasso: d.path.flatMap((q) => this.toData(...q)) });
    });
  }

  outline(drag, p) {
    const ctx = this.overlay.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, this.overlay.width, this.overlay.height);
    ctx.strokeStyle = "#2f6db3";
    ctx.fillStyle = "rgba(47,109,179,0.08)";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    if (this.mode === "box") ctx.rect(drag.start[0], drag.start[1], p[0] - drag.start[0], p[1] - drag.start[1]);
    else { ctx.moveTo(...drag.path[0]); for (const q of drag.path) ctx.lineTo(...q); ctx.closePath(); }
    ctx.fill();
    ctx.stroke();
  }

  clearOutline() {
    this.overlay.getContext("2d").clearRect(0, 0, this.overlay.width, this.overlay.height);
  }

  /** The rows inside a box or lasso (data coordinates), as a 0/1 mask: the same test as the server's. */
  mask(shape) {
    const m = new Uint8Array(this.n);
    const pos = this.pos;
    if (shape.box) {
      const [a, b, c, d] = shape.box;
      const x0 = Math.min(a, c), x1 = Math.max(a, c), y0 = Math.min(b, d), y1 = Math.max(b, d);
      for (let i = 0; i < this.n; i++) {
        const x = pos[2 * i], y = pos[2 * i + 1];
        if (x >= x0 && x <= x1 && y >= y0 && y <= y1) m[i] = 1;
      }
      return m;
    }
    const poly = shape.lasso, k = poly.length / 2;
    let bx0 = Infinity, bx1 = -Infinity, by0 = Infinity, by1 = -Infinity;
    for (let j = 0; j < k; j++) {
      bx0 = Math.min(bx0, poly[2 * j]); bx1 = Math.max(bx1, poly[2 * j]);
      by0 = Math.min(by0, poly[2 * j + 1]); by1 = Math.max(by1, poly[2 * j + 1]);
    }
    for (let i = 0; i < this.n; i++) {
      const x = pos[2 * i], y = pos[2 * i + 1];
      if (x < bx0 || x > bx1 || y < by0 || y > by1) continue;
      let inside = false;
      for (let j = 0, p = k - 1; j < k; p = j++) {
        const xa = poly[2 * p], ya = poly[2 * p + 1], xb = poly[2 * j], yb = poly[2 * j + 1];
        if ((ya > y) !== (yb > y) && x < xa + ((y - ya) * (xb - xa)) / (yb - ya)) inside = !inside;
      }
      if (inside) m[i] = 1;
    }
    return m;
  }
}

async function loadPanel(panel, method) {
  const id = encodeURIComponent(panel.info.run_id);
  panel.status.textContent = "loading points…";
  const { buffer, headers } = await binary(`/api/map/${id}/points?${query({ method })}`);
  const bounds = (headers.get("X-Bounds") || "0,0,1,1").split(",").map(Number);
  panel.setPoints(buffer, bounds);
  panel.status.textContent = `${method.toUpperCase()} · drag to ${panel.mode === "pan" ? "pan" : "select"}, wheel to zoom, click a point to open its image`;
}

async function colourPanel(panel, params) {
  const id = encodeURIComponent(panel.info.run_id);
  const [legend, codes] = await Promise.all([
    api(`/api/map/${id}/legend?${query(params)}`),
    binary(`/api/map/${id}/codes?${query(params)}`),
  ]);
  panel.setColours(new Uint16Array(codes.buffer), legend.legend);
}

export async function render(root, params) {
  cssOnce();
  const q = params.query;
  const { runs, methods } = await api("/api/map/runs");
  if (!runs.length) {
    root.append(el("p", { class: "muted" }, "This store holds no runs to map."));
    return;
  }
  const runA = runs.find((r) => r.run_id === q.run) || runs[0];
  const method = methods.includes(q.method) ? q.method : "pca";
  const infoA = await api(`/api/map/${encodeURIComponent(runA.run_id)}`);
  const partners = runs.filter((r) => infoA.partners.includes(r.run_id));
  const runB = partners.find((r) => r.run_id === q.b) || null;
  const go = (changes) => { location.hash = hashWith("map", { run: runA.run_id, method, b: runB && runB.run_id, colour: q.colour, ...changes }); };

  const options = infoA.colour_by;
  const colourIdx = Math.max(0, options.findIndex((o) => o.label === (q.colour || infoA.default_colour)));
  const modeButtons = ["pan", "box", "lasso"].map((m) => el("button", {
    type: "button", class: m === "pan" ? "mode active" : "mode", data: { mode: m }, id: `map-mode-${m}`,
    on: { click: () => setMode(m) },
  }, m === "pan" ? "Pan / zoom" : m === "box" ? "Box select" : "Lasso select"));
  root.append(el("div", { class: "controls" },
    el("label", {}, "model ", el("select", { id: "map-run", on: { change: (e) => go({ run: e.target.value, b: null }) } },
      ...runs.map((r) => el("option", { value: r.run_id, selected: r.run_id === runA.run_id }, `${r.model} · ${r.dataset}`)))),
    el("label", {}, "map ", el("select", { id: "map-method", on: { change: (e) => go({ method: e.target.value }) } },
      ...methods.map((m) => el("option", { value: m, selected: m === method }, m.toUpperCase())))),
    el("label", {}, "colour by ", el("select", { id: "map-colour", on: { change: (e) => go({ colour: options[Number(e.target.value)].label }) } },
      ...options.map((o, i) => el("option", { value: i, selected: i === colourIdx }, o.label)))),
    el("label", {}, "beside it ", el("select", { id: "map-second", on: { change: (e) => go({ b: e.target.value || null }) } },
      el("option", { value: "" }, partners.length ? "(no second model)" : "(no other model over these rows)"),
      ...partners.map((r) => el("option", { value: r.run_id, selected: runB && r.run_id === runB.run_id }, r.model)))),
    el("span", { class: "mode-buttons" }, ...modeButtons)));

  const panelsHost = el("div", { class: runB ? "map-panels two" : "map-panels" });
  const selectionBox = el("div", { id: "map-selection" });
  root.append(panelsHost, selectionBox);
  const panels = [];
  let selSeq = 0;

  async function onSelect(source, shape) {
    const seq = ++selSeq;
    const mask = source.mask(shape);
    for (const p of panels) p.setSelection(mask); // linked: row i is the same image in every panel
    const params = { method, limit: LIMIT };
    if (shape.box) params.box = shape.box.join(","); else params.lasso = shape.lasso.map((v) => v.toPrecision(9)).join(",");
    try {
      const res = await api(`/api/map/${encodeURIComponent(source.info.run_id)}/select?${query(params)}`);
      if (seq !== selSeq) return;
      const shown = res.items.length < res.count ? ` (the first ${res.items.length})` : "";
      selectionBox.replaceChildren(
        el("h3", { id: "map-selection-count", data: { count: res.count } }, `${res.count.toLocaleString()} image(s) selected${shown}`),
        el("p", {}, el("button", { type: "button", id: "map-clear", on: { click: clear } }, "Clear selection")),
        el("div", { class: "grid" }, ...res.items.map((it) => card(source.info.run_id, it.row,
          `row ${it.row}`, ...["label_name", "dataset"].filter((c) => it.meta[c] !== undefined && it.meta[c] !== null).map((c) => `${c}: ${it.meta[c]}`)))));
    } catch (err) { showError(selectionBox, err); }
  }

  function clear() {
    selSeq++;
    for (const p of panels) p.setSelection(null);
    selectionBox.replaceChildren();
  }

  function setMode(m) {
    for (const b of modeButtons) b.classList.toggle("active", b.dataset.mode === m);
    for (const p of panels) { p.mode = m; p.overlay.dataset.mode = m; }
  }

  try {
    const infos = [infoA];
    if (runB) infos.push(await api(`/api/map/${encodeURIComponent(runB.run_id)}`));
    for (const info of infos) panels.push(new Panel(panelsHost, info, onSelect));
    await Promise.all(panels.map(async (p) => {
      await loadPanel(p, method);
      const opts = p.info.colour_by;
      const want = options[colourIdx];
      const mine = opts.find((o) => o.label === (want && want.label)) || opts[0];
      if (mine) await colourPanel(p, mine.params);
      await new Promise((resolve) => { if (p.canvas.dataset.painted) resolve(); else { p.onPainted = resolve; p.draw(); } });
    }));
    setMode("pan");
  } catch (err) {
    showError(panelsHost, err);
  }
}
