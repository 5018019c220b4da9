"""MaskCLIP+ students: a DeepLab-style decoder whose classifier is the frozen CLIP text embeddings.

Because the classifier is the text embeddings, a student predicts in CLIP's
label space from its first step. Two backbones:

* ``clip``: the frozen CLIP image tower's MaskCLIP dense features, the same
  forward pass the teacher uses, so training costs one CLIP pass per batch.
  The decoder is residual with a zero-initialised output, so at step 0 the
  student's argmax is exactly MaskCLIP's (without key smoothing or denoising).
* ``resnet50``/``resnet101``: torchvision ResNets at output stride 8 with a
  DeepLabv2 ASPP (dilations 6/12/18/24), the paper's set-up.

Checkpoints are self-describing: architecture, labels, text embeddings,
teacher and metrics travel with the weights, and load with ``weights_only``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .atomic import atomic_write
from .errors import InvalidOptionError, WeightsUnavailableError

log = logging.getLogger(__name__)

BACKBONES = ("clip", "resnet50", "resnet101")
CHECKPOINT_FORMAT = "maskclip-student/1"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StudentConfig:
    backbone: str = "clip"
    hidden: int = 256
    dilations: tuple[int, ...] = ()  # () picks the backbone's default
    initial_scale: float = 40.0  # temperature on cosine logits at the start of training
    backbone_weights: str | None = None  # a local ImageNet checkpoint for ResNet backbones

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise InvalidOptionError(f"backbone {self.backbone!r} is not one of {', '.join(BACKBONES)}.")

    @property
    def resolved_dilations(self) -> tuple[int, ...]:
        if self.dilations:
            return tuple(self.dilations)
        return (1, 2, 3) if self.backbone == "clip" else (6, 12, 18, 24)

    @property
    def stride(self) -> int | None:
        """Pixels per output cell for ResNets; ``None`` means the CLIP model's own grid."""
        return None if self.backbone == "clip" else 8


class ResidualASPP(nn.Module):
    """Parallel dilated 3x3 convolutions and a 1x1, concatenated, projected back and added."""

    def __init__(self, dim: int, hidden: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Conv2d(dim, hidden, 3, padding=d, dilation=d) for d in dilations] + [nn.Conv2d(dim, hidden, 1)]
        )
        self.project = nn.Conv2d(hidden * (len(dilations) + 1), dim, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(F.relu(torch.cat([branch(x) for branch in self.branches], dim=1)))


class DeepLabV2ASPP(nn.Module):
    """DeepLabv2's head: the sum of parallel dilated 3x3 convolutions."""

    def __init__(self, in_dim: int, out_dim: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(in_dim, out_dim, 3, padding=d, dilation=d) for d in dilations])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


class TextClassifier(nn.Module):
    """Cosine similarity to fixed, L2-normalised text embeddings, times a learned temperature."""

    def __init__(self, text: torch.Tensor, initial_scale: float) -> None:
        super().__init__()
        self.register_buffer("text", F.normalize(text.float(), dim=-1))
        self.log_scale = nn.Parameter(torch.tensor(math.log(initial_scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosine = torch.einsum("bdhw,cd->bchw", F.normalize(features, dim=1), self.text)
        return cosine * self.log_scale.exp()


class StudentNet(nn.Module):
    """``forward(pixels, clip_features) -> logits [B, C, h, w]``.

    ``pixels`` are ``[B, 3, H, W]`` RGB in 0..1 (ResNet backbones); ``clip_features``
    are MaskCLIP dense features ``[B, D, h, w]`` (the CLIP backbone).
    """

    def __init__(self, config: StudentConfig, text: torch.Tensor, pretrained_backbone: bool = True) -> None:
        super().__init__()
        self.config = config
        dim = text.shape[1]
        if config.backbone == "clip":
            self.backbone = None
            self.head: nn.Module = ResidualASPP(dim, config.hidden, config.resolved_dilations)
        else:
            self.backbone = _resnet(config, pretrained_backbone)
            self.head = DeepLabV2ASPP(2048, dim, config.resolved_dilations)
            self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.classifier = TextClassifier(text, config.initial_scale)

    @property
    def needs_clip_features(self) -> bool:
        return self.backbone is None

    def forward(self, pixels: torch.Tensor | None = None, clip_features: torch.Tensor | None = None) -> torch.Tensor:
        if self.backbone is None:
            if clip_features is None:
                raise ValueError("the CLIP-feature student needs clip_features")
            return self.classifier(self.head(clip_features))
        if pixels is None:
            raise ValueError("a ResNet student needs pixels")
        return self.classifier(self.head(self.backbone((pixels - self.mean) / self.std)))


def _resnet(config: StudentConfig, pretrained: bool) -> nn.Module:
    build = {"resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101}[config.backbone]
    net = build(weights=None, replace_stride_with_dilation=[False, True, True])
    state = _imagenet_weights(config) if pretrained else None
    if state is not None:
        net.load_state_dict(state)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def _imagenet_weights(config: StudentConfig) -> dict[str, torch.Tensor] | None:
    """ImageNet weights from a given file or torchvision's local cache; never downloaded here."""
    if config.backbone_weights:
        path = Path(config.backbone_weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"backbone weights {path} do not exist.")
        return torch.load(path, map_location="cpu", weights_only=True)
    enum = {"resnet50": torchvision.models.ResNet50_Weights, "resnet101": torchvision.models.ResNet101_Weights}
    weights = enum[config.backbone].IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    log.warning(
        "ImageNet weights for %s are not on this machine (looked for %s); the backbone starts from random "
        "weights and needs far more data. Put the file there (from %s) or pass backbone_weights.",
        config.backbone,
        cached,
        weights.url,
    )
    return None


@dataclass
class StudentCheckpoint:
    """A student and everything needed to use and judge it."""

    net: StudentNet
    labels: list[str]
    prompts: list[list[str]]
    teacher: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write atomically: a reader (or a crash) never sees a half-written file."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.net.config).items()
            },
            "labels": list(self.labels),
            "prompts": [list(p) for p in self.prompts],
            "text_embeddings": self.net.classifier.text.detach().cpu(),
            "teacher": dict(self.teacher),
            "metrics": dict(self.metrics),
            "info": dict(self.info),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
        }
        atomic_write(Path(path), lambda handle: torch.save(payload, handle))

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> StudentCheckpoint:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsUnavailableError(f"student checkpoint {path} does not exist.") from None
        except Exception as exc:
            raise WeightsUnavailableError(f"student checkpoint {path} could not be read: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise WeightsUnavailableError(f"{path} is not a MaskCLIP student checkpoint ({CHECKPOINT_FORMAT}).")
        config_fields = dict(payload["config"])
        config_fields["dilations"] = tuple(config_fields.get("dilations", ()))
        config = StudentConfig(**{**config_fields, "backbone_weights": None})
        # The trained weights replace any ImageNet initialisation, so none is looked up.
        net = StudentNet(config, payload["text_embeddings"], pretrained_backbone=False)
        net.load_state_dict(payload["state_dict"])
        net.to(device).eval().requires_grad_(False)
        return cls(net, payload["labels"], payload["prompts"], payload["teacher"], payload["metrics"], payload["info"])
