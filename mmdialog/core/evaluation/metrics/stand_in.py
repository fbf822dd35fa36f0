"""The stand-in feature network for FID / KID / IS when no Inception-v3
weights are given: a seeded random-init conv net. Its numbers are useful only
for relative comparisons inside one run, and are flagged "not comparable with
published FID/IS" everywhere they are reported."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NOT_COMPARABLE_NOTE = "not comparable with published FID/IS"


def to_uint8(images: Tensor) -> Tensor:
    """Convert (N,3,H,W) uint8 or float in [0, 1] images to uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)



class RandomConvFeatureExtractor(nn.Module):
    """Deterministic fallback feature network (**not comparable with published FID/IS**).

    A small conv net with weights drawn from a private ``torch.Generator``
    seeded with ``seed`` (global RNG untouched), so the same seed gives the
    same network everywhere. Input: uint8 (N,3,H,W); images are resized to
    ``resize`` x ``resize`` and mapped to [-1, 1]. Output:
    ``(features (N, num_features), logits (N, num_classes))`` - the logits feed
    the Inception Score; they are multiplied by ``logit_scale`` so that the
    class posteriors are not near-uniform (which would pin IS at 1).
    """

    comparable = False

    def __init__(
        self,
        num_features: int = 64,
        num_classes: int = 100,
        seed: int = 0,
        resize: int = 64,
        logit_scale: float = 10.0,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.logit_scale = logit_scale
        self.num_classes = num_classes
        self.resize = resize
        self.name = f"random-conv-fallback(seed={seed},d={num_features})"
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, num_features, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(num_features, num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim > 1:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        self.eval()
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = to_uint8(images).float() / 127.5 - 1.0
        x = nn.functional.interpolate(
            x, size=(self.resize, self.resize), mode="bilinear", align_corners=False
        )
        feats = self.body(x)
        return feats, self.logit_scale * self.head(feats)
