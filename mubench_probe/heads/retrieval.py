"""Image<->text retrieval metrics over a similarity matrix.

Definitions (they differ across papers, so here is ours):
- image->text: each image queries the gallery of unique caption texts; its relevant item is
  its own correct caption (in μ-Bench, the option at `answer_idx`).
- text->image: each unique correct-caption text queries all images; relevant images are those
  whose correct caption is that text (for template captions: the images with that label).
- Recall@k: the fraction of queries with at least one relevant item in the top k.
- mAP: mean over queries of average precision over the full ranking.
Similarities are exact (`scoring`) and ties rank by item index, so results are identical on every CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .scoring import exact_scores, rank_rows

DEFAULT_KS = (1, 5, 10)


def ranking_metrics(sims: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """sims (Q, G) and a boolean relevance matrix (Q, G) -> Recall@k and mAP (queries without positives skipped)."""
    keep = relevant.any(axis=1)
    sims, relevant = sims[keep], relevant[keep]
    if len(sims) == 0:
        return {}
    order = rank_rows(sims, np.broadcast_to(np.arange(sims.shape[1]), sims.shape))
    rel = np.take_along_axis(relevant, order, axis=1)
    out = {f"R@{k}": float(rel[:, :k].any(axis=1).mean()) for k in ks}
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    ap = (rel * hits / ranks).sum(axis=1) / rel.sum(axis=1)
    out["mAP"] = float(ap.mean())
    out["queries"] = float(len(sims))
    return out


def caption_retrieval(
    image_emb: np.ndarray, text_emb: np.ndarray, positive_text: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[str, float]]:
    """Both directions for images whose correct caption is text `positive_text[i]` (-1 = none)."""
    ok = positive_text >= 0
    gallery = np.unique(positive_text[ok])
    if len(gallery) < 2:
        return {}
    img = image_emb[ok]
    pos = positive_text[ok]
    sims = exact_scores(img, text_emb[gallery])  # (images, texts)
    relevant = pos[:, None] == gallery[None, :]
    return {
        "image_to_text": ranking_metrics(sims, relevant, ks),
        "text_to_image": ranking_metrics(sims.T, relevant.T, ks),
    }
