"""MaskCLIP+ students: a DeepLab-style decoder whose classifier is the frozen CLIP text embeddings.

Because the classifier is the text embeddings, a student predicts in CLIP's
label space from its first step. Two backbones:

* ``clip``: the frozen CLIP image tower's MaskCLIP dense features, the same
  features the teacher uses, read from the feature store, so training needs
  no CLIP pass per step.
  The decoder is residual with a zero-initialised output, so at step 0 the
  student's argmax is exactly MaskCLIP's (without key smoothing or denoising).
* ``resnet50``/``resnet101``: torchvision ResNets at output stride 8 with a
  DeepLabv2 ASPP (dilations 6/12/18/24), the paper's set-up. BatchNorm is
  frozen (ImageNet statistics and affine), as DeepLabv2 trains it, so small
  batches are safe.

A label with synonyms scores its best synonym, in the student as in MaskCLIP's
own ``segment`` (one rule: :func:`maskclip_engine.segmenter.label_logits`).
Checkpoints: :mod:`.checkpoint`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskclip_engine.errors import InvalidOptionError, WeightsUnavailableError
from maskclip_engine.segmenter import label_logits

log = logging.getLogger(__name__)

BACKBONES = ("clip", "resnet50", "resnet101")
RANDOM_WEIGHTS = "random"  # backbone_weights value: start a ResNet from random weights on purpose
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StudentConfig:
    backbone: str = "clip"
    hidden: int = 256
    dilations: tuple[int, ...] = ()  # () picks the backbone's default
    initial_scale: float = 40.0  # temperature on cosine logits at the start of training
    # ResNet backbones: None fetches torchvision's IMAGENET1K_V1 (its cache, else a download), a path
    # loads that file, "random" starts from random weights.
    backbone_weights: str | None = None

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
    """Cosine similarity to fixed, L2-normalised text embeddings, times a learned temperature.

    ``text`` is ``[S, D]``, one row per synonym; ``owner[s]`` is the label of row
    ``s`` (``None``: one row per label). A label's logit is its best synonym's,
    computed by the teacher's own code so the two can never disagree.
    """

    def __init__(self, text: torch.Tensor, initial_scale: float, owner: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("text", F.normalize(text.float(), dim=-1))
        owner = torch.arange(text.shape[0]) if owner is None else torch.as_tensor(owner).long()
        if owner.shape != (text.shape[0],):
            raise ValueError(f"owner has shape {tuple(owner.shape)}; it needs one label index per text row")
        # Not in the state dict: checkpoints store it beside the weights, and format-1 ones never had it.
        self.register_buffer("owner", owner, persistent=False)
        self.num_labels = int(owner.max()) + 1
        self.log_scale = nn.Parameter(torch.tensor(math.log(initial_scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Always float32, also when the decoder before it runs under autocast: near-tied labels are decided as
        # in training.
        with torch.autocast(features.device.type, enabled=False):
            cosine = label_logits(features.float(), self.text, self.owner, self.num_labels)
            return cosine * self.log_scale.exp()


class StudentNet(nn.Module):
    """``forward(pixels, clip_features) -> logits [B, C, h, w]``.

    ``pixels`` are ``[B, 3, H, W]`` RGB in 0..1 (ResNet backbones); ``clip_features``
    are MaskCLIP dense features ``[B, D, h, w]`` (the CLIP backbone). ``text`` and
    ``owner`` are the per-synonym embeddings and their labels (see :class:`TextClassifier`).
    """

    def __init__(
        self,
        config: StudentConfig,
        text: torch.Tensor,
        pretrained_backbone: bool = True,
        owner: torch.Tensor | None = None,
    ) -> None:
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
        self.classifier = TextClassifier(text, config.initial_scale, owner)

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
    """Conv1 to layer4 at output stride 8 (layers 3 and 4 dilated), BatchNorm frozen.

    DeepLabv2 keeps ImageNet's BatchNorm statistics and affine fixed: the batches
    that fit (4 crops) are far too small to estimate statistics from.
    """
    build = {"resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101}[config.backbone]
    net = build(weights=None, replace_stride_with_dilation=[False, True, True], norm_layer=FrozenBatchNorm2d)
    state = _imagenet_weights(config) if pretrained else None
    if state is not None:
        missing, unexpected = net.load_state_dict(state, strict=False)
        # The ImageNet classifier (fc) is dropped below, so a file without it is fine.
        wrong = [k for k in missing + unexpected if not k.startswith("fc.")]
        if wrong:
            raise WeightsUnavailableError(
                f"backbone weights for {config.backbone} do not fit: missing or unexpected {wrong[:5]}"
                f"{' ...' if len(wrong) > 5 else ''}. Pass a torchvision {config.backbone} state dict."
            )
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def _imagenet_weights(config: StudentConfig) -> dict[str, torch.Tensor] | None:
    """ImageNet weights: a given file, or torchvision's ``IMAGENET1K_V1`` (its cache, else downloaded)."""
    if config.backbone_weights == RANDOM_WEIGHTS:
        log.warning("the %s backbone starts from random weights: it needs far more data.", config.backbone)
        return None
    if config.backbone_weights:
        path = Path(config.backbone_weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"backbone weights {path} do not exist.")
        return torch.load(path, map_location="cpu", weights_only=True)
    enum = {"resnet50": torchvision.models.ResNet50_Weights, "resnet101": torchvision.models.ResNet101_Weights}
    weights = enum[config.backbone].IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # no network, a proxy, a truncated download: all end the same way
        raise WeightsUnavailableError(
            f"ImageNet weights for the {config.backbone} student are not on this machine and could not be "
            f"downloaded ({exc.__class__.__name__}: {exc}). Copy {weights.url} to {cached}, or point "
            f"MASKCLIP_STUDENT_BACKBONE_WEIGHTS (StudentConfig.backbone_weights) at a local copy; "
            f"'{RANDOM_WEIGHTS}' starts from random weights instead."
        ) from exc
