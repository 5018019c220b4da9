"""SC-CLIP and SFP dense modes against step-by-step references written here from their description.

The references follow ../shared/DESIGN.md ("SC-CLIP and SFP") line by line, with
loops where the engine vectorises: block outputs come from open_clip's own
forward pass, the outlier detectors and the neighbour fill walk the patch grid
in row-major order, and the last block is written out from its weights.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from maskclip_engine import InvalidOptionError, Segmenter
from maskclip_engine.dense.calibrated import LayerPlan, calibrated_dense, layer_plan
from maskclip_engine.dense.outlier_tokens import attention_outliers, fill_outliers, lof_outliers
from tests.test_dense import layer_norm, resized_tower

# ----------------------------------------------------------------- reference


def reference_lof(tokens: torch.Tensor, neighbours: int = 30, contamination: float = 0.05) -> set[int]:
    """Outlier patches: squared distances, a token's k-distance to its 30th nearest other token,
    score = mean over those neighbours o of kdist(p) / kdist(o), outliers above the 0.95 quantile."""
    x = tokens.double().numpy()
    squared = (x * x).sum(1)
    distances = squared[:, None] + squared[None, :] - 2 * x @ x.T
    count = len(x)
    nearest = [[o for o in np.argsort(distances[p], kind="stable") if o != p][:neighbours] for p in range(count)]
    kdist = np.array([distances[p, nearest[p][-1]] for p in range(count)])
    scores = np.array([np.mean(kdist[p] / kdist[nearest[p]]) for p in range(count)])
    return {p for p in range(count) if scores[p] > np.quantile(scores, 1 - contamination)}


def reference_attention_outliers(attention: torch.Tensor, ratio: float = 1.5, limit: int = 10) -> set[int]:
    """Patches with ratio * a(CLS -> p) > a(p -> p); at most ``limit``, the largest CLS attention first."""
    patches = attention.shape[0] - 1
    candidates = [p for p in range(patches) if ratio * attention[0, 1 + p] > attention[1 + p, 1 + p]]
    return set(sorted(candidates, key=lambda p: -float(attention[0, 1 + p]))[:limit])


def reference_fill(tokens: torch.Tensor, outliers: set[int], grid: tuple[int, int], zero_isolated: bool):
    """Each outlier <- mean of its in-grid, non-outlier 8-neighbours (row-major: row p // cols, column p % cols)."""
    rows, cols = grid
    out = tokens.clone()
    for p in outliers:
        r, c = divmod(p, cols)
        around = [
            (r + dr) * cols + (c + dc)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (dr, dc) != (0, 0) and 0 <= r + dr < rows and 0 <= c + dc < cols
        ]
        around = [q for q in around if q not in outliers]
        if around:
            out[p] = tokens[around].mean(0)
        elif zero_isolated:
            out[p] = 0
    return out


def block_outputs(visual: torch.nn.Module, pixels: torch.Tensor):
    """Every block's output and input (one image, ``[1 + N, C]``) from open_clip's forward pass."""
    tower, grid = resized_tower(visual, pixels)
    outputs, inputs = {}, {}
    hooks = []
    for index, block in enumerate(tower.transformer.resblocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, i=index: outputs.__setitem__(i, out)))
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=index: inputs.__setitem__(i, a[0])))
    with torch.no_grad():
        tower(pixels)
    for hook in hooks:
        hook.remove()
    first = not tower.transformer.batch_first
    pick = (lambda t: t[:, 0]) if first else (lambda t: t[0])
    return tower, grid, {i: pick(t) for i, t in outputs.items()}, {i: pick(t) for i, t in inputs.items()}


def reference_features(visual: torch.nn.Module, pixels: torch.Tensor, mode: str, plan: LayerPlan | None = None):
    """Features ``[D, h, w]``, main-branch keys ``[C, h, w]`` and the outlier set of one image."""
    plan = plan or LayerPlan()
    tower, (gh, gw), b, inputs = block_outputs(visual, pixels)
    last = tower.transformer.resblocks[-1]
    width = b[0].shape[-1]
    heads = last.attn.num_heads
    dim = width // heads
    w_out, b_out = last.attn.out_proj.weight, last.attn.out_proj.bias
    depth = len(tower.transformer.resblocks)
    before_last = depth - 2

    def patches(t: torch.Tensor) -> torch.Tensor:
        return t[1:]

    def cos(t: torch.Tensor) -> torch.Tensor:
        unit = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # a zeroed patch: no affinity to anything
        return unit @ unit.T

    def thr(s: torch.Tensor) -> torch.Tensor:
        return s * (s >= 0.4)

    def agg(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (s / (s.sum(dim=1, keepdim=True) + 1e-6)) @ x

    def sharpened(s: torch.Tensor) -> torch.Tensor:
        g = 3 * (s - s.mean())
        return torch.where(g < 0, torch.tensor(float("-inf")), g)

    def qkv(x: torch.Tensor, block: torch.nn.Module = last):
        y = layer_norm(x, block.ln_1)
        wi, bi = block.attn.in_proj_weight, block.attn.in_proj_bias
        return [(y @ wi[i * width : (i + 1) * width].T + bi[i * width : (i + 1) * width]).view(-1, heads, dim)
                .transpose(0, 1) for i in range(3)]  # fmt: skip

    def out_proj(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).reshape(-1, width) @ w_out.T + b_out

    def softmax(s: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(torch.softmax(s, dim=-1), 0.0)  # a row of -inf only: no weights

    with torch.no_grad():
        if mode == "scclip":
            outliers = reference_lof(patches(b[before_last]))
        else:
            q, k, _ = qkv(inputs[before_last], tower.transformer.resblocks[before_last])
            attention = softmax(q @ k.transpose(1, 2) / math.sqrt(dim)).mean(0)
            outliers = reference_attention_outliers(attention)
        zero = mode == "sfp"
        r_last = reference_fill(patches(b[before_last]), outliers, (gh, gw), zero)
        r_deep = reference_fill(patches(b[plan.deep]), outliers, (gh, gw), zero)
        m = cos(r_deep)
        s = thr(m)
        x = agg(s, r_last)
        q, k, v = qkv(x)
        kk = softmax(k @ k.transpose(1, 2) / math.sqrt(dim))
        if mode == "scclip":
            weights = (softmax(sharpened(m))[None] + kk) / 2
        else:
            weights = (kk + softmax(q @ q.transpose(1, 2) / math.sqrt(dim)) + softmax(sharpened(s))[None]) / 3
        x = out_proj(weights @ v) + plan.cls_weight * b[before_last][0]
        keys = out_proj(k)
        a = thr(cos(patches(b[plan.shallow])))
        x = agg(a, x)
        fused = sum(b[i] for i in range(plan.fused_first, plan.fused_last + 1))
        _, fk, fv = qkv(patches(fused))
        if mode == "scclip":
            fused_weights = (softmax(sharpened(m))[None] + softmax(fk @ fk.transpose(1, 2) / math.sqrt(dim))) / 2
        else:
            fused_weights = softmax(sharpened(s))[None]
        y = agg(a, out_proj(fused_weights @ fv) + plan.cls_weight * fused[0])
        features = layer_norm(x + y, tower.ln_post) @ tower.proj

    def as_map(t: torch.Tensor) -> torch.Tensor:
        return t.T.reshape(-1, gh, gw)

    return as_map(features), as_map(keys), outliers


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    """Random ViT-B/16 weights (no hub: ``pretrained=None``), float32."""
    torch.manual_seed(0)
    return Segmenter.from_pretrained(
        "ViT-B-16", pretrained=None, device="cpu", precision="fp32", cache_dir=tmp_path_factory.mktemp("cache")
    )


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["scclip", "sfp"])
@pytest.mark.parametrize("size", [(224, 224), (224, 320)], ids=["square", "non-square"])
def test_modes_match_the_step_by_step_reference_on_vit_b16(vit_b16: Segmenter, mode: str, size) -> None:
    torch.manual_seed(4)
    pixels = torch.randn(1, 3, *size)
    features, keys = vit_b16.dense_features_and_keys(pixels, mode)
    expected, expected_keys, outliers = reference_features(vit_b16.clip.visual, pixels, mode)
    grid = (size[0] // 16, size[1] // 16)
    assert features.shape == (1, 512, *grid) and keys.shape == (1, 768, *grid)
    assert outliers and len(outliers) <= (10 if mode == "sfp" else math.ceil(0.05 * grid[0] * grid[1]))
    torch.testing.assert_close(features[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(keys[0], expected_keys, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["scclip", "sfp"])
def test_a_batch_gives_each_image_its_own_outliers(vit12_segmenter: Segmenter, mode: str) -> None:
    torch.manual_seed(5)
    pixels = torch.randn(3, 3, 96, 128)
    visual = vit12_segmenter.clip.visual
    with torch.no_grad():
        batched, _ = calibrated_dense(visual, pixels, mode)
        for index in range(3):
            alone, _ = calibrated_dense(visual, pixels[index : index + 1], mode)
            torch.testing.assert_close(batched[index : index + 1], alone, rtol=1e-4, atol=1e-5)
    expected, _, _ = reference_features(vit12_segmenter.clip.visual, pixels[1:2], mode)
    torch.testing.assert_close(batched[1], expected, rtol=1e-4, atol=1e-4)


def test_lof_flags_the_planted_outliers() -> None:
    torch.manual_seed(6)
    tokens = torch.randn(1, 200, 16) * 0.1
    planted = [3, 40, 77, 101, 150, 151, 160, 170, 188, 199]
    tokens[0, planted] += torch.randn(len(planted), 16) * 5  # far from the cluster and from each other
    flagged = lof_outliers(tokens)
    # 200 tokens: the 0.95 quantile falls between the 190th and 191st score, so exactly 10 are above it.
    assert flagged.shape == (1, 200) and sorted(flagged[0].nonzero().flatten().tolist()) == planted
    assert reference_lof(tokens[0]) == set(planted)


def test_lof_matches_its_reference_on_random_tokens() -> None:
    torch.manual_seed(7)
    tokens = torch.randn(2, 84, 8) * torch.linspace(0.5, 2.0, 84).view(1, -1, 1)
    flagged = lof_outliers(tokens)
    for image in range(2):
        assert set(flagged[image].nonzero().flatten().tolist()) == reference_lof(tokens[image])


def test_attention_outliers_keep_at_most_ten_by_class_attention() -> None:
    patches = 14
    attention = torch.full((1, patches + 1, patches + 1), 0.01)
    attention[0, 1:, 1:].fill_diagonal_(0.2)  # every patch attends to itself at 0.2
    # The class token's attention to patches 0..13: above 0.2 / 1.5 = 0.133 for the first twelve.
    attention[0, 0, 1:] = torch.tensor(
        [0.14, 0.3, 0.15, 0.29, 0.16, 0.28, 0.17, 0.27, 0.18, 0.26, 0.19, 0.25, 0.1, 0.13]
    )
    flagged = attention_outliers(attention)
    expected = {1, 3, 5, 7, 9, 11, 10, 8, 6, 4}  # the ten largest of the twelve candidates
    assert set(flagged[0].nonzero().flatten().tolist()) == expected
    assert reference_attention_outliers(attention[0]) == expected
    assert not attention_outliers(torch.eye(patches + 1)[None]).any()  # no patch qualifies: none flagged


def test_fill_uses_non_outlier_neighbours_on_a_non_square_grid() -> None:
    grid = (3, 5)
    tokens = torch.arange(15, dtype=torch.float32).view(1, 15, 1).repeat(1, 1, 2)
    tokens[..., 1] *= 10
    outliers = torch.zeros(1, 15, dtype=torch.bool)
    outliers[0, [6, 7, 0]] = True  # (1, 1), (1, 2) side by side; (0, 0) in a corner
    for isolated in ("keep", "zero"):
        filled = fill_outliers(tokens, outliers, grid, isolated)[0]
        # (1, 1): neighbours 0 (outlier), 1, 2, 5, 7 (outlier), 10, 11, 12
        assert filled[6, 0].item() == pytest.approx(np.mean([1, 2, 5, 10, 11, 12]))
        # (1, 2): neighbours 1, 2, 3, 6 (outlier), 8, 11, 12, 13
        assert filled[7, 0].item() == pytest.approx(np.mean([1, 2, 3, 8, 11, 12, 13]))
        # (0, 0): neighbours 1, 5, 6 (outlier) -- the grid's edge counts as missing, not zero
        assert filled[0, 0].item() == pytest.approx(np.mean([1, 5]))
        assert torch.equal(filled[~outliers[0]], tokens[0][~outliers[0]])
        expected = reference_fill(tokens[0], {0, 6, 7}, grid, isolated == "zero")
        torch.testing.assert_close(filled, expected)


def test_an_outlier_surrounded_by_outliers_is_kept_or_zeroed() -> None:
    grid = (2, 2)
    tokens = torch.ones(1, 4, 3) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    everything = torch.ones(1, 4, dtype=torch.bool)
    assert torch.equal(fill_outliers(tokens, everything, grid, "keep"), tokens)  # SC-CLIP
    assert torch.equal(fill_outliers(tokens, everything, grid, "zero"), torch.zeros_like(tokens))  # SFP
    with pytest.raises(InvalidOptionError, match="do not fill"):
        fill_outliers(tokens, everything, (3, 2))


def test_layer_plans_by_depth() -> None:
    assert layer_plan(12) == LayerPlan(deep=8, shallow=3, fused_first=3, fused_last=9, cls_weight=0.3)
    # SC-CLIP's published ViT-L/14 plan, not the scaled rule (which would give 16, 6, 6-18).
    assert layer_plan(24) == LayerPlan(deep=16, shallow=6, fused_first=8, fused_last=18, cls_weight=0.1)
    assert layer_plan(6) == LayerPlan(deep=3, shallow=2, fused_first=2, fused_last=3)
    assert layer_plan(32) == LayerPlan(deep=21, shallow=8, fused_first=8, fused_last=24)
    for depth in range(6, 49):
        plan = layer_plan(depth)
        assert 0 <= plan.shallow <= plan.deep <= depth - 3 and plan.fused_first <= plan.fused_last <= depth - 3
    with pytest.raises(InvalidOptionError, match="at least 6 blocks"):
        layer_plan(5)


def test_shallow_vits_and_resnets_refuse_the_modes_clearly(vit_segmenter: Segmenter, rn_segmenter: Segmenter) -> None:
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    for mode in ("scclip", "sfp"):
        with pytest.raises(InvalidOptionError, match="at least 6 blocks.*has 2"):
            vit_segmenter.segment(image, ["a", "b"], dense_mode=mode)
        with pytest.raises(InvalidOptionError, match="ResNet models support 'maskclip' only"):
            rn_segmenter.segment(image, ["a", "b"], dense_mode=mode)


def test_a_scaled_plan_runs_on_a_deeper_tower(vit12_segmenter: Segmenter) -> None:
    """A tower whose depth has no published plan runs its scaled plan (here: the 12-block tower cut to 9)."""
    visual = copy.deepcopy(vit12_segmenter.clip.visual)
    visual.transformer.resblocks = visual.transformer.resblocks[:9]
    plan = layer_plan(9)
    torch.manual_seed(8)
    pixels = torch.randn(1, 3, 128, 96)
    for mode in ("scclip", "sfp"):
        with torch.no_grad():
            features, _ = calibrated_dense(visual, pixels, mode)
        expected, _, _ = reference_features(visual, pixels, mode, plan)
        torch.testing.assert_close(features[0], expected, rtol=1e-4, atol=1e-4)


def test_sfp_stays_finite_when_an_outlier_has_no_usable_neighbour(vit12_segmenter: Segmenter) -> None:
    """On a 4x6 grid SFP flags 10 of 24 patches, some with only outliers around them: zeroed, they have no
    affinity and take no attention, and the features stay finite (and equal to the reference)."""
    torch.manual_seed(19)  # with these pixels, patch 23 (a corner) and its three neighbours are all flagged
    pixels = torch.randn(1, 3, 64, 96)
    features, keys = vit12_segmenter.dense_features_and_keys(pixels, "sfp")
    expected, _, outliers = reference_features(vit12_segmenter.clip.visual, pixels, "sfp")
    isolated = [
        p for p in outliers
        if all(q in outliers for q in range(24) if q != p and abs(q // 6 - p // 6) <= 1 and abs(q % 6 - p % 6) <= 1)
    ]  # fmt: skip
    assert isolated, "the case under test: an outlier whose neighbours are all outliers"
    assert torch.isfinite(features).all() and torch.isfinite(keys).all()
    torch.testing.assert_close(features[0], expected, rtol=1e-4, atol=1e-4)
