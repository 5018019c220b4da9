"""Dense features against reference computations written here from the model's own parameters."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskclip_engine import InvalidImageError, Segmenter
from maskclip_engine.backbone import vit_blocks


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _activation(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    if type(module).__name__ == "QuickGELU":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


def resized_tower(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.nn.Module, tuple[int, int]]:
    """A copy of the tower with its positional embedding resized here for ``pixels`` (bicubic patch positions,
    class position untouched), and the patch grid."""
    tower = copy.deepcopy(visual)
    patch = tower.patch_size[0]
    gh, gw = pixels.shape[2] // patch, pixels.shape[3] // patch
    th, tw = tower.grid_size
    pos = tower.positional_embedding.detach()
    grid = pos[1:].reshape(th, tw, -1).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)[0]
    tower.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], grid.permute(1, 2, 0).reshape(gh * gw, -1)]))
    return tower, (gh, gw)


def _last_block_input(visual: torch.nn.Module, pixels: torch.Tensor):
    """The resized tower and the tokens entering its last block from open_clip's own forward pass."""
    tower, (gh, gw) = resized_tower(visual, pixels)
    captured = {}
    handle = tower.transformer.resblocks[-1].register_forward_pre_hook(
        lambda module, args: captured.setdefault("x", args[0])
    )
    with torch.no_grad():
        tower(pixels)
    handle.remove()
    return tower, captured["x"], (gh, gw)  # tokens: [B, 1 + gh * gw, width], batch first


def _reference_vit(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MaskCLIP last-block value path, computed independently of the engine.

    The blocks before the last one come from open_clip's own forward pass on a
    copy of the tower whose positional embedding was resized here (bicubic for
    patch positions, class position untouched); the last block is written out
    by hand from its weight matrices.
    """
    tower, x, (gh, gw) = _last_block_input(visual, pixels)
    last = tower.transformer.resblocks[-1]

    width = x.shape[-1]
    w_in, b_in = last.attn.in_proj_weight, last.attn.in_proj_bias
    y = layer_norm(x, last.ln_1)
    k = y @ w_in[width : 2 * width].T + b_in[width : 2 * width]
    v = y @ w_in[2 * width :].T + b_in[2 * width :]
    w_out, b_out = last.attn.out_proj.weight, last.attn.out_proj.bias
    x = x + (v @ w_out.T + b_out)
    hidden = layer_norm(x, last.ln_2) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias
    x = x + _activation(hidden, last.mlp.gelu) @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias
    features = layer_norm(x[:, 1:], tower.ln_post) @ tower.proj
    keys = (k @ w_out.T + b_out)[:, 1:]
    as_map = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)  # noqa: E731
    return as_map(features), as_map(keys)


def test_vit_dense_features_match_reference_at_non_square_size(vit_segmenter: Segmenter) -> None:
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 48, 112)  # a 3x7 grid; the model was built for 4x4
    features, keys = vit_segmenter.dense_features_and_keys(pixels)
    ref_features, ref_keys = _reference_vit(vit_segmenter.clip.visual, pixels)
    assert features.shape == (2, 32, 3, 7)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys, ref_keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vit_segmenter.dense_features_torch(pixels), ref_features, rtol=1e-4, atol=1e-5)


def test_vit_dense_features_drop_query_key_mixing(vit_segmenter: Segmenter) -> None:
    """Each token's feature depends on the others only through the earlier blocks:
    the engine's output differs from the model's own last block (which mixes tokens)."""
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 64, 64)
    visual = vit_segmenter.clip.visual
    with torch.no_grad():
        tokens = visual.transformer(visual._embeds(pixels))
        standard = (visual.ln_post(tokens[:, 1:]) @ visual.proj).transpose(1, 2).reshape(1, -1, 4, 4)
    assert not torch.allclose(vit_segmenter.dense_features_torch(pixels), standard, atol=1e-3)


def test_transformer_block_computes_what_the_open_clip_block_computes(vit_segmenter: Segmenter) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 1 + 3 * 7, vit_segmenter.clip.visual.transformer.width)
    with torch.no_grad():
        for block in vit_segmenter.clip.visual.transformer.resblocks:
            torch.testing.assert_close(vit_blocks.transformer_block(block, x), block(x), rtol=1e-5, atol=1e-5)
            x = block(x)


def test_bf16_cpu_attention_in_row_blocks_matches_exact_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 45, 16) * scale for scale in (2.0, 2.0, 1.0))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.equal(vit_blocks.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))  # float32: SDPA itself
    # one block; 16-row blocks; a ragged end
    for row_budget in (vit_blocks.ROW_BLOCK_ELEMENTS, 6 * 45 * 16, 6 * 45 * 20):
        monkeypatch.setattr(vit_blocks, "ROW_BLOCK_ELEMENTS", row_budget)
        got = vit_blocks.attend(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert got.dtype == torch.bfloat16 and got.shape == q.shape
        error = (got.double() - exact).norm() / exact.norm()
        assert error < 0.02, f"relative error {error:.4f} with a row budget of {row_budget}"


def test_vit_uses_quickgelu_when_the_weights_need_it(tiny_vit, tmp_path) -> None:
    segmenter = Segmenter.from_pretrained(
        str(tiny_vit.config), str(tiny_vit.torchscript), precision="fp32", cache_dir=tmp_path
    )
    pixels = torch.randn(1, 3, 32, 80)
    features, keys = segmenter.dense_features_and_keys(pixels)
    ref_features, ref_keys = _reference_vit(segmenter.clip.visual, pixels)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys, ref_keys, rtol=1e-4, atol=1e-5)


def test_resnet_dense_features_match_reference(rn_segmenter: Segmenter) -> None:
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 96, 160)
    features, keys = rn_segmenter.dense_features_and_keys(pixels)
    visual = rn_segmenter.clip.visual
    with torch.no_grad():
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))
        pool = visual.attnpool
        # 1x1 convolutions made from the attention pool's linear layers; positional embedding unused.
        v = F.conv2d(x, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
        ref_features = F.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
        ref_keys = F.conv2d(x, pool.k_proj.weight[:, :, None, None], pool.k_proj.bias)
    assert features.shape == (2, 32, 3, 5)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys, ref_keys, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 50, 64), (1, 3, 8, 64), (3, 64, 64), (1, 1, 64, 64)])
def test_pixel_batches_of_the_wrong_shape_are_rejected(vit_segmenter: Segmenter, shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidImageError):
        vit_segmenter.dense_features_torch(torch.zeros(shape))


def test_resnet_grid_is_stride_32(rn_segmenter: Segmenter) -> None:
    assert rn_segmenter.stride == 32
    with pytest.raises(InvalidImageError, match="multiples of 32"):
        rn_segmenter.dense_features_torch(torch.zeros(1, 3, 48, 64))


def _reference_training_free(visual: torch.nn.Module, pixels: torch.Tensor, mode: str) -> torch.Tensor:
    """SCLIP / ClearCLIP / NACLIP last blocks written out by hand: attention output only, no residual, no MLP."""
    tower, x, (gh, gw) = _last_block_input(visual, pixels)
    last = tower.transformer.resblocks[-1]
    batch, tokens, width = x.shape
    heads = last.attn.num_heads
    dim = width // heads
    w_in, b_in = last.attn.in_proj_weight, last.attn.in_proj_bias
    y = layer_norm(x, last.ln_1)
    q, k, v = (y @ w_in[i * width : (i + 1) * width].T + b_in[i * width : (i + 1) * width] for i in range(3))

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, tokens, heads, dim).permute(0, 2, 1, 3)

    q, k, v = per_head(q), per_head(k), per_head(v)
    if mode == "naclip":
        bias = torch.zeros(tokens, tokens)
        for i in range(gh * gw):
            for j in range(gh * gw):
                distance2 = (i // gw - j // gw) ** 2 + (i % gw - j % gw) ** 2
                bias[1 + i, 1 + j] = torch.exp(torch.tensor(-distance2 / (2 * 5.0**2)))
        weights = torch.softmax(k @ k.transpose(-1, -2) / dim**0.5 + bias, dim=-1)
    elif mode == "clearclip":
        weights = torch.softmax(q @ q.transpose(-1, -2) / dim**0.5, dim=-1)
    else:
        weights = torch.softmax(q @ q.transpose(-1, -2) / dim**0.5, dim=-1) + torch.softmax(
            k @ k.transpose(-1, -2) / dim**0.5, dim=-1
        )
    out = (weights @ v).permute(0, 2, 1, 3).reshape(batch, tokens, width)
    out = out @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
    features = layer_norm(out[:, 1:], tower.ln_post) @ tower.proj
    return features.transpose(1, 2).reshape(batch, -1, gh, gw)


@pytest.mark.parametrize("mode", ["sclip", "clearclip", "naclip"])
def test_training_free_modes_match_references(vit_segmenter: Segmenter, mode: str) -> None:
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 48, 80)
    features, keys = vit_segmenter.dense_features_and_keys(pixels, mode)
    torch.testing.assert_close(
        features, _reference_training_free(vit_segmenter.clip.visual, pixels, mode), rtol=1e-4, atol=1e-5
    )
    # Keys for key smoothing are the same in every mode.
    torch.testing.assert_close(keys, vit_segmenter.dense_features_and_keys(pixels, "maskclip")[1])


def test_naclip_bias_depends_on_patch_distance() -> None:
    from maskclip_engine.dense.modes import neighbourhood_bias

    bias = neighbourhood_bias((3, 4), sigma=5.0)
    assert bias.shape == (13, 13)
    assert torch.all(bias[0] == 0) and torch.all(bias[:, 0] == 0)  # the class token gets no bias
    assert torch.allclose(torch.diagonal(bias)[1:], torch.ones(12))
    # patch 0 is at (0, 0); patch 1 at (0, 1); patch 11 at (2, 3)
    assert bias[1, 2] == pytest.approx(float(torch.exp(torch.tensor(-1 / 50))))
    assert bias[1, 12] == pytest.approx(float(torch.exp(torch.tensor(-13 / 50))))
    assert bias[1, 2] > bias[1, 12]
    narrow = neighbourhood_bias((3, 4), sigma=1.0)
    assert narrow[1, 12] < bias[1, 12]


def test_modes_differ_and_compose_with_refinements(vit_segmenter: Segmenter) -> None:
    from tests.conftest import scene

    image = scene(64, 96)
    labels = ["wall", "grass", "sky"]
    confidences = []
    for mode in ("maskclip", "sclip", "clearclip", "naclip"):
        for ks, pd in ((True, True), (False, False)):
            result = vit_segmenter.segment(image, labels, dense_mode=mode, key_smoothing=ks, prompt_denoising=pd)
            assert result.label_map.shape == (64, 96) and (result.label_map >= 0).all()
            if ks and pd:
                confidences.append(result.confidence)
    for i in range(len(confidences)):
        for j in range(i + 1, len(confidences)):
            assert not np.allclose(confidences[i], confidences[j])


def test_resnets_support_maskclip_mode_only(rn_segmenter: Segmenter) -> None:
    from maskclip_engine import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="ResNet models support 'maskclip' only"):
        rn_segmenter.segment(np.zeros((64, 64, 3), dtype=np.uint8), ["a", "b"], dense_mode="sclip")
    with pytest.raises(InvalidOptionError, match="ResNet"):
        rn_segmenter.dense_features_torch(torch.zeros(1, 3, 64, 64), "naclip")
