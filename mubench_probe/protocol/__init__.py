"""The evaluation protocol over arrays: rows, folds, heads, metrics and alignment for one task.

Pure functions: embeddings, labels and metadata in, long-format records out. The runner
(`evaluation.py`) reads the store and writes results; nothing here does I/O or touches a model.

What each protocol measures (every head of a task is scored on the same test rows, so
`lp - zs` compares like with like):
- kfold (default): every row gets one out-of-fold prediction from stratified k-fold. Coarse
  attributes (modality, stain, ...) coincide with source datasets, so their folds are grouped
  by `dataset`: a probe is then tested on sources it never saw, and measures whether the
  attribute transfers across sources, not whether the source can be recognised. Only classes
  that occur in at least two sources can be tested that way; the others are excluded (noted).
- split: train on the rows whose `split` is train/val, test on the `split == test` rows.
- transfer: train on rows matching --train-where, test on rows matching --test-where (e.g.
  train on one stain, test on another), over the classes both sides share.
A class absent from a training fold is never predicted by a probe; its test rows count as
errors and a note says so. Anything a head cannot do becomes a note, never a crash.

Modules: `arrays` (TaskArrays, Output), `plan` (rows, classes and folds per protocol), `heads`
(one registered runner per task head, see `head_specs`), `task` (`evaluate_task`), `captions`
(the μ-Bench caption protocol and caption retrieval).
"""

from ..config import EvalConfig
from .arrays import NOTE_KINDS, Output, TaskArrays
from .captions import CAPTION_RUNNERS, caption_groups, caption_keys, evaluate_captions, evaluate_retrieval
from .heads import (
    CALIBRATION_BINS,
    HEAD_ERRORS,
    RECALL_QUERIES,
    RUNNERS,
    HeadRun,
    knn_for,
    probe_for,
    run_few_shot,
    run_knn,
    run_linear_probe,
)
from .plan import (
    TRAIN_SPLITS,
    Folds,
    TaskPlan,
    batch_column,
    check_protocol,
    few_shot_indices,
    groups_of,
    plan_task,
    task_config,
    test_mask,
    train_mask,
)
from .task import ALIGNMENT, evaluate_task

__all__ = [
    "ALIGNMENT",
    "CALIBRATION_BINS",
    "CAPTION_RUNNERS",
    "HEAD_ERRORS",
    "NOTE_KINDS",
    "RECALL_QUERIES",
    "RUNNERS",
    "TRAIN_SPLITS",
    "EvalConfig",
    "Folds",
    "HeadRun",
    "Output",
    "TaskArrays",
    "TaskPlan",
    "batch_column",
    "caption_groups",
    "caption_keys",
    "check_protocol",
    "evaluate_captions",
    "evaluate_retrieval",
    "evaluate_task",
    "few_shot_indices",
    "groups_of",
    "knn_for",
    "plan_task",
    "probe_for",
    "run_few_shot",
    "run_knn",
    "run_linear_probe",
    "task_config",
    "test_mask",
    "train_mask",
]
