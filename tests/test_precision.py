"""Precision: ``auto`` picks bf16 where the chip has it, the backbone runs under autocast, the head in float32."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from maskclip_engine import InvalidOptionError, ModelSpec, Segmenter
from maskclip_engine import segmenter as segmenter_module
from maskclip_engine.backbone.precision import choose_precision, cpu_has_native_bf16, resolve_precision
from maskclip_engine.dense.modes import dense_features
from maskclip_engine.evaluation.precision_agreement import (
    label_agreement,
    measure_agreement,
    top2_margin,
    upsampled_margin,
)
from tests.scenes import CLASSES, make_scene
from tests.tiny_models import TinyModel

SAPPHIRE_RAPIDS = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
ZEN4 = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}
SKYLAKE = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
GRAVITON3 = {"architecture": "arm64", "neon": True, "bf16": True, "sve_bf16": True}
GRAVITON2 = {"architecture": "arm64", "neon": True, "bf16": False}


def test_auto_precision_follows_the_hardware() -> None:
    assert choose_precision("auto", "cpu", SAPPHIRE_RAPIDS) == "bf16"
    assert choose_precision("auto", "cpu", ZEN4) == "bf16"
    assert choose_precision("auto", "cpu", GRAVITON3) == "bf16"
    assert choose_precision("auto", "cpu", SKYLAKE) == "fp32"  # bf16 would be emulated: slower than fp32
    assert choose_precision("auto", "cpu", GRAVITON2) == "fp32"
    assert choose_precision("auto", "cpu", {}) == "fp32"  # torch could not tell
    assert choose_precision("auto", "cuda", {}, cuda_bf16=True) == "bf16"
    assert choose_precision("auto", "cuda", {}, cuda_bf16=False) == "fp16"  # pre-Ampere GPUs
    assert choose_precision("auto", "mps", SAPPHIRE_RAPIDS) == "fp32"
    for explicit in ("fp32", "fp16", "bf16"):
        assert choose_precision(explicit, "cpu", SKYLAKE) == explicit
    with pytest.raises(InvalidOptionError, match="auto, fp32"):
        choose_precision("int8", "cpu", {})
    assert not cpu_has_native_bf16({"avx512_bf16": False, "amx_tile": True})


def test_auto_is_the_default_and_resolves_on_this_machine(tiny_vit: TinyModel, tmp_path: Path) -> None:
    assert ModelSpec().precision == "auto"
    expected = "bf16" if cpu_has_native_bf16(torch.cpu.get_capabilities()) else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    segmenter = Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.state_dict), cache_dir=tmp_path)
    assert segmenter.clip.precision == expected
    assert segmenter.clip.dtype == torch.float32  # pixels enter in float32 in every precision


def test_bf16_runs_the_backbone_in_bf16_and_the_head_in_float32(
    tiny_vit: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    segmenter = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), precision="bf16", cache_dir=tmp_path
    )
    assert segmenter.clip.precision == "bf16"
    seen: dict[str, object] = {}

    def record_conv1(_module, _inputs, out) -> None:
        seen["conv1"] = out.dtype

    segmenter.clip.visual.conv1.register_forward_hook(record_conv1)
    label_logits, refine = segmenter_module.label_logits, segmenter_module.refine_with_options

    def spy_logits(*args, **kwargs):
        out = label_logits(*args, **kwargs)
        seen["logits"] = (out.dtype, torch.is_autocast_enabled("cpu"))
        return out

    def spy_refine(logits, keys, options):
        out = refine(logits, keys, options)
        seen["refine"] = (logits.dtype, keys.dtype, out.probs.dtype, torch.is_autocast_enabled("cpu"))
        return out

    monkeypatch.setattr(segmenter_module, "label_logits", spy_logits)
    monkeypatch.setattr(segmenter_module, "refine_with_options", spy_refine)
    image, _ = make_scene(0, 96, 128)
    result = segmenter.segment(image, CLASSES)
    assert seen["conv1"] == torch.bfloat16
    assert seen["logits"] == (torch.float32, False)
    assert seen["refine"] == (torch.float32, torch.float32, torch.float32, False)
    assert result.confidence.dtype == np.float32
    features = segmenter.dense_features_torch(torch.randn(1, 3, 32, 48))
    assert features.dtype == torch.float32 and features.shape == (1, 32, 2, 3)


def test_agreement_counts_only_decided_pixels() -> None:
    reference = np.array([[0, 0, 1], [1, 2, 2]])
    candidate = np.array([[0, 1, 1], [1, 2, 0]])
    margin = np.array([[0.5, 0.01, 0.9], [0.2, 0.04, 0.3]])
    agreement = label_agreement(reference, candidate, margin, margin=0.05)
    # decided: (0,0) same, (0,2) same, (1,0) same, (1,2) differs; (0,1) and (1,1) are near-ties.
    assert (agreement.agreeing, agreement.decided, agreement.total) == (3, 4, 6)
    assert agreement.fraction == 0.75 and agreement.decided_fraction == 4 / 6
    assert agreement.raw_fraction == 4 / 6  # the tie at (1,1) agrees too
    pooled = agreement + label_agreement(reference, reference, margin, margin=0.05)
    assert (pooled.agreeing, pooled.decided, pooled.total) == (7, 8, 12) and pooled.same_dropped
    assert not (agreement + dataclasses.replace(agreement, same_dropped=False)).same_dropped
    assert label_agreement(reference, candidate, margin, margin=0.0).fraction == 4 / 6
    with pytest.raises(ValueError, match="one shape"):
        label_agreement(reference, candidate[:1], margin)

    probs = torch.tensor([[0.6, 0.1], [0.3, 0.45], [0.1, 0.45]]).view(3, 1, 2)
    torch.testing.assert_close(top2_margin(probs), torch.tensor([[0.3, 0.0]]))
    assert upsampled_margin(probs, (2, 4)).shape == (2, 4)


def test_agreement_of_bf16_with_fp32_on_a_scene(tiny_vit: TinyModel, tmp_path: Path) -> None:
    reference = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), precision="fp32", cache_dir=tmp_path
    )
    fast = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), precision="bf16", cache_dir=tmp_path
    )
    image, _ = make_scene(1, 96, 128)
    assert measure_agreement(reference, reference, image, CLASSES).fraction == 1.0
    agreement = measure_agreement(reference, fast, image, CLASSES)
    assert agreement.total == 96 * 128 and agreement.decided > 0
    assert agreement.fraction >= 0.9  # the tiny random tower: a loose floor, the benchmark reports real numbers
    assert isinstance(agreement.same_dropped, bool)


def test_bf16_stores_the_matrix_weights_autocast_would_cast(tiny_vit: TinyModel, tmp_path: Path) -> None:
    """Matrices stored in bf16 once give exactly what autocast gives from float32 weights on every call."""
    fp32, bf16 = (
        Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.state_dict), precision=p, cache_dir=tmp_path)
        for p in ("fp32", "bf16")
    )
    visual = bf16.clip.visual
    block = visual.transformer.resblocks[0]
    assert visual.conv1.weight.dtype == visual.proj.dtype == torch.bfloat16
    assert block.attn.in_proj_weight.dtype == block.mlp.c_fc.bias.dtype == torch.bfloat16
    assert block.ln_1.weight.dtype == visual.positional_embedding.dtype == torch.float32  # norms, embeddings
    assert bf16.clip.model.token_embedding.weight.dtype == torch.float32  # the text tower is untouched
    pixels = torch.randn(2, 3, 48, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = dense_features(fp32.clip.visual, pixels)
    got = bf16.dense_features_and_keys(pixels)
    assert torch.equal(got[0], expected[0].float()) and torch.equal(got[1], expected[1].float())

    with pytest.raises(InvalidOptionError, match="load the model again"):
        dataclasses.replace(fp32.clip, precision="bf16")  # float32 matrices cannot serve as a bf16 backbone
    with pytest.raises(InvalidOptionError, match="load the model again"):
        dataclasses.replace(bf16.clip, precision="fp32")


def test_bf16_resnet_stores_its_matrices_and_keeps_batch_norm_float32(tiny_rn: TinyModel, tmp_path: Path) -> None:
    fp32 = Segmenter.from_pretrained(str(tiny_rn.config), str(tiny_rn.state_dict), precision="fp32", cache_dir=tmp_path)
    bf16 = Segmenter.from_pretrained(str(tiny_rn.config), str(tiny_rn.state_dict), precision="bf16", cache_dir=tmp_path)
    visual = bf16.clip.visual
    assert visual.conv1.weight.dtype == visual.attnpool.v_proj.weight.dtype == torch.bfloat16
    assert visual.bn1.weight.dtype == visual.bn1.running_mean.dtype == torch.float32
    pixels = torch.randn(1, 3, 64, 96)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = dense_features(fp32.clip.visual, pixels)
    got = bf16.dense_features_and_keys(pixels)
    assert torch.equal(got[0], expected[0].float()) and torch.equal(got[1], expected[1].float())


def test_a_students_decoder_follows_the_backbone_precision_and_its_classifier_stays_float32(
    tiny_vit: TinyModel, tmp_path: Path
) -> None:
    from maskclip_engine import LabelSet
    from maskclip_engine.students.checkpoint import StudentCheckpoint
    from maskclip_engine.students.serving import StudentSegmenter
    from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student

    fp32 = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), precision="fp32", cache_dir=tmp_path
    )
    bf16 = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), precision="bf16", cache_dir=tmp_path
    )
    fp32, bf16 = (s.with_options(s.options.replace(short_side=128)) for s in (fp32, bf16))
    labels = LabelSet.parse(CLASSES)
    images = [TrainingImage(*make_scene(i, 96, 128)) for i in range(4)]
    net = train_student(fp32, images, labels, TrainConfig(iterations=8, batch_size=2, crop=64, lr=0.05))
    checkpoint = StudentCheckpoint(net, labels.names, labels.synonyms_lists, {})
    calls = []
    net.head.branches[0].register_forward_hook(lambda module, args, out: calls.append(("decoder", out.dtype)))
    net.classifier.register_forward_hook(lambda module, args, out: calls.append(("classifier", out.dtype)))
    image = make_scene(50, 96, 128)[0]
    features = fp32.encode(image, mode="whole")  # the same features for both: only the decoder's precision differs
    exact = StudentSegmenter(fp32, checkpoint).probabilities(image, features)
    fast = StudentSegmenter(bf16, checkpoint).probabilities(image, features)
    assert calls == [
        ("decoder", torch.float32),
        ("classifier", torch.float32),
        ("decoder", torch.bfloat16),
        ("classifier", torch.float32),
    ]
    assert fast.dtype == torch.float32
    assert (fast.argmax(0) == exact.argmax(0)).float().mean() > 0.98
    torch.testing.assert_close(fast, exact, atol=0.03, rtol=0)
