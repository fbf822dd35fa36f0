"""The published-metrics path: the TF-ported Inception-v3
(``pt_inception-2015-12-05``) of ``torch-fidelity``, loaded from a local
weights file read without executing code (nothing is downloaded). Only this
network gives ``comparable = True`` FID / KID / IS."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmdialog.core.errors import ConfigError, DependencyError
from mmdialog.core.evaluation.metrics.stand_in import to_uint8

METRICS_EXTRA = "pip install 'mmdialog[metrics]'"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def require_torch_fidelity() -> Any:
    """The ``torch_fidelity`` module, or a one-line ``DependencyError``
    saying what to install (it imports torchvision, which must be the build
    made for the installed torch)."""
    try:
        import torch_fidelity
    except Exception as exc:  # ImportError, or a torchvision built for another torch failing at import
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DependencyError(f"comparable FID/IS need torch-fidelity and the torchvision built for your torch: "
                              f"{METRICS_EXTRA} (import failed: {cause})") from None
    return torch_fidelity


def load_inception_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict of torch-fidelity's Inception-v3 (``inception-v3-compat``,
    the TF 2015-12-05 graph that published FID/IS use) from a local file, read
    without executing code: safetensors, or ``torch.load(weights_only=True)``.
    A missing file, another format or another network is a one-line ``ConfigError``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Inception weights file not found: {p}; pass the local copy of {INCEPTION_FILE} "
                          "(README, Evaluation)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or safetensors header errors: all mean "not a weights file"
        raise ConfigError(f"{p}: not a readable weights file ({type(exc).__name__}); pass {INCEPTION_FILE} "
                          "or its safetensors conversion") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, Tensor) or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ConfigError(f"{p}: not torch-fidelity's Inception-v3 weights (expected Conv2d_1a_3x3.* … fc.weight "
                          f"of shape (1008, 2048)); pass {INCEPTION_FILE}")
    return state


@contextmanager
def fidelity_weights_file(path: str | Path) -> Iterator[str]:
    """A private copy of the weights holding only the tensors read safely by
    ``load_inception_weights``: torch-fidelity opens its weights path with
    ``weights_only=False``, so it never sees the user's file itself."""
    state = load_inception_weights(path)
    with tempfile.TemporaryDirectory(prefix="mmdialog-inception-") as tmp:
        copy = Path(tmp) / INCEPTION_FILE
        torch.save(state, copy)
        yield str(copy)


class TorchFidelityInceptionExtractor(nn.Module):
    """The TF-ported Inception-v3 used for published FID/IS (via ``torch-fidelity``).

    Wraps ``torch_fidelity.FeatureExtractorInceptionV3("inception-v3-compat",
    ["2048", "logits_unbiased"])`` with the weights of
    ``load_inception_weights``. Input uint8 (N,3,H,W) of any size
    (resized internally to 299). Output ``(pool features (N, 2048), logits (N, 1008))``.
    """

    comparable = True
    num_features = 2048

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        fidelity = require_torch_fidelity()
        with fidelity_weights_file(weights_path) as copy:
            self.net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                            feature_extractor_weights_path=copy)
        self.net.eval()
        self.name = f"inception-v3-compat({weights_path})"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats, logits = self.net(to_uint8(images))
        return feats.flatten(1), logits.flatten(1)
