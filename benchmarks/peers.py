"""Our feature pass next to the peers users would pick instead, on the same checkpoint and images.

  pip install --no-deps clip-benchmark==1.6.2        # its feature pass needs only torch, tqdm, sklearn
  python benchmarks/peers.py [--model ViT-B-32] [--images 450] [--batch-size 64] [--workers 2] [--repeats 3]

Every measurement runs in a fresh process, interleaved over --repeats, after the model is loaded
(the same open_clip checkpoint, saved to a local file first):
  ours            `probe extract` into a new store: class-prompt encoding, images (decode,
                  intensity policy, preprocessing in loader workers, forward) and the
                  checksummed Zarr writes
  clip_benchmark  CLIP_benchmark 1.6.2's zero-shot feature pass on the same images as an image
                  folder: zero_shot_classifier (the same six templates) + run_classification,
                  amp off (its --no_amp, which a CPU needs)
clip-retrieval (2.45) is not installable here with its pins (wandb, sentence-transformers, numpy<2
and pyarrow<16 against this environment); README's benchmark section has the commands to try.
Prints wall seconds (medians) and ours / peer per repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_folder(root: Path, n: int) -> None:
    """The bundled sample's first n images as an image folder (one subfolder per class)."""
    from mubench_probe.datasets import load_dataset

    ds = load_dataset("sample", limit=n)
    for i in range(len(ds)):
        label = str(ds.meta["label_name"].iloc[i]).replace(" ", "_")
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:05d}.jpg").write_bytes(ds.reader.read(i))


def child(which: str, arch: str, ckpt: str, folder: str, batch: int, workers: int) -> float:
    import torch

    from mubench_probe.config import DEFAULT_TEMPLATES
    from mubench_probe.tasks import class_text

    if which == "ours":
        from mubench_probe import api
        from mubench_probe.encoders import load_encoder

        enc = load_encoder(f"{arch}:{ckpt}", device="cpu")
        ds = api.open_dataset(folder)
        with tempfile.TemporaryDirectory() as d:
            st = api._created(f"{d}/s.zarr")
            t0 = time.perf_counter()
            api._extract_with(enc, ds, st, api.ExtractConfig(batch_size=batch, num_workers=workers))
            return time.perf_counter() - t0
    import open_clip
    from clip_benchmark.metrics import zeroshot_classification as zs

    from mubench_probe.encoders.openclip import register_bundled_configs

    register_bundled_configs()  # the tiny test architecture, if asked for
    from torchvision.datasets import ImageFolder

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=ckpt)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    data = ImageFolder(folder, transform=preprocess)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers)
    templates = [t.replace("{}", "{c}") for t in DEFAULT_TEMPLATES]
    t0 = time.perf_counter()
    clf = zs.zero_shot_classifier(model, tokenizer, [class_text(c) for c in data.classes], templates, "cpu", amp=False)
    zs.run_classification(model, clf, loader, "cpu", amp=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init, saved to a file)")
    ap.add_argument("--images", type=int, default=450)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, arch, ckpt, folder, batch, workers = args.child
        print(json.dumps(child(which, arch, ckpt, folder, int(batch), int(workers))))
        return
    peers = ["ours"]
    try:
        import clip_benchmark  # noqa: F401

        peers.append("clip_benchmark")
    except ImportError:
        print("CLIP_benchmark is not installed: pip install --no-deps clip-benchmark==1.6.2")
    import open_clip
    import torch

    from mubench_probe.encoders.openclip import register_bundled_configs

    register_bundled_configs()
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ckpt = Path(d) / "weights.pt"
        torch.save(open_clip.create_model(args.model).state_dict(), ckpt)
        folder = Path(d) / "images"
        write_folder(folder, args.images)
        times: dict[str, list[float]] = {p: [] for p in peers}
        for r in range(args.repeats):
            for peer in peers:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    peer,
                    args.model,
                    str(ckpt),
                    str(folder),
                    str(args.batch_size),
                    str(args.workers),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
                times[peer].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"repeat {r} {peer:15s} {times[peer][-1]:7.2f} s", flush=True)
    print(
        f"\n{args.model} (random init, local checkpoint), {args.images} images, batch {args.batch_size}, "
        f"{args.workers} workers; wall seconds after model load, median of {args.repeats}:"
    )
    for peer in peers:
        print(f"  {peer:15s} {statistics.median(times[peer]):7.2f} s")
    for peer in peers[1:]:
        ratios = [a / b for a, b in zip(times["ours"], times[peer], strict=True)]
        print(f"  ours / {peer}: {statistics.median(ratios):.2f} (per repeat {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
