// Overview: runs (model x dataset) with provenance, tasks, and the headline results with CIs.
// Every result cell links to the errors view of that run, task and head (the images behind the number).
import { api, el, fmt, hashWith, link } from "../app.js";

export async function render(root, params) {
  const metric = params.query.metric || "accuracy";
  const data = await api(`/api/overview?metric=${encodeURIComponent(metric)}`);
  root.append(el("h2", {}, "Runs"));
  const runs = el("table", { class: "runs" },
    el("tr", {}, ...["model", "dataset", "split", "rows", "failed", "status", "text", "provenance"].map((h) => el("th", {}, h))));
  for (const r of data.runs) {
    const prov = Object.entries(r.provenance).filter(([k]) => !["model_spec", "split"].includes(k))
      .map(([k, v]) => el("div", {}, el("span", { class: "muted" }, `${k}: `), String(v)));
    runs.append(el("tr", { data: { run: r.id } },
      el("td", {}, r.model), el("td", {}, r.dataset), el("td", {}, r.split),
      el("td", { class: "num" }, r.rows), el("td", { class: "num" }, r.failed),
      el("td", { class: r.status === "complete" ? "good" : "bad" }, r.status),
      el("td", {}, r.has_text ? "yes" : "no"),
      el("td", {}, el("details", {}, el("summary", {}, "show"), ...prov))));
  }
  root.append(runs);
  for (const note of data.notes || []) root.append(el("p", { class: "error" }, note));

  const head = data.headline;
  root.append(el("h2", {}, "Results"));
  if (!head.rows.length) {
    root.append(el("p", { class: "muted" }, data.results_dir
      ? "No results for this metric." : "No results folder: start with --results DIR (from `probe evaluate --out DIR`)."));
  } else {
    const select = el("select", { id: "metric", on: { change: (e) => { location.hash = hashWith("overview", { metric: e.target.value }); } } },
      ...head.metrics.map((m) => el("option", { value: m, selected: m === head.metric }, m)));
    root.append(el("div", { class: "controls" }, el("label", {}, "metric ", select),
      el("span", { class: "muted" }, "value [95% CI] on all rows; click a value to see the images behind it")));
    const table = el("table", { class: "results" },
      el("tr", {}, el("th", {}, "task"), el("th", {}, "head"), ...head.columns.map((c) => el("th", {}, `${c.model} · ${c.dataset}`))));
    for (const row of head.rows) {
      const cells = head.columns.map((c) => {
        const v = row.cells[c.id];
        if (!v) return el("td", { class: "num muted" }, "–");
        const text = [fmt(v.value), el("span", { class: "ci" }, ` [${fmt(v.ci_low)}, ${fmt(v.ci_high)}]`)];
        return el("td", { class: "num" }, v.errors ? link(hashWith("errors", v.errors), ...text) : text);
      });
      table.append(el("tr", {}, el("td", {}, row.task), el("td", {}, row.head), ...cells));
    }
    root.append(table);
  }
  root.append(el("h2", {}, "Tasks"));
  const tasks = el("table", { class: "tasks" }, el("tr", {}, el("th", {}, "task"), el("th", {}, "rows"), el("th", {}, "heads")));
  for (const t of data.tasks) tasks.append(el("tr", {}, el("td", {}, t.task), el("td", { class: "num" }, fmt(t.rows, 0)), el("td", {}, t.heads.join(", "))));
  root.append(tasks);
}
