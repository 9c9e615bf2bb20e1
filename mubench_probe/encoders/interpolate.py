"""Weight-space interpolation between a base and a fine-tuned open_clip model (WiSE-FT style).

`interp(BASE, FINETUNED, ALPHA)` is a model spec like any other: its weights are
`(1 - ALPHA) * base + ALPHA * finetuned` for floating-point tensors, and the base's value for
integer buffers. The spec records both parents and ALPHA, so the store's provenance says exactly
what was mixed. Sweeps reuse one `Interpolator`, which holds the two source state dicts and one
output model and rewrites the output's weights in place for each ALPHA.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

from ..errors import ModelUnavailableError
from .openclip import OpenClipEncoder

_SPEC = re.compile(
    r"^interp\((?P<base>.+?),\s*(?P<ft>.+?),\s*(?P<alpha>[-+0-9.eE]+)"
    r"(?:,\s*preprocess=(?P<pre>base|finetuned))?\)$"
)


@dataclass(frozen=True)
class InterpSpec:
    base: str
    finetuned: str
    alpha: float
    preprocess: str = "base"

    def __str__(self) -> str:
        extra = "" if self.preprocess == "base" else f", preprocess={self.preprocess}"
        return f"interp({self.base}, {self.finetuned}, {self.alpha:g}{extra})"


def parse_interp(spec: str) -> InterpSpec:
    m = _SPEC.match(spec.strip())
    if not m:
        raise ModelUnavailableError(f"{spec!r} is not interp(BASE, FINETUNED, ALPHA[, preprocess=base|finetuned])")
    return InterpSpec(m["base"].strip(), m["ft"].strip(), float(m["alpha"]), m["pre"] or "base")


def check_compatible(base: OpenClipEncoder, ft: OpenClipEncoder, preprocess: str | None) -> list[str]:
    """Everything that must match before mixing; returns the differences (empty = compatible)."""
    problems = []
    a, b = base.model.state_dict(), ft.model.state_dict()
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys())[:3], sorted(b.keys() - a.keys())[:3]
        problems.append(f"parameter names differ (only in base: {only_a}, only in fine-tuned: {only_b})")
    else:
        shapes = [k for k in a if a[k].shape != b[k].shape]
        if shapes:
            problems.append(f"parameter shapes differ ({shapes[:3]})")
    if (base.info.tokenizer, base.info.context_length) != (ft.info.tokenizer, ft.info.context_length):
        problems.append(
            f"tokenizers differ ({base.info.tokenizer}/{base.info.context_length} vs "
            f"{ft.info.tokenizer}/{ft.info.context_length})"
        )
    if base.info.preprocess != ft.info.preprocess and preprocess is None:
        problems.append("preprocessing differs: choose whose to use with preprocess=base|finetuned")
    return problems


class Interpolator:
    """Two source state dicts + one output model; `encoder(alpha)` rewrites the output in place."""

    def __init__(
        self, base: str, finetuned: str, device: torch.device, precision: str = "fp32", preprocess: str | None = None
    ) -> None:
        self.base_spec, self.ft_spec = base, finetuned
        out = OpenClipEncoder(base, device, precision)
        ft = OpenClipEncoder(finetuned, device, precision)
        problems = check_compatible(out, ft, preprocess)
        if problems:
            raise ModelUnavailableError(f"cannot interpolate {base} and {finetuned}: " + "; ".join(problems))
        self.preprocess = preprocess or "base"
        if self.preprocess == "finetuned":
            out.transform, out.info.preprocess = ft.transform, ft.info.preprocess
        self.base_sd = {k: v.detach().clone() for k, v in out.model.state_dict().items()}
        self.ft_sd = {k: v.detach() for k, v in ft.model.state_dict().items()}
        del ft  # only its state dict is kept
        self.out = out

    def encoder(self, alpha: float) -> OpenClipEncoder:
        if not 0.0 <= alpha <= 1.0:
            warnings.warn(f"alpha={alpha:g} is outside [0, 1]: extrapolating beyond the parents", stacklevel=2)
        with torch.no_grad():
            for name, tensor in self.out.model.state_dict().items():
                b = self.base_sd[name]
                if b.is_floating_point():
                    f = self.ft_sd[name].to(b.dtype)
                    tensor.copy_(b if alpha == 0.0 else f if alpha == 1.0 else b * (1.0 - alpha) + f * alpha)
                else:
                    tensor.copy_(b)  # integer buffers (e.g. position ids, counters) come from the base
        spec = InterpSpec(self.base_spec, self.ft_spec, alpha, self.preprocess)
        self.out.rename(str(spec), backend="interpolate")
        return self.out

    def save(self, path: str) -> str:
        """Save the current output weights as a checkpoint loadable with `ARCH:/path`."""
        torch.save(self.out.model.state_dict(), path)
        return path


def load_interpolated(spec: str, device: torch.device, precision: str = "fp32") -> OpenClipEncoder:
    """Registry entry: one `interp(...)` spec -> its encoder."""
    p = parse_interp(spec)
    return Interpolator(p.base, p.finetuned, device, precision, p.preprocess).encoder(p.alpha)
