// Errors: per run, task and head, the confusion matrix; a cell lists its images; the most confidently wrong.
import { api, card, el, hashWith, showError } from "../app.js";

function choiceKey(c) { return `${c.run}\u0000${c.task}\u0000${c.head}`; }

export async function render(root, params) {
  const { choices } = await api("/api/errors/choices");
  if (!choices.length) {
    root.append(el("p", { class: "muted" }, "No predictions: start probe browse with --results DIR (from `probe evaluate --out DIR`)."));
    return;
  }
  const q = params.query;
  const current = choices.find((c) => c.run === q.run && c.task === q.task && c.head === q.head)
    || choices.find((c) => c.head === "lp") || choices[0];
  const select = el("select", { id: "errors-choice", on: { change: (e) => {
    const c = choices[Number(e.target.value)];
    location.hash = hashWith("errors", { run: c.run, task: c.task, head: c.head });
  } } }, ...choices.map((c, i) => el("option", { value: i, selected: choiceKey(c) === choiceKey(current) }, `${c.model} · ${c.task} · ${c.head}`)));
  root.append(el("div", { class: "controls" }, el("label", {}, "run · task · head ", select)));
  const base = `run=${encodeURIComponent(current.run)}&task=${encodeURIComponent(current.task)}&head=${encodeURIComponent(current.head)}`;
  const view = await api(`/api/errors?${base}`);
  root.append(el("h2", {}, `Confusion matrix (${view.wrong} of ${view.total} wrong)`),
    el("p", { class: "muted" }, "rows: true class, columns: predicted; click a cell to list its images"));
  if (view.options) {
    root.append(el("p", { class: "muted" }, "a caption task: classes are positions among each image's own caption options (an image page shows the texts)"));
  }
  const cellBox = el("div", { id: "cell-images" });
  const table = el("table", { class: "confusion" },
    el("tr", {}, el("th", {}, "true \\ predicted"), ...view.classes.map((c) => el("th", {}, c))));
  view.matrix.forEach((counts, i) => {
    table.append(el("tr", {}, el("th", {}, view.classes[i]), ...counts.map((n, j) => el("td", {
      class: `cell ${i === j ? "diag" : "off"} ${n ? "" : "zero"}`, data: { true: i, pred: j }, title: `${view.classes[i]} → ${view.classes[j]}`,
      on: { click: (e) => showCell(e.currentTarget, i, j) },
    }, String(n)))));
  });
  root.append(table, cellBox);

  async function showCell(td, i, j) {
    for (const t of table.querySelectorAll("td.selected")) t.classList.remove("selected");
    td.classList.add("selected");
    try {
      const res = await api(`/api/errors/cell?${base}&true=${i}&pred=${j}`);
      cellBox.replaceChildren(el("h3", {}, `true ${res.true}, predicted ${res.pred}: ${res.total} image(s)`),
        el("div", { class: "grid" }, ...res.rows.map((r) => card(view.run, r.row, `row ${r.row}`, r.image_id || ""))));
    } catch (err) { showError(cellBox, err); }
  }

  root.append(el("h2", {}, "Most confidently wrong"),
    el("p", { class: "muted" }, view.ranked_by === "centroid_margin"
      ? "ranked by embedding margin: cosine to the predicted class's centroid minus cosine to the true class's (predictions carry no score)"
      : `ranked by the predictions' ${view.ranked_by}`),
    el("div", { class: "grid", id: "most-wrong" }, ...view.most_wrong.map((r) =>
      card(view.run, r.row, `true: ${r.true}`, `pred: ${r.pred}`, `margin ${r.score === null ? "–" : r.score.toFixed(3)}`))));
}
