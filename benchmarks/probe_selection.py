"""How the linear probe should choose C: accuracy, balanced accuracy or log-loss on validation rows.

  python benchmarks/probe_selection.py [--folds 5] [--quick]

Issue 18: on grouped folds (a coarse attribute constant within each source dataset) the probe,
choosing C by accuracy on held-out sources, scored the majority-class rate while proto
transferred. For every dataset below, in this one run: pooled out-of-fold accuracy and balanced
accuracy of `LinearProbe(select=...)` under each criterion, of plain scikit-learn with the same
inner protocol and criterion (`mubench_probe.testing.exhaustive_reference`: every C of the grid
fitted from scratch, tol 1e-8, ties to the smaller C), of a probe at the fixed C = 10^4, and of
proto (nearest class mean). On grouped data also the best fixed C in hindsight (the grid C with
the best pooled test accuracy): where even that is below proto, no way of choosing C reaches it.

- grouped: `confounded_sources` (one class per source, a source offset larger than the class
  signal, uneven sources per class and sizes), outer folds StratifiedGroupKFold by source as
  protocol `_plan_kfold`; the probe gets `groups` and validates C on held-out sources.
- stratified: `hard_embeddings` presets of tests/test_probe.py, StratifiedKFold; the probe
  validates on a stratified split of the training rows.

Prints a markdown table and the mean gap to proto per criterion (negative: below proto).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold

from mubench_probe.config import DEFAULT_CS, DEFAULT_PROBE_SELECT, PROBE_SELECTS
from mubench_probe.heads.linear import LinearProbe
from mubench_probe.heads.zeroshot import PrototypeHead
from mubench_probe.testing import confounded_sources, exhaustive_reference, grouped_folds, hard_embeddings

FIXED_C = 1e4
GROUPED = {
    "grouped 3 cl, 8 src, 256-d, seed 0": dict(seed=0),
    "grouped 3 cl, 8 src, 256-d, seed 1": dict(seed=1),
    "grouped 3 cl, 8 src, 256-d, seed 2": dict(seed=2),
    "grouped 2 cl, 6 src, 256-d, seed 0": dict(n_sources=6, classes=2, seed=0),
    "grouped 2 cl, 10 src, 768-d, seed 1": dict(n_sources=10, classes=2, dim=768, seed=1),
    "grouped 4 cl, 10 src, 256-d, seed 0": dict(n_sources=10, classes=4, seed=0),
    "grouped 5 cl, 12 src, 768-d, seed 0": dict(n_sources=12, classes=5, dim=768, seed=0),
    "grouped 3 cl, 10 src, 768-d, minority rows x0.3, seed 3": dict(n_sources=10, dim=768, minority_rows=0.3, seed=3),
    "grouped 3 cl, 12 src, 256-d, size spread 0.8, seed 4": dict(n_sources=12, spread=0.8, seed=4),
}
STRATIFIED = {  # tests/test_probe.py HARD
    "stratified 10 cl, 768-d, imbalanced": dict(n=900, dim=768, classes=10, seed=1),
    "stratified 13 cl, 1280-d, a class of 10 rows": dict(n=900, dim=1280, classes=13, signal=0.12, min_rows=10, seed=2),
    "stratified 7 cl, 512-d, anisotropic noise": dict(n=700, dim=512, classes=7, signal=0.15, decay=0.5, seed=3),
}
QUICK = ("grouped 3 cl, 8 src, 256-d, seed 2", "stratified 7 cl, 512-d, anisotropic noise")


def measure(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, folds: int) -> dict[str, dict]:
    """Pooled out-of-fold predictions of every method; {method: {"pred", "C" (chosen per fold)}}."""
    if groups is not None:
        splits = grouped_folds(y, groups, folds)
    else:
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=0).split(x, y))
    methods = ["proto", f"C={FIXED_C:g}", *(f"lp {s}" for s in PROBE_SELECTS), *(f"ref {s}" for s in PROBE_SELECTS)]
    out = {m: {"pred": np.empty(len(y), dtype=y.dtype), "C": []} for m in methods}
    fixed = {c: np.empty(len(y), dtype=y.dtype) for c in DEFAULT_CS} if groups is not None else {}
    for tr, te in splits:
        for c, pred in fixed.items():
            pred[te] = LinearProbe(C=c).fit(x[tr], y[tr]).predict(x[te])
        g = groups[tr] if groups is not None else None
        out["proto"]["pred"][te] = PrototypeHead().fit(x[tr], y[tr]).predict(x[te])
        out[f"C={FIXED_C:g}"]["pred"][te] = LinearProbe(C=FIXED_C).fit(x[tr], y[tr]).predict(x[te])
        for s in PROBE_SELECTS:
            p = LinearProbe(select=s).fit(x[tr], y[tr], groups=g)
            out[f"lp {s}"]["pred"][te] = p.predict(x[te])
            out[f"lp {s}"]["C"].append(p.C_)
        for s, (c, pred) in exhaustive_reference(x, y, tr, te, groups, PROBE_SELECTS).items():
            out[f"ref {s}"]["pred"][te] = pred
            out[f"ref {s}"]["C"].append(c)
    if fixed:
        best = max(fixed, key=lambda c: ((fixed[c] == y).mean(), -c))  # ties: the smaller C
        out["hindsight"] = {"pred": fixed[best], "C": [best]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK)}")
    args = ap.parse_args()
    data = {**{k: ("grouped", v) for k, v in GROUPED.items()}, **{k: ("stratified", v) for k, v in STRATIFIED.items()}}
    if args.quick:
        data = {k: data[k] for k in QUICK}
    print(f"default criterion (config.DEFAULT_PROBE_SELECT): {DEFAULT_PROBE_SELECT}\n")
    columns = ["dataset", "majority", "criterion", "lp acc", "lp bal acc", "sklearn ref acc", "proto acc"]
    columns += ["proto bal acc", "C median lp / ref"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    gaps: dict[str, dict[str, list[float]]] = {}
    ref_gaps: dict[str, list[float]] = {s: [] for s in PROBE_SELECTS}
    for name, (kind, kw) in data.items():
        t0 = time.perf_counter()
        if kind == "grouped":
            x, y, groups = confounded_sources(**kw)
        else:
            (x, y), groups = hard_embeddings(**kw), None
        res = measure(x, y, groups, args.folds)
        acc = {m: float((r["pred"] == y).mean()) for m, r in res.items()}
        bal = {m: float(balanced_accuracy_score(y, r["pred"])) for m, r in res.items()}
        majority = np.bincount(y).max() / len(y)
        label = f"{name} ({len(y)} rows)"
        for s in (*PROBE_SELECTS, f"C={FIXED_C:g}", *(["hindsight"] if "hindsight" in res else [])):
            m = f"lp {s}" if s in PROBE_SELECTS else s
            ref = f"{acc[f'ref {s}']:.3f}" if s in PROBE_SELECTS else ""
            if s in PROBE_SELECTS:
                cs = f"{np.median(res[m]['C']):g} / {np.median(res[f'ref {s}']['C']):g}"
            else:
                cs = f"{res[m]['C'][0]:g}" if res[m]["C"] else f"{FIXED_C:g}"
            crit = f"**{s}** (default)" if s == DEFAULT_PROBE_SELECT else s
            crit = "best fixed C in hindsight" if s == "hindsight" else crit
            print(
                f"| {label} | {majority:.3f} | {crit} | {acc[m]:.3f} | {bal[m]:.3f} | {ref} "
                f"| {acc['proto']:.3f} | {bal['proto']:.3f} | {cs} |"
            )
            gaps.setdefault(s, {}).setdefault(kind, []).append(acc[m] - acc["proto"])
            if s in PROBE_SELECTS:
                ref_gaps[s].append(acc[m] - acc[f"ref {s}"])
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    print()
    for s, by_kind in gaps.items():
        parts = []
        for kind in ("grouped", "stratified"):
            if kind in by_kind:
                g = np.array(by_kind[kind])
                parts.append(
                    f"{kind} {g.mean():+.3f} (worst {g.min():+.3f}, {int((g >= -0.02).sum())}/{len(g)} within 2 points)"
                )
        everything = np.concatenate([np.array(v) for v in by_kind.values()])
        line = f"mean gap to proto, {s}: {everything.mean():+.3f}; " + "; ".join(parts)
        if s in ref_gaps:
            line += f"; lp - sklearn reference: max |gap| {np.abs(ref_gaps[s]).max():.3f}"
        print(line)
    # no regression where validation is stratified: compare with accuracy selection
    for s in [s for s in PROBE_SELECTS if s != "accuracy"]:
        for kind in ("grouped", "stratified"):
            d = np.array(gaps[s].get(kind, [])) - np.array(gaps["accuracy"].get(kind, []))
            if len(d):
                print(f"{s} - accuracy selection, {kind}: mean {d.mean():+.3f}, min {d.min():+.3f}, max {d.max():+.3f}")


if __name__ == "__main__":
    main()
