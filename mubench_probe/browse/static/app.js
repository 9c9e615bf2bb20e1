// probe browse: the router and the helpers every page uses.
// Pages are ES modules in ./pages/<name>.js exporting `render(el, params)`; params = {path, query}:
// `#/image/RUN/ROW?k=8` -> path ["RUN", "ROW"], query {k: "8"}.
// Data only ever reaches the DOM as text (el() sets textContent, never innerHTML).

const PAGES = ["overview", "map", "image", "search", "errors"];
const TOKEN = new URLSearchParams(location.search).get("token");

/** A URL with the token appended as a query parameter (images, links opened in a new tab). */
export function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

/** GET a JSON API path; throws an Error carrying the server's one-line message on failure. */
export async function api(path) {
  const resp = await fetch(path, { headers: TOKEN ? { "X-Probe-Token": TOKEN } : {} });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
  return body;
}

/** Build an element: attrs {class, href, title, on: {click: fn}, data: {...}, other attributes}; children are
 * nodes or strings (strings become text nodes: markup in data is shown as text). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
    else if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The thumbnail <img> of one row (opts: {size, channels: [indices]}). */
export function thumb(run_id, row, opts = {}) {
  const q = new URLSearchParams();
  if (opts.size !== undefined) q.set("size", String(opts.size));
  if (opts.channels) q.set("channels", opts.channels.join(","));
  const qs = q.toString();
  const src = withToken(`/thumb/${encodeURIComponent(run_id)}/${Number(row)}.png${qs ? "?" + qs : ""}`);
  return el("img", { src, class: "thumb", loading: "lazy", alt: `row ${row}`, data: { run: run_id, row } });
}

/** A link to a hash route (`#/image/RUN/ROW`), keeping the token of the page. */
export function link(hash, ...children) {
  return el("a", { href: hash }, ...children);
}

/** The hash of an image page. */
export function imageHash(run_id, row) {
  return `#/image/${encodeURIComponent(run_id)}/${Number(row)}`;
}

/** A thumbnail card: image (linking to its image page), caption lines. */
export function card(run_id, row, ...lines) {
  return el("figure", { class: "card", data: { row } },
    link(imageHash(run_id, row), thumb(run_id, row)),
    el("figcaption", {}, ...lines.map((l) => el("div", {}, l))));
}

/** Numbers as the tables show them (null/NaN as an en dash). */
export function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return typeof x === "number" ? x.toFixed(digits) : String(x);
}

/** A hash route with a query built from an object (values encoded). */
export function hashWith(page, query = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  const qs = q.toString();
  return `#/${page}${qs ? "?" + qs : ""}`;
}

/** Replace el's content with one error line (the server's message, as text). */
export function showError(node, err) {
  node.replaceChildren(el("p", { class: "error", role: "alert" }, String(err && err.message ? err.message : err)));
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [pathPart, queryPart] = raw.split("?", 2);
  const parts = pathPart.split("/").filter((p) => p !== "").map(decodeURIComponent);
  const name = PAGES.includes(parts[0]) ? parts[0] : "overview";
  const query = Object.fromEntries(new URLSearchParams(queryPart || ""));
  return { name, params: { path: parts.slice(1), query } };
}

let renderSeq = 0;
async function route() {
  const { name, params } = parseHash();
  const hash = location.hash;
  const seq = ++renderSeq;
  const main = document.getElementById("page");
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === name);
  main.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  main.dataset.page = name;
  main.dataset.ready = "false";
  try {
    const mod = await import(`./pages/${name}.js`);
    if (seq !== renderSeq) return;
    const box = el("section", { class: `page page-${name}` });
    main.replaceChildren(box);
    await mod.render(box, params);
  } catch (err) {
    if (seq === renderSeq) showError(main, err);
  }
  if (seq === renderSeq) {
    main.dataset.rendered = hash; // which route is ready: a click changes the hash before it re-renders
    main.dataset.ready = "true";
  }
}

if (typeof window !== "undefined" && document.getElementById("page")) {
  window.addEventListener("hashchange", route);
  route();
  api("/api/overview").then((o) => {
    const s = document.getElementById("store");
    if (s && o && o.store) {
      s.textContent = o.store.split("/").filter((p) => p).pop() || o.store;
      s.title = o.store;
    }
  }).catch(() => {});
}
