"""Agreement with the references users trust: open_clip's own zero-shot classifier."""

import numpy as np
import torch

from mubench_probe import api
from mubench_probe.config import DEFAULT_TEMPLATES
from mubench_probe.encoders import load_encoder
from mubench_probe.imaging import get_policy, load_rgb
from mubench_probe.protocol import EvalConfig
from mubench_probe.tasks import class_text

from .conftest import TINY

N = 48  # rows compared: every class of the sample, 22/17/9 (each row is one exact argmax comparison)


def test_zero_shot_equals_open_clip_build_zero_shot_classifier(tmp_path, sample):
    """fp32 store: our class-prompt zero-shot predicts exactly what open_clip's classifier + argmax does."""
    from open_clip import build_zero_shot_classifier

    ds = sample.head(N)  # = load_dataset("sample", limit=N)
    api.extract(TINY, ds, store=tmp_path / "s.zarr", num_workers=0, dtype="float32")
    res = api.evaluate(tmp_path / "s.zarr", EvalConfig(heads=("zs_prompt",), n_boot=0))
    ours = res.predictions[(res.predictions["head"] == "zs_prompt") & (res.predictions.task == "fine/bccd")]
    ours = ours.sort_values("row")

    enc = load_encoder(TINY, device="cpu")
    classes = sorted(set(ds.meta["label_name"]))
    with torch.no_grad():
        weights = build_zero_shot_classifier(
            enc.model, enc.tokenizer, [class_text(c) for c in classes], DEFAULT_TEMPLATES, device="cpu"
        )
        pixels = torch.stack([enc.transform(load_rgb(ds.reader.read(i), get_policy("percentile"))) for i in range(N)])
        logits = (enc.model.encode_image(pixels, normalize=True) @ weights).numpy()
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-6, "near-ties would make this comparison meaningless"
    assert ours.row.tolist() == list(range(N))
    assert (ours.y_pred.to_numpy() == logits.argmax(axis=1)).all()
    # not only the argmax: our classifier weights (from the store's text embeddings) are open_clip's
    from mubench_probe.heads import PromptZeroShot
    from mubench_probe.heads.zeroshot import template_indices
    from mubench_probe.store import EmbeddingStore
    from mubench_probe.tasks import prompt_texts

    (run,) = EmbeddingStore(tmp_path / "s.zarr").runs()
    idx = template_indices(run.texts(), prompt_texts(classes, DEFAULT_TEMPLATES))
    head = PromptZeroShot.from_templates(run.text_embeddings()[idx])
    np.testing.assert_allclose(head.weights_, weights.numpy().T, atol=2e-6)
    np.testing.assert_allclose(head.decision_function(run.image_embeddings()), logits, atol=5e-6)
