"""The head registry's declarative half: every head's name, what it needs and what it reports.

A leaf module (no package imports), so that `config.py` can validate `--head` names and the CLI
can list them without loading any estimator. The other half, how each head runs on a task, is
registered by name in `protocol/heads.py` (`@runs("name")`, which refuses a name not declared
here); `tests/test_head_registry.py` checks the two halves agree. Adding a head: one `HeadSpec`
below and one runner there; nothing else chooses heads by name.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a head can need from a task before it can run. Unmet needs are reported by the protocol:
# "prompts" (class-prompt text embeddings) as a note, "batches" (two or more values of the batch
# column) silently, "folds" (training folds of the protocol) with the probes' fold note.
NEEDS = ("folds", "prompts", "batches")
SCOPES = ("task", "captions")


@dataclass(frozen=True)
class HeadSpec:
    """One head: `scope` "task" runs per classification task on its rows and folds; "captions"
    runs once per run over the μ-Bench per-image caption options. `metrics` names the rows it
    writes (a `@k` suffix per --knn-k), `label` is how reports title it."""

    name: str
    scope: str
    label: str
    metrics: tuple[str, ...]
    needs: frozenset[str] = frozenset()
    uses_c_grid: bool = False  # fits a linear probe: the probe backend and C grid key its cache
    calibrated: bool = False  # writes ECE and a reliability curve
    help: str = ""

    def __post_init__(self) -> None:
        if self.scope not in SCOPES or not set(self.needs) <= set(NEEDS):
            raise ValueError(f"head {self.name}: scope must be one of {SCOPES} and needs within {NEEDS}")


_CLASSIFICATION = ("accuracy", "balanced_accuracy", "macro_f1")

# In the order the protocol runs them on a task (alignment measures need zs and the probes first).
HEAD_SPECS: dict[str, HeadSpec] = {
    s.name: s
    for s in (
        HeadSpec(
            "zs_caption",
            "captions",
            "zero-shot (captions)",
            ("accuracy", "ci_half_width", "ece"),
            calibrated=True,
            help="μ-Bench protocol: pick each image's caption among its own options",
        ),
        HeadSpec(
            "retrieval",
            "captions",
            "caption retrieval",
            ("recall@1", "recall@5", "recall@10", "mAP"),
            help="image→text and text→image recall and mAP per caption key",
        ),
        HeadSpec(
            "zs_prompt",
            "task",
            "zero-shot (prompts)",
            (*_CLASSIFICATION, "ece", "template_spread", "template_std", "modality_gap"),
            needs=frozenset({"prompts"}),
            calibrated=True,
            help="class prompts from the stored templates, cosine argmax",
        ),
        HeadSpec(
            "batch",
            "task",
            "batch effect",
            ("same_class", "same_batch", "robustness_index", "knn_minus_nsb"),
            needs=frozenset({"batches"}),
            help="neighbourhood share of class vs batch (PathoROB robustness index)",
        ),
        HeadSpec(
            "map",
            "task",
            "phenotypic mAP",
            ("mAP", "p_value", "q_value", "fraction_q<0.05"),
            needs=frozenset({"batches"}),
            help="copairs-style retrieval mAP per class across batches, permutation null",
        ),
        HeadSpec(
            "lp",
            "task",
            "linear probe",
            (*_CLASSIFICATION, "ece", "chosen_C", "C_at_edge"),
            needs=frozenset({"folds"}),
            uses_c_grid=True,
            calibrated=True,
            help="out-of-fold logistic regression, C chosen on inner validation",
        ),
        HeadSpec(
            "proto",
            "task",
            "prototypes",
            _CLASSIFICATION,
            needs=frozenset({"folds"}),
            help="nearest class mean of the training fold (cosine)",
        ),
        HeadSpec(
            "knn",
            "task",
            "kNN",
            (*_CLASSIFICATION, "index_recall@10"),
            needs=frozenset({"folds"}),
            help="temperature-weighted kNN, every k from one search",
        ),
        HeadSpec(
            "fewshot",
            "task",
            "few-shot",
            ("accuracy", "chosen_C"),
            needs=frozenset({"folds"}),
            uses_c_grid=True,
            help="k shots per class: linear probe and prototypes, several seeds",
        ),
    )
}

# Public order of head names (help texts, `--head` choices): captions first, then task heads.
HEADS: tuple[str, ...] = ("zs_caption", "zs_prompt", "lp", "knn", "proto", "fewshot", "retrieval", "batch", "map")
PROBE_HEADS = frozenset(n for n, s in HEAD_SPECS.items() if "folds" in s.needs)
C_GRID_HEADS = frozenset(n for n, s in HEAD_SPECS.items() if s.uses_c_grid)


def heads_of(scope: str) -> tuple[HeadSpec, ...]:
    """The heads of one scope, in the order the protocol runs them."""
    return tuple(s for s in HEAD_SPECS.values() if s.scope == scope)
