"""One task, every requested head: the registry's task heads in order, then what compares them."""

from __future__ import annotations

from functools import partial

from ..config import EvalConfig
from ..head_specs import heads_of
from ..heads.metrics import paired_difference
from .arrays import Output, TaskArrays
from .heads import RUNNERS, HeadRun, guarded, missing_class_notes, per_batch
from .plan import batch_column, plan_task, task_config

# Alignment: how much of what a head decodes from the image the class prompts reach (paired on
# the same test rows). (head, result name) pairs, each against zs_prompt.
ALIGNMENT = (("lp", "lp_minus_zs"), ("proto", "proto_minus_zs"))


def evaluate_task(t: TaskArrays, cfg: EvalConfig) -> Output:
    """Every requested head on one task, plus the alignment and confounder measures between them.

    The task's own protocol and heads (a TaskSpec's overrides) replace the evaluation's here."""
    cfg = task_config(cfg, t.task)
    out = Output()
    plan = plan_task(t, cfg)
    kinds = plan.note_kinds + ["other"] * (len(plan.notes) - len(plan.note_kinds))
    for n, kind in zip(plan.notes, kinds, strict=True):
        out.note(n, kind)
    t = plan.arrays
    name = t.task.name
    if len(plan.test) == 0:
        if not plan.notes:
            out.note(f"{name}: no rows to test under --protocol {cfg.protocol}", "skipped")
        return out
    batch = plan.batch or batch_column(t.meta, cfg)
    batches = t.meta[batch].astype(str).to_numpy() if batch is not None else None
    h = HeadRun(out, t, plan, cfg, batch, batches)
    folds_announced = False
    for spec in heads_of("task"):
        if spec.name not in cfg.heads:
            continue
        if "folds" in spec.needs and not folds_announced:
            folds_announced = True
            if not _announce_folds(h):
                return out
        if "prompts" in spec.needs and t.prompt_emb is None:
            out.note(f"{name}: {spec.name} not applicable ({t.prompt_note or 'image-only model'})", "skipped")
            continue
        if "batches" in spec.needs and not h.many_batches:
            continue  # one batch: nothing to confound, nothing to say
        guarded(out, name, spec.name, partial(RUNNERS[spec.name], h))
    if not plan.folds:
        return out
    _alignment(h)
    if plan.batch is not None and batches is not None:
        per_batch(out, t, batches, plan.batch)
    return out


def _announce_folds(h: HeadRun) -> bool:
    """The probes' folds (or why there are none) and the classes a fold cannot train; False: no folds."""
    name = h.t.task.name
    if not h.plan.folds:
        h.out.note(f"{name}: probes skipped ({h.plan.how})", "skipped")
        return False
    h.out.note(f"{name}: probes use {h.plan.how}", "probe_folds")
    for n in missing_class_notes(h.t, h.plan.folds):
        h.out.note(n, "missing_class")
    return True


def _alignment(h: HeadRun) -> None:
    if "zs" not in h.correct:
        return
    test = h.plan.test
    for other, label in ALIGNMENT:
        if other in h.correct:
            d = paired_difference(
                h.correct[other][test], h.correct["zs"][test], h.cfg.n_boot, h.cfg.seed, ci_method=h.cfg.ci_method
            )
            h.out.add(h.t.task.name, "alignment", label, d["difference"])
            if other == "lp":
                h.out.add(h.t.task.name, "alignment", "zs_over_lp", d["ratio"])
