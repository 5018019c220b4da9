from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from maskclip_engine import (
    ModelNotFoundError,
    ModelSpec,
    Segmenter,
    UnsupportedModelError,
    WeightsUnavailableError,
    load_clip,
)
from tests.tiny_models import TinyModel


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k].float(), sb[k].float()) for k in sa if k != "attn_mask")


@pytest.mark.parametrize("which", ["tiny_vit", "tiny_rn"])
def test_open_clip_state_dict_loads_exact_weights(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    tiny: TinyModel = request.getfixturevalue(which)
    spec = ModelSpec(str(tiny.config), str(tiny.state_dict), device="cpu", precision="fp32", cache_dir=tmp_path)
    clip = load_clip(spec)
    assert _same_weights(clip.model, tiny.reference)
    assert clip.weights_id.startswith("sha256:")
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert clip.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)


@pytest.mark.parametrize("which", ["tiny_vit", "tiny_rn"])
def test_openai_torchscript_archive_loads_with_quickgelu(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    tiny: TinyModel = request.getfixturevalue(which)
    clip = load_clip(ModelSpec(str(tiny.config), str(tiny.torchscript), precision="fp32", cache_dir=tmp_path))
    assert _same_weights(clip.model, tiny.reference_quickgelu)
    # OpenAI weights were trained with QuickGELU; the text tower shows which activation was built.
    activations = {type(m).__name__ for m in clip.model.transformer.modules()}
    assert "QuickGELU" in activations
    assert clip.model_id.endswith("+quickgelu")
    x = torch.randint(0, 49408, (2, 32))
    torch.testing.assert_close(clip.model.encode_text(x), tiny.reference_quickgelu.encode_text(x))


def test_state_dict_keeps_plain_gelu_unless_asked(tiny_vit: TinyModel, tmp_path: Path) -> None:
    plain = load_clip(ModelSpec(str(tiny_vit.config), str(tiny_vit.state_dict), cache_dir=tmp_path))
    forced = load_clip(ModelSpec(str(tiny_vit.config), str(tiny_vit.state_dict), quick_gelu=True, cache_dir=tmp_path))
    assert "QuickGELU" not in {type(m).__name__ for m in plain.model.modules()}
    assert "QuickGELU" in {type(m).__name__ for m in forced.model.modules()}


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(ModelNotFoundError, match="ViT-B-16"):
        load_clip(ModelSpec("ViT-B-61", "openai"))


def test_missing_checkpoint_file(tiny_vit: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_clip(ModelSpec(str(tiny_vit.config), str(tmp_path / "nope.pt")))


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(WeightsUnavailableError, match="laion2b_s34b_b88k"):
        load_clip(ModelSpec("ViT-B-16", "not-a-tag"))


def test_tag_that_cannot_be_downloaded_says_to_pass_a_local_file(tmp_path: Path) -> None:
    # The hub is unreachable in tests (HF_HUB_OFFLINE and no sockets), as on a machine without network.
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip(ModelSpec("ViT-B-16", "openai", cache_dir=tmp_path))
    message = str(info.value)
    assert "ViT-B-16" in message and "'openai'" in message
    assert "local checkpoint" in message and "--pretrained" in message


def test_mismatched_checkpoint_is_a_clear_error(tiny_vit: TinyModel, tiny_rn: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not fit model tiny-vit"):
        load_clip(ModelSpec(str(tiny_vit.config), str(tiny_rn.state_dict), cache_dir=tmp_path))


class _Payload:
    """Anything that is not a tensor makes a checkpoint unsafe to unpickle."""


def test_checkpoint_with_python_objects_is_refused(tiny_vit: TinyModel, tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": tiny_vit.reference.state_dict(), "extra": _Payload()}, path)
    with pytest.raises(WeightsUnavailableError, match="plain state dict"):
        load_clip(ModelSpec(str(tiny_vit.config), str(path), cache_dir=tmp_path))


def test_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "broken.json"
    config.write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="not valid JSON"):
        load_clip(ModelSpec(str(config), None))


def test_model_without_dense_path_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "tiny-coca-like.json"
    config.write_text(
        '{"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16,'
        ' "head_width": 32, "attentional_pool": true, "attn_pooler_heads": 2},'
        ' "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}'
    )
    with pytest.raises(UnsupportedModelError, match="ViT with a class token"):
        load_clip(ModelSpec(str(config), None))


def test_cuda_requested_without_cuda(tiny_vit: TinyModel) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(WeightsUnavailableError, match="CUDA is not available"):
        load_clip(ModelSpec(str(tiny_vit.config), str(tiny_vit.state_dict), device="cuda"))


def test_bf16_precision_runs(tiny_vit: TinyModel, tmp_path: Path) -> None:
    segmenter = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.state_dict), precision="bf16", cache_dir=tmp_path
    )
    assert segmenter.clip.precision == "bf16" and segmenter.clip.dtype == torch.float32  # pixels enter in float32
    features = segmenter.dense_features_torch(torch.randn(1, 3, 32, 48))
    assert features.dtype == torch.float32 and features.shape == (1, 32, 2, 3)
