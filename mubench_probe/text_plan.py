"""The text table of a run: every class prompt and caption option the heads need, built once
from the dataset at extraction (texts are embedded once per run, whichever head uses them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .datasets import LoadedDataset
from .tasks import derive_tasks, prompt_texts, unique_texts


def caption_tables(ds: LoadedDataset, text_index: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per caption key: (N, K) option text indices (-1 pad) and the answer index (-1 if null)."""
    out = {}
    for key, items in ds.captions.items():
        k = max((len(it.options) for it in items if it is not None), default=1)
        options = np.full((len(items), k), -1, dtype=np.int32)
        answer = np.full(len(items), -1, dtype=np.int32)
        for i, it in enumerate(items):
            if it is None or not 0 <= it.answer_idx < len(it.options):
                continue
            options[i, : len(it.options)] = [text_index[o] for o in it.options]
            answer[i] = it.answer_idx
        out[key] = (options, answer)
    return out


def plan_texts(ds: LoadedDataset, templates: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Every unique text the heads need, and the class-prompt plan (task -> classes)."""
    tasks = derive_tasks(ds.meta)
    options = (it.options for items in ds.captions.values() for it in items if it is not None)
    prompts = (t for task in tasks for row in prompt_texts(task.classes, templates) for t in row)
    texts = unique_texts([prompts, (o for opts in options for o in opts)])
    plan = {"templates": list(templates), "tasks": {t.name: list(t.classes) for t in tasks}}
    return texts, plan
