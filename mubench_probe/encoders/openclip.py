"""open_clip models: zoo tags, `hf-hub:` repos, local checkpoints and seeded random init."""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelUnavailableError
from .base import Encoder, EncoderInfo, memory_format_for, weights_hash

RANDOM_SEED = 0
_registered = False


def register_bundled_configs() -> None:
    """Make the package's tiny test architectures (e.g. `mubench-tiny-vit`) known to open_clip."""
    global _registered
    if not _registered:
        from importlib import resources

        import open_clip

        open_clip.add_model_config(Path(str(resources.files("mubench_probe") / "data" / "model_configs")))
        _registered = True


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`hf-hub:ORG/NAME` -> (spec, None); `ARCH:TAG|PATH|random` -> (ARCH, TAG)."""
    if spec.startswith("hf-hub:"):
        return spec, None
    arch, sep, tag = spec.partition(":")
    if not sep or not arch or not tag:
        raise ModelUnavailableError(
            f"model spec {spec!r} is not ARCH:PRETRAINED, ARCH:/path/to/weights, ARCH:random or "
            "hf-hub:ORG/NAME (see `probe models`)"
        )
    return arch, tag


def _help(spec: str) -> str:
    return (
        f"could not load weights for {spec!r}. Without network access, download the weights "
        "elsewhere and pass them as ARCH:/path/to/weights (e.g. ViT-B-32:/data/open_clip_model.bin); "
        "`probe models` lists architectures and tags"
    )


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """open_clip logs failures (e.g. every known tag) on the root logger; our error says it in one line."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(before)


def _closest(word: str, choices: Sequence[str]) -> str:
    near = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f"; closest: {', '.join(near)}" if near else ""


class OpenClipEncoder(Encoder):
    def __init__(self, spec: str, device: torch.device, precision: str = "fp32") -> None:
        import open_clip

        register_bundled_configs()
        self.device, self.precision = device, precision
        name, tag = parse_spec(spec)
        if tag is not None and name not in open_clip.list_models():
            raise ModelUnavailableError(
                f"unknown open_clip architecture {name!r} in {spec!r}{_closest(name, open_clip.list_models())}; "
                "`probe models --all` lists them"
            )
        pretrained: str | None = tag
        tried = f"open_clip tag {tag!r}"
        if tag == "random":
            pretrained, tried = None, "random init"
        elif tag is not None and (Path(tag).expanduser().exists() or "/" in tag or tag.startswith(".")):
            path = Path(tag).expanduser()
            if not path.is_file():
                raise ModelUnavailableError(f"checkpoint file {path} does not exist")
            pretrained, tried = str(path), f"local checkpoint {path}"
        elif tag is None:
            tried = "the Hugging Face Hub"
        elif tag not in (known := open_clip.list_pretrained_tags_by_model(name)):
            raise ModelUnavailableError(
                f"unknown open_clip tag {tag!r} for {name}{_closest(tag, known)}"
                f"{'' if known else ' (it has no pretrained tags)'}; use ARCH:TAG, ARCH:random or "
                "ARCH:/path/to/weights (`probe models --all` lists every tag)"
            )
        try:
            torch.manual_seed(RANDOM_SEED)
            with _quiet_logging():
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
                tokenizer = open_clip.get_tokenizer(name)
        except ModelUnavailableError:
            raise
        except Exception as exc:  # download, auth, bad tag, bad checkpoint: one clear message
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelUnavailableError(f"{_help(spec)} (tried {tried}: {first})") from exc
        model.eval()
        self.memory_format = memory_format_for(model.visual)
        self.model = model.to(device, memory_format=self.memory_format)
        self.transform = preprocess
        self.tokenizer = tokenizer
        ctx = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", None)
        with torch.inference_mode():
            size = getattr(self.model.visual, "image_size", 224)
            size = (size, size) if isinstance(size, int) else tuple(size)
            probe = torch.zeros(1, 3, *size)
            dim = int(self.model.encode_image(probe.to(device)).shape[-1])
        visual = self.model.visual
        proj = getattr(visual, "proj", None)
        self._proj = proj if isinstance(proj, torch.nn.Parameter) else None
        self.info = EncoderInfo(
            spec=spec,
            backend="open_clip",
            has_text=True,
            embed_dim=dim,
            weights_hash="",
            preprocess=repr(preprocess),
            tokenizer=f"{type(tokenizer).__name__}",
            context_length=int(ctx) if ctx else None,
            feature_dim=int(self._proj.shape[0]) if self._proj is not None else None,
        )
        self.rename(spec)

    def rename(self, spec: str, backend: str = "open_clip") -> None:
        """Record a new spec and re-hash the weights (after they were changed in place)."""
        self.info.spec, self.info.backend = spec, backend
        self.info.weights_hash = weights_hash(self.model)

    def _images(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not features:
            return self.model.encode_image(x), None
        if self._proj is None:
            raise ModelUnavailableError(
                f"pre-projection features are supported for ViT towers only, not {self.info.spec}"
            )
        # Run the tower without its projection, then apply it: exactly encode_image's output.
        visual = self.model.visual
        visual.proj = None
        try:
            feat = visual(x)
        finally:
            visual.proj = self._proj
        return feat @ self._proj, feat

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.info.embed_dim), dtype=np.float32)
        return np.concatenate(out)


def list_specs() -> list[str]:
    """Every `ARCH:TAG` the installed open_clip knows, plus the μ-Bench hub models."""
    import open_clip

    register_bundled_configs()
    return [f"{a}:{t}" for a, t in open_clip.list_pretrained()]
