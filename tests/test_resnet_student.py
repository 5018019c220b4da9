"""The paper's student: DeepLabv2 (ASPP 6/12/18/24, output stride 8) on ResNet-101 with frozen BatchNorm.

No test downloads ImageNet weights: a randomly initialised ResNet-101 with
calibrated BatchNorm statistics, saved as torchvision saves its weights, stands
in for them through the file option.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.errors import WeightsUnavailableError
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.network import StudentConfig, StudentNet
from maskclip_engine.students.serving import StudentSegmenter
from maskclip_engine.students.training import MapTeacher, TrainConfig, TrainingImage, train_student
from tests.scenes import CLASSES, make_scene

LABELS = LabelSet.parse(CLASSES)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-101 state dict whose BatchNorm statistics were measured on images, as real ones are."""
    torch.manual_seed(0)
    net = torchvision.models.resnet101(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 64, 64))
    path = tmp_path_factory.mktemp("weights") / "resnet101-local.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def segmenter(vit_segmenter: Segmenter) -> Segmenter:
    return Segmenter(vit_segmenter.clip, vit_segmenter.options.replace(short_side=32), vit_segmenter.text)


def test_deeplabv2_resnet101_layout_and_frozen_batchnorm(segmenter: Segmenter, imagenet_like: Path) -> None:
    config = StudentConfig(backbone="resnet101", backbone_weights=str(imagenet_like))
    net = StudentNet(config, segmenter.text_embeddings(LABELS))
    assert config.resolved_dilations == (6, 12, 18, 24) and config.stride == 8
    assert [branch.dilation for branch in net.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    norms = [m for m in net.backbone.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert not any("bn" in name or "downsample.1" in name for name, _ in net.named_parameters())
    saved = torch.load(imagenet_like, weights_only=True)
    torch.testing.assert_close(net.backbone[1].running_mean, saved["bn1.running_mean"])
    torch.testing.assert_close(net.backbone[1].weight, saved["bn1.weight"])

    # Output stride 8, and in training mode each image's output does not depend on its batch.
    pixels = torch.rand(4, 3, 32, 48)
    net.train()
    with torch.no_grad():
        batch = net(pixels=pixels)
        alone = torch.cat([net(pixels=pixels[i : i + 1]) for i in range(4)])
    assert batch.shape == (4, len(CLASSES), 4, 6)
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net.backbone[1].running_mean, saved["bn1.running_mean"])  # nothing re-estimated


def test_resnet101_student_trains_reloads_and_serves(segmenter: Segmenter, imagenet_like: Path, tmp_path: Path) -> None:
    # ResNet-101 is big for two CPU cores: two fully annotated 32x32 scenes, one fixed crop, five steps.
    images = [TrainingImage(*make_scene(i, 32, 32)) for i in range(2)]
    steps: list[dict] = []
    config = TrainConfig(iterations=5, batch_size=2, crop=32, lr=0.01, self_training_after=1.0, scale_range=(1, 1))
    student = StudentConfig(backbone="resnet101", backbone_weights=str(imagenet_like))
    net = train_student(segmenter, images, LABELS, config, student, teacher=MapTeacher(), progress=steps.append)
    losses = [s["loss"] for s in steps]
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses

    path = tmp_path / "resnet101.pt"
    StudentCheckpoint(net, LABELS.names, [list(s) for s in LABELS.synonyms], {}, options=segmenter.options).save(path)
    loaded = StudentCheckpoint.load(path)
    assert loaded.net.config.backbone == "resnet101" and loaded.net.config.backbone_weights is None
    image = make_scene(77, 48, 64)[0]
    before = StudentSegmenter(segmenter, StudentCheckpoint(net, LABELS.names, [], {})).segment(image)
    after = StudentSegmenter(segmenter, loaded).segment(image)
    assert after.label_map.shape == (48, 64) and set(np.unique(after.label_map)) <= {0, 1, 2}
    np.testing.assert_array_equal(before.label_map, after.label_map)


def test_missing_imagenet_weights_say_what_to_do(monkeypatch, tmp_path: Path, segmenter: Segmenter) -> None:
    """With no cached file and no network, the error names the download, the cache path and the file option."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_dns(host, *args, **kwargs):  # never ask a name server from a test
        raise socket.gaierror(f"tests may not resolve {host}")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(WeightsUnavailableError) as caught:
        StudentNet(StudentConfig(backbone="resnet101"), segmenter.text_embeddings(LABELS))
    message = str(caught.value)
    assert "resnet101-63fe2227.pth" in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "MASKCLIP_STUDENT_BACKBONE_WEIGHTS" in message and "'random'" in message
    with pytest.raises(WeightsUnavailableError, match="do not exist"):
        StudentNet(StudentConfig(backbone="resnet101", backbone_weights=str(tmp_path / "nope.pth")), torch.eye(3))
