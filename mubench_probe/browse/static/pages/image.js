// Image: one row at full size (the run's intensity/channel policy; per-channel toggles for composites),
// its metadata, every head's prediction per model, and its nearest neighbours in each model side by side.
import { api, card, el, fmt, imageHash, link, thumb } from "../app.js";

export async function render(root, params) {
  const [runId, rowText] = params.path;
  if (!runId || rowText === undefined) {
    root.append(el("p", { class: "muted" }, "Open an image from the errors, map or search pages."));
    return;
  }
  const row = Number(rowText);
  const k = Number(params.query.k || 8);
  const v = await api(`/api/image/${encodeURIComponent(runId)}/${row}?k=${k}`);
  root.append(el("h2", {}, `${v.model} · row ${v.row}`),
    el("div", { class: "controls" },
      row > 0 ? link(imageHash(runId, row - 1), "← previous") : null,
      row + 1 < v.rows ? link(imageHash(runId, row + 1), "next →") : null));
  const layout = el("div", { class: "image-layout" });
  const pic = el("div", { class: "picture" });
  let full = thumb(runId, row, { size: 0 });
  full.className = "full";
  full.id = "full-image";
  pic.append(full);
  if (v.image_error) pic.append(el("p", { class: "error" }, v.image_error));
  if (v.channels.length > 3 || params.query.channels !== undefined) {
    const on = new Set(v.channels.map((c) => c.index));
    const toggles = el("div", { class: "controls", id: "channels" }, el("span", {}, "channels:"));
    for (const c of v.channels) {
      toggles.append(el("label", {}, el("input", { type: "checkbox", checked: true, data: { channel: c.index }, on: { change: (e) => {
        if (e.target.checked) on.add(c.index); else on.delete(c.index);
        const next = thumb(runId, row, { size: 0, channels: [...on].sort((a, b) => a - b) });
        next.className = "full"; next.id = "full-image";
        full.replaceWith(next); full = next;
      } } }), el("span", { class: "pill" }, `${c.index} ${c.colour}`)));
    }
    pic.append(toggles);
  }
  const meta = el("table", { class: "meta" }, el("tr", {}, el("th", {}, "column"), el("th", {}, "value")));
  for (const m of v.meta) meta.append(el("tr", {}, el("td", {}, m.column), el("td", {}, m.value === null ? "–" : String(m.value))));
  if (!v.valid) meta.append(el("tr", {}, el("td", {}, "embedding"), el("td", { class: "error" }, v.failure || "none")));
  layout.append(pic, el("div", {}, el("h3", {}, "Metadata"), meta));
  root.append(layout);

  root.append(el("h3", {}, "Predictions"));
  if (!v.predictions.length) root.append(el("p", { class: "muted" }, "No predictions for this row (start with --results DIR)."));
  else {
    const preds = el("table", { class: "predictions" },
      el("tr", {}, ...["model", "task", "head", "true", "predicted", ""].map((h) => el("th", {}, h))));
    for (const p of v.predictions) {
      preds.append(el("tr", {}, el("td", {}, p.model), el("td", {}, p.task), el("td", {}, p.head), el("td", {}, p.true),
        el("td", {}, p.pred), el("td", { class: p.correct ? "good" : "bad" }, p.correct ? "✓" : "✗")));
    }
    root.append(preds);
  }
  root.append(el("h3", {}, `Nearest neighbours (k=${k}, cosine)`));
  const nb = el("div", { class: "neighbours" });
  for (const n of v.neighbours) {
    nb.append(el("div", { data: { run: n.run } }, el("h4", {}, n.model),
      el("div", { class: "grid" }, ...n.hits.map((h) => card(n.run, h.row, `#${h.rank} ${fmt(h.score, 4)}`, h.label_name ?? "")))));
  }
  root.append(nb);
}
