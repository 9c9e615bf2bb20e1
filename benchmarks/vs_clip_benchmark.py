"""Our numbers next to CLIP_benchmark's, on the same weights, images and prompts.

  pip install --no-deps clip-benchmark==1.6.2   # its zero-shot code needs only torch, tqdm, scikit-learn
  python benchmarks/vs_clip_benchmark.py [--model ViT-B-32:/path/weights.bin] [--dataset sample] [--limit 450]

Both sides embed the images with the model's own preprocessing and build the class-prompt
zero-shot classifier from the same templates (ours: `tasks.DEFAULT_TEMPLATES`). CLIP_benchmark
runs with amp off (its `--no_amp`): autocast on a CPU changes the numbers. Our store is float32
here so that nothing but the code differs. CLIP_benchmark's linear probe trains with SGD on
CUDA and is not compared; our probe is checked against plain scikit-learn in the tests.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from mubench_probe import api
from mubench_probe.config import DEFAULT_TEMPLATES
from mubench_probe.encoders import load_encoder
from mubench_probe.imaging import get_policy, load_rgb
from mubench_probe.protocol import EvalConfig
from mubench_probe.tasks import class_text


class Images(torch.utils.data.Dataset):
    def __init__(self, ds, transform, labels):
        self.ds, self.transform, self.labels = ds, transform, labels

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.transform(load_rgb(self.ds.reader.read(i), get_policy("percentile"))), int(self.labels[i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mubench-tiny-vit:random", help="an open_clip spec (zoo tag, local weights)")
    ap.add_argument("--dataset", default="sample")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    try:
        from clip_benchmark.metrics import zeroshot_classification
    except ImportError:
        raise SystemExit("install CLIP_benchmark first: pip install --no-deps clip-benchmark==1.6.2") from None

    ds = api.open_dataset(args.dataset, limit=args.limit)
    with tempfile.TemporaryDirectory() as d:
        api.extract(args.model, ds, store=f"{d}/s.zarr", num_workers=0, dtype="float32")
        res = api.evaluate(f"{d}/s.zarr", EvalConfig(heads=("zs_prompt", "lp", "knn"), n_boot=0))
    t = res.table
    fine = sorted(task for task in set(t.task) if task.startswith("fine/"))
    enc = load_encoder(args.model, device="cpu")
    for task in fine:
        source = task.removeprefix("fine/")
        rows = np.flatnonzero(ds.meta["dataset"].astype(str) == source)
        classes = sorted(set(ds.meta["label_name"].iloc[rows]))
        labels = np.full(len(ds), -1)
        labels[rows] = [classes.index(c) for c in ds.meta["label_name"].iloc[rows]]
        subset = torch.utils.data.Subset(Images(ds, enc.transform, labels), rows.tolist())
        subset.classes = classes  # CLIP_benchmark reads dataset.classes
        loader = torch.utils.data.DataLoader(subset, batch_size=64)
        templates = [tmpl.replace("{}", "{c}") for tmpl in DEFAULT_TEMPLATES]  # CLIP_benchmark's placeholder
        names = [class_text(c) for c in classes]
        # CLIP_benchmark 1.6.2's evaluate() fails under NumPy >= 2.4 in its accuracy() (float() of a
        # 1-element array); its classifier and image pass are what matter, so call those two.
        clf = zeroshot_classification.zero_shot_classifier(enc.model, enc.tokenizer, names, templates, "cpu", amp=False)
        logits, target = zeroshot_classification.run_classification(enc.model, clf, loader, "cpu", amp=False)
        pred, target = logits.argmax(dim=1).numpy(), target.numpy()
        recall = [(pred[target == c] == c).mean() for c in np.unique(target)]
        theirs = {"acc1": float((pred == target).mean()), "mean_per_class_recall": float(np.mean(recall))}

        def ours(head: str, metric: str = "accuracy", task: str = task) -> float:
            sel = t[
                (t.task == task) & (t["head"] == head) & (t.metric == metric) & (t.stratum == "all") & t.seed.isna()
            ]
            return float(sel.value.iloc[0])

        print(f"{args.model} on {task} ({len(rows)} images, {len(classes)} classes)")
        print(f"  zero-shot top-1      ours {ours('zs_prompt'):.4f}   CLIP_benchmark {theirs['acc1']:.4f}")
        print(
            f"  balanced accuracy    ours {ours('zs_prompt', 'balanced_accuracy'):.4f}   "
            f"CLIP_benchmark mean per-class recall {theirs['mean_per_class_recall']:.4f}"
        )
        mine = res.predictions[(res.predictions.task == task) & (res.predictions["head"] == "zs_prompt")]
        mine = mine.set_index("row").loc[rows, "y_pred"].to_numpy()
        print(f"  same prediction on {int((mine == pred).sum())} of {len(rows)} images")
        print(f"  linear probe {ours('lp'):.4f}, kNN@10 {ours('knn@10'):.4f} (ours only)")


if __name__ == "__main__":
    main()
