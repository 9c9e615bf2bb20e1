"""Our feature pass next to the peers users would pick instead, on the same checkpoint and images.

  pip install --no-deps clip-benchmark==1.6.2        # its feature pass needs only torch, tqdm, sklearn
  # clip-retrieval pins numpy<2, pyarrow<16, sentence-transformers<3: give it its own environment
  # that reuses this one's torch, open_clip and numpy (the inference path runs with them):
  python -m venv --system-site-packages /tmp/cr
  /tmp/cr/bin/pip install --no-deps clip-retrieval==2.45.0 all_clip==1.3.0 clip-anytorch==2.6.0
  /tmp/cr/bin/pip install braceexpand fire "webdataset<0.3" sentence-transformers wandb \
      flask-restful flask-cors prometheus-client "setuptools<81"
  python benchmarks/peers.py [--clip-retrieval-python /tmp/cr/bin/python] [--model ViT-B-32]
      [--images 450] [--batch-size 64] [--workers 2] [--repeats 3]

Every measurement runs in a fresh process, interleaved over --repeats, after the model is loaded
(the same open_clip checkpoint, saved to a local file first):
  ours            `probe extract` into a new store: class-prompt encoding, images (decode,
                  intensity policy, preprocessing in loader workers, forward) and the
                  checksummed Zarr writes
  clip_benchmark  CLIP_benchmark 1.6.2's zero-shot feature pass on the same images as an image
                  folder: zero_shot_classifier (the same six templates) + run_classification,
                  amp off (its --no_amp, which a CPU needs)
  clip_retrieval  clip-retrieval 2.45's `inference` (files reader, image embeddings only, its
                  npy + parquet writer), the model pre-loaded through the same cached all_clip
                  loader its mapper calls, so its load and warm-up are not timed
  bare forward    the floor every tool shares: the model's encode_image over the same images,
                  decoded and preprocessed beforehand (no loader, no writes), with probe's
                  allocator settings (its fastest here; glibc's defaults cost ViT-B-32 ~10%)
Prints wall seconds (medians), ours / peer per repeat, and each tool against the bare forward.
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
    """One measurement in this (fresh) process: wall seconds of `which`'s feature pass."""
    if which == "clip_retrieval":  # runs in clip-retrieval's own interpreter
        from all_clip import load_clip
        from clip_retrieval.clip_inference.main import main as inference

        spec = f"open_clip:{arch}/{ckpt}"  # all_clip splits ARCH/CHECKPOINT at the first slash
        load_clip(clip_model=spec, use_jit=False, warmup_batch_size=batch, clip_cache_path=None)  # cached
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            inference(
                input_dataset=folder,
                output_folder=f"{d}/out",
                clip_model=spec,
                enable_text=False,
                batch_size=batch,
                num_prepro_workers=workers,
            )
            return time.perf_counter() - t0
    import torch

    from mubench_probe.config import DEFAULT_TEMPLATES
    from mubench_probe.tasks import class_text

    if which == "ours":
        from mubench_probe import api
        from mubench_probe.encoders import load_encoder
        from mubench_probe.extraction import extract_into

        enc = load_encoder(f"{arch}:{ckpt}", device="cpu")
        ds = api.open_dataset(folder)
        with tempfile.TemporaryDirectory() as d:
            st = api._created(f"{d}/s.zarr")
            t0 = time.perf_counter()
            extract_into(st, enc, ds, api.ExtractConfig(batch_size=batch, num_workers=workers))
            return time.perf_counter() - t0
    import open_clip

    from mubench_probe.encoders.openclip import register_bundled_configs

    register_bundled_configs()  # the tiny test architecture, if asked for
    if which == "forward":  # at its fastest: with probe's allocator settings (glibc's defaults churn)
        from PIL import Image

        from mubench_probe import allocator

        allocator.tune()
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=ckpt)
        model.eval()
        files = sorted(Path(folder).rglob("*.jpg"))
        x = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
        with torch.inference_mode():
            model.encode_image(x[:batch])  # warm-up, as the peers' loaders are
            t0 = time.perf_counter()
            for b in torch.split(x, batch):
                model.encode_image(b)
            return time.perf_counter() - t0
    from clip_benchmark.metrics import zeroshot_classification as zs
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
    ap.add_argument(
        "--clip-retrieval-python",
        default=sys.executable,
        help="the interpreter of an environment where clip-retrieval is installed (see above)",
    )
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, arch, ckpt, folder, batch, workers = args.child
        seconds = child(which, arch, ckpt, folder, int(batch), int(workers))
        print("\nRESULT " + json.dumps(seconds))  # a peer may print progress to stdout too
        return
    python = {"ours": sys.executable, "forward": sys.executable}
    try:
        import clip_benchmark  # noqa: F401

        python["clip_benchmark"] = sys.executable
    except ImportError:
        print("CLIP_benchmark is not installed: pip install --no-deps clip-benchmark==1.6.2")
    cr = args.clip_retrieval_python
    probe = subprocess.run([cr, "-c", "import clip_retrieval.clip_inference, all_clip"], capture_output=True)
    if probe.returncode == 0:
        python["clip_retrieval"] = cr
    else:
        print(f"clip-retrieval does not import in {cr}: see this script's docstring for its environment")
    peers = [p for p in python if p != "forward"]
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
        times: dict[str, list[float]] = {p: [] for p in python}
        whole: dict[str, list[float]] = {p: [] for p in python}  # the process: start, imports, load, pass
        for r in range(args.repeats):
            for peer in python:
                cmd = [
                    python[peer],
                    __file__,
                    "--child",
                    peer,
                    args.model,
                    str(ckpt),
                    str(folder),
                    str(args.batch_size),
                    str(args.workers),
                ]
                t0 = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
                whole[peer].append(time.perf_counter() - t0)
                times[peer].append(json.loads(out.stdout.rsplit("RESULT ", 1)[1]))
                print(f"repeat {r} {peer:15s} {times[peer][-1]:7.2f} s  whole {whole[peer][-1]:6.2f} s", flush=True)
    floor = times["forward"]
    print(
        f"\n{args.model} (random init, local checkpoint), {args.images} images, batch {args.batch_size}, "
        f"{args.workers} workers; wall seconds after model load and of the whole process, median of {args.repeats}:"
    )
    for peer in [*peers, "forward"]:
        print(f"  {peer:15s} {statistics.median(times[peer]):7.2f} s  {statistics.median(whole[peer]):7.2f} s")
    print("per repeat ratios (median, then each repeat):")
    for peer in peers[1:]:
        show("ours / " + peer, [a / b for a, b in zip(times["ours"], times[peer], strict=True)])
        show(f"ours / {peer}, whole process", [a / b for a, b in zip(whole["ours"], whole[peer], strict=True)])
    for peer in peers:
        show(f"bare forward / {peer}", [a / b for a, b in zip(floor, times[peer], strict=True)])
    print(
        "  (bare forward / tool: the share of the tool's time the model's own forward takes; no tool can go\n"
        "   below the forward, so ours / peer cannot be smaller than bare forward / peer with the same forward)"
    )


def show(name: str, ratios: list[float]) -> None:
    print(f"  {name:30s} {statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
