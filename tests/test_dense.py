"""Dense features against reference computations written here from the model's own parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from maskclip_engine import InvalidImageError, Segmenter


def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _activation(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    if type(module).__name__ == "QuickGELU":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


def _reference_vit(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MaskCLIP last-block value path, computed independently of the engine.

    The blocks before the last one come from open_clip's own forward pass on a
    copy of the tower whose positional embedding was resized here (bicubic for
    patch positions, class position untouched); the last block is written out
    by hand from its weight matrices.
    """
    tower = copy.deepcopy(visual)
    patch = tower.patch_size[0]
    gh, gw = pixels.shape[2] // patch, pixels.shape[3] // patch
    th, tw = tower.grid_size
    pos = tower.positional_embedding.detach()
    grid = pos[1:].reshape(th, tw, -1).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)[0]
    tower.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], grid.permute(1, 2, 0).reshape(gh * gw, -1)]))

    captured = {}
    last = tower.transformer.resblocks[-1]
    handle = last.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        tower(pixels)
    handle.remove()
    x = captured["x"]  # [B, 1 + gh * gw, width], batch first

    width = x.shape[-1]
    w_in, b_in = last.attn.in_proj_weight, last.attn.in_proj_bias
    y = _layer_norm(x, last.ln_1)
    k = y @ w_in[width : 2 * width].T + b_in[width : 2 * width]
    v = y @ w_in[2 * width :].T + b_in[2 * width :]
    w_out, b_out = last.attn.out_proj.weight, last.attn.out_proj.bias
    x = x + (v @ w_out.T + b_out)
    hidden = _layer_norm(x, last.ln_2) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias
    x = x + _activation(hidden, last.mlp.gelu) @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias
    features = _layer_norm(x[:, 1:], tower.ln_post) @ tower.proj
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


def test_vit_uses_quickgelu_when_the_weights_need_it(tiny_vit, tmp_path) -> None:
    segmenter = Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.torchscript), cache_dir=tmp_path)
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
