"""How close a model's bare forward runs to this CPU's own float32 GEMM peak.

peers.py shows every tool bound by the same forward; this script says whether that forward
could go faster: it measures the machine's GEMM peak (torch matmul, all cores), profiles the
forward at one batch (share of time in GEMM-like ops and their GFLOP/s, from the profiler's
FLOP counts) and times, through the encoder's own `encode_images`, the variants that keep
float32 numerics (MHA fast path on/off, channels_last memory format) next to one that does not
(bf16 autocast). Medians of --repeats, all in this one process.

  python benchmarks/forward_limit.py [--models ViT-B-32:random efficientnet-lite0:imagenet] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(__file__))
from search_speed import median_time  # the same timing loop

GEMM_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution"}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, thread pool start
    return median_time(fn, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ViT-B-32:random", "efficientnet-lite0:imagenet"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    from mubench_probe import allocator

    allocator.tune()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for m, k, n in ((2048, 2048, 2048), (3200, 3072, 768), (3200, 768, 3072)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        s = median_seconds(lambda a=a, b=b: a @ b, args.repeats)
        print(f"  float32 GEMM {m}x{k} @ {k}x{n}: {2 * m * k * n / s / 1e9:6.0f} GFLOP/s")

    for spec in args.models:
        limit(spec, args.batch_size, args.repeats)


def limit(spec: str, batch: int, repeats: int) -> None:
    """Profile one model's forward and time its variants."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mubench_probe.encoders import load_encoder
    from mubench_probe.extraction import input_shape

    enc = load_encoder(spec, device="cpu")
    module = getattr(enc, "model", None) or enc.net
    x = torch.randn(batch, *input_shape(enc))

    def forward(cast=nullcontext, inputs=x):
        with cast():
            enc.encode_images(inputs)

    forward()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(2):
            forward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = [e for e in events if e.key in GEMM_OPS]
    gemm_us = sum(e.self_cpu_time_total for e in gemm)
    gemm_flops = sum(e.flops for e in gemm)
    print(
        f"{spec}, batch {batch}: {gemm_us / total:.0%} of the forward's time in GEMM/convolution ops "
        f"at {gemm_flops / (gemm_us * 1e-6) / 1e9:.0f} GFLOP/s (as the profiler counts their FLOPs)"
    )
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]:
        print(f"  {e.key:40s} {e.self_cpu_time_total / total:6.1%}")

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    variants = {"float32 as shipped": (True, nullcontext, x)}
    if any(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules()):
        variants["float32, MHA fast path off (SDPA)"] = (False, nullcontext, x)
    variants["float32, channels_last"] = (True, nullcontext, x.contiguous(memory_format=torch.channels_last))
    variants["bf16 autocast (other numbers)"] = (True, bf16, x)
    for name, (fast, cast, inputs) in variants.items():
        torch.backends.mha.set_fastpath_enabled(fast)
        if inputs is not x:
            module.to(memory_format=torch.channels_last)
        s = median_seconds(lambda cast=cast, inputs=inputs: forward(cast, inputs), repeats)
        module.to(memory_format=torch.contiguous_format)
        torch.backends.mha.set_fastpath_enabled(True)
        print(f"  {name:40s} {batch / s:6.1f} img/s")


if __name__ == "__main__":
    main()
