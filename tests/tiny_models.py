"""Small randomly initialised open_clip models saved the way real weights are shipped.

Real CLIP weights cannot be downloaded in tests, so these stand in for them and
go through the real loading code: an open_clip model config JSON plus a
checkpoint as an open_clip state dict (``.pth``) or as an OpenAI-style
TorchScript archive (``.pt``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

TEXT_CFG = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}

CONFIGS = {
    # patch 16, a 4x4 training grid, two heads of 32 in the last block.
    "tiny-vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": TEXT_CFG,
    },
    # The same with ViT-B/16's depth, for the dense modes that read middle blocks (scclip, sfp).
    "tiny-vit-12": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 12, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": TEXT_CFG,
    },
    # ModifiedResNet with one bottleneck per stage: stride 32, 256 layer4 channels.
    "tiny-rn": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32, "patch_size": None},
        "text_cfg": TEXT_CFG,
    },
}


@dataclass(frozen=True)
class TinyModel:
    name: str
    config: Path  # pass as model=
    state_dict: Path  # open_clip state dict, pass as pretrained=
    torchscript: Path  # OpenAI-format archive (QuickGELU), pass as pretrained=
    reference: torch.nn.Module  # the model the state dict was saved from (GELU)
    reference_quickgelu: torch.nn.Module  # the model the TorchScript archive was saved from


def make_tiny_model(name: str, folder: Path, seed: int = 0) -> TinyModel:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(CONFIGS[name]))
    open_clip.add_model_config(config)

    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    _spread_weights(model)
    state_dict = folder / f"{name}.pth"
    torch.save(model.state_dict(), state_dict)

    torch.manual_seed(seed + 1)
    quick = open_clip.create_model(name, force_quick_gelu=True).eval()
    _spread_weights(quick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about shape checks it freezes; irrelevant here
        traced = torch.jit.trace(
            quick, (torch.randn(1, 3, 64, 64), torch.randint(0, 49408, (1, 32))), check_trace=False
        )
    torchscript = folder / f"{name}-openai.pt"
    traced.save(str(torchscript))
    return TinyModel(name, config, state_dict, torchscript, model, quick)


def _spread_weights(model: torch.nn.Module) -> None:
    """Give every parameter random values that keep images apart in feature space.

    open_clip zero-initialises some layers (ResNet ``bn3``) and starts LayerNorms
    at unit weight and zero bias; small random biases and unit-scale norm
    weights make each path contribute, so tests can tell paths apart, while
    keeping per-location features distinct (as real CLIP features are).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.02)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith("bias") and "ln" not in name and "bn" not in name:
                param.normal_(0, 0.02)
        if hasattr(model.visual, "class_embedding"):
            model.visual.class_embedding.normal_(0, 0.1)
