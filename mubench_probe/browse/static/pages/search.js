// Search: a text query (text -> image; the server loads the model on the first one) and "more like this"
// (image -> image from a row), top-k thumbnails with their scores, ranked exactly as `probe search` ranks.
// Route: #/search?run=RUN&q=TEXT&k=12 or #/search?run=RUN&row=ROW. Data reaches the DOM as text only.
import { api, card, el, fmt, hashWith, showError, withToken } from "../app.js";

function cssOnce() {
  if (document.getElementById("map-search-css")) return;
  document.head.append(el("link", { id: "map-search-css", rel: "stylesheet", href: withToken("/static/pages/map-search.css") }));
}

export async function render(root, params) {
  cssOnce();
  const q = params.query;
  const { runs } = await api("/api/search/runs");
  if (!runs.length) {
    root.append(el("p", { class: "muted" }, "This store holds no runs to search."));
    return;
  }
  const run = runs.find((r) => r.run_id === q.run) || runs.find((r) => r.has_text) || runs[0];
  const k = Math.min(200, Math.max(1, Number(q.k) || 12));
  const go = (changes) => { location.hash = hashWith("search", { run: run.run_id, k, ...changes }); };

  const runSelect = el("select", { id: "search-run", on: { change: (e) => { location.hash = hashWith("search", { run: e.target.value, k }); } } },
    ...runs.map((r) => el("option", { value: r.run_id, selected: r.run_id === run.run_id }, `${r.model} · ${r.dataset}`)));
  const text = el("input", { type: "search", id: "search-text", name: "q", placeholder: run.has_text ? "a micrograph of a white blood cell" : "this model is image-only",
    value: q.q || "", disabled: !run.has_text, autocomplete: "off" });
  const kInput = el("input", { type: "number", id: "search-k", min: 1, max: 200, value: k });
  const rowInput = el("input", { type: "number", id: "search-row", min: 0, max: run.rows - 1, value: q.row ?? "", placeholder: "row" });
  root.append(
    el("div", { class: "controls" }, el("label", {}, "model ", runSelect), el("label", {}, "k ", kInput)),
    el("form", { class: "search-form", id: "search-text-form", on: { submit: (e) => {
      e.preventDefault();
      if (text.value.trim()) go({ q: text.value, k: kInput.value });
    } } }, el("label", {}, "text → image ", text), el("button", { type: "submit", id: "search-text-go", disabled: !run.has_text }, "Search")),
    el("form", { class: "search-form", id: "search-row-form", on: { submit: (e) => {
      e.preventDefault();
      if (rowInput.value !== "") go({ row: rowInput.value, k: kInput.value });
    } } }, el("label", {}, "more like row ", rowInput), el("button", { type: "submit", id: "search-row-go" }, "More like this")),
  );
  const out = el("div", { id: "search-results" });
  root.append(out);

  let path = null;
  if (q.q) path = `/api/search/${encodeURIComponent(run.run_id)}/text?${new URLSearchParams({ q: q.q, k })}`;
  else if (q.row !== undefined && q.row !== "") path = `/api/search/${encodeURIComponent(run.run_id)}/row/${Number(q.row)}?k=${k}`;
  if (!path) {
    out.append(el("p", { class: "muted" }, run.has_text
      ? "Type a description to find matching images (the first text query loads the model), or give a row for images like it."
      : "Give a row to find the images most like it."));
    return;
  }
  out.append(el("p", { class: "muted" }, q.q ? "searching (the first text query loads the model)…" : "searching…"));
  try {
    const res = await api(path);
    const what = res.query.text !== undefined ? `“${res.query.text}”` : `row ${res.query.row}`;
    out.replaceChildren(
      el("h3", { id: "search-title", data: { hits: res.hits.length } }, `Top ${res.hits.length} for ${what} · ${res.model} · ${res.ms} ms`),
      ...res.notes.map((n) => el("p", { class: "muted" }, n)),
      el("div", { class: "grid", id: "search-hits" }, ...res.hits.map((h) => {
        const c = card(res.run_id, h.row, el("span", { class: "score", data: { score: h.score } }, `#${h.rank} · ${fmt(h.score, 4)}`),
          h.label_name ?? "", el("a", { href: hashWith("search", { run: res.run_id, row: h.row, k }) }, "more like this"));
        c.classList.add("hit");
        return c;
      })));
  } catch (err) {
    showError(out, err);
  }
}
