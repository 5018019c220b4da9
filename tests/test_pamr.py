"""PAMR: refined class maps move to the image's colour edges; the option reaches engine, backend and CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskclip_engine import Segmenter, SegmentOptions
from maskclip_engine.head.pamr import colour_affinities, pamr, propagate, refine_against_image
from maskclip_engine.head.refinement import Refined
from tests.conftest import scene

EDGE = 37  # the true colour edge: columns < 37 are red, the rest green


def two_colour_image(height: int = 48, width: int = 96, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3))
    image[:, :EDGE] = (200, 50, 40)
    image[:, EDGE:] = (40, 170, 60)
    image += rng.normal(0, 8, image.shape)
    return torch.from_numpy(image.clip(0, 255)).permute(2, 0, 1).float() / 255


def blurred_edge(height: int, width: int, centre: float, softness: float) -> torch.Tensor:
    """Two-class maps ``[2, H, W]`` whose 0.5 crossing is at column ``centre`` (a coarse prediction's blur)."""
    x = torch.arange(width).float() + 0.5
    left = torch.sigmoid((centre - x) / softness).expand(height, width)
    return torch.stack([left, 1 - left])


def crossing(maps: torch.Tensor) -> float:
    """Mean over rows of the first column where class 1 overtakes class 0."""
    right = (maps[1] > maps[0]).float()
    return float(right.argmax(dim=1).float().mean())


def test_refinement_moves_a_blurred_edge_to_the_colour_edge() -> None:
    image = two_colour_image()
    maps = blurred_edge(48, 96, centre=45.0, softness=6.0)  # 8 pixels off, as from a 1/16 grid
    assert crossing(maps) == pytest.approx(45, abs=0.5)
    refined = pamr(maps, image, iterations=10)
    assert abs(crossing(refined) - EDGE) <= 1.0
    # Probabilities in, probabilities out: the weights are a convex combination.
    torch.testing.assert_close(refined.sum(0), torch.ones(48, 96))
    assert refined.min() >= 0
    # From the other side too.
    assert abs(crossing(pamr(blurred_edge(48, 96, 30.0, 6.0), image)) - EDGE) <= 1.0


def test_more_iterations_move_the_edge_further() -> None:
    image = two_colour_image(seed=1)
    maps = blurred_edge(48, 96, centre=47.0, softness=6.0)
    distances = [abs(crossing(pamr(maps, image, iterations=n)) - EDGE) for n in (0, 2, 10)]
    assert distances[0] > distances[1] > distances[2]


def test_flat_image_gives_equal_weights_and_keeps_a_constant_map() -> None:
    image = torch.full((3, 20, 30), 0.5)
    affinity = colour_affinities(image, dilations=(1, 2))
    assert affinity.weights.shape == (16, 20, 30)
    torch.testing.assert_close(affinity.weights, torch.full_like(affinity.weights, 1 / 16))
    constant = torch.full((2, 20, 30), 0.25)
    torch.testing.assert_close(propagate(constant, affinity, 5), constant)


def test_refine_against_image_works_on_kept_classes_at_its_stride() -> None:
    image = two_colour_image(64, 96)
    grid = blurred_edge(4, 6, centre=2.8, softness=0.4)  # a 1/16 grid of the 64x96 image
    probs = torch.cat([grid, torch.zeros(1, 4, 6)])  # a third class prompt denoising removed
    kept = torch.tensor([True, True, False])
    out = refine_against_image(Refined(probs=probs, kept=kept), image, iterations=10, stride=2)
    assert out.probs.shape == (2, 32, 48) and out.scores is None and torch.equal(out.kept, kept)
    up = torch.nn.functional.interpolate(out.probs[None], size=(64, 96), mode="bilinear")[0]
    assert abs(crossing(up) - EDGE) <= 2.0
    scored = refine_against_image(Refined(probs=probs, kept=kept, scores=probs * 0.01), image, 10, 2)
    torch.testing.assert_close(scored.scores, scored.probs * 0.01)  # labels and confidences move together


def test_segment_with_pamr(vit_segmenter: Segmenter) -> None:
    image = scene(70, 110)
    labels = ["brick wall", "grass", "blue sky"]
    plain = vit_segmenter.segment(image, labels)
    refined = vit_segmenter.segment(image, labels, pamr=True, pamr_stride=2)
    assert refined.label_map.shape == (70, 110) and refined.dropped == plain.dropped
    assert 0 <= refined.confidence.min() and refined.confidence.max() <= 1 + 1e-4
    assert not np.array_equal(refined.label_map, plain.label_map)
    window = vit_segmenter.segment(
        image,
        labels,
        pamr=True,
        mode="slide",
        crop=48,
        stride=32,
        slide_refine="window",
        key_smoothing_variant="released",
    )
    assert window.label_map.shape == (70, 110)


def test_pamr_settings_from_the_environment_change_the_model_version(monkeypatch) -> None:
    from ls_integration.predictor import model_version
    from maskclip_service.settings import Settings

    default = Settings.from_env().segment
    monkeypatch.setenv("MASKCLIP_PAMR", "true")
    monkeypatch.setenv("MASKCLIP_PAMR_ITERATIONS", "5")
    monkeypatch.setenv("MASKCLIP_KS_VARIANT", "released")
    monkeypatch.setenv("MASKCLIP_SLIDE_REFINE", "window")
    options = Settings.from_env().segment
    assert options.pamr and options.pamr_iterations == 5
    assert options.key_smoothing_variant == "released" and options.slide_refine == "window"
    assert model_version("ViT-B-16", "tag:openai", options) != model_version("ViT-B-16", "tag:openai", default)
    monkeypatch.setenv("MASKCLIP_PAMR_STRIDE", "0")
    with pytest.raises(Exception, match="pamr_stride"):
        Settings.from_env()
    assert SegmentOptions().pamr is False


def test_segment_command_takes_the_refinement_flags(tiny_vit, tmp_path, monkeypatch) -> None:
    import json

    from click.testing import CliRunner
    from PIL import Image

    from maskclip_engine.cli.main import main

    monkeypatch.setenv("MASKCLIP_CACHE_DIR", str(tmp_path / "cache"))
    Image.fromarray(scene(80, 120, seed=5)).save(tmp_path / "photo.png")
    model = ["--model", str(tiny_vit.config), "--pretrained", str(tiny_vit.state_dict)]
    flags = ["--mode", "slide", "--crop", "48", "--stride", "32", "--short-side", "64"]
    flags += ["--ks-variant", "released", "--slide-refine", "window", "--pamr", "--pamr-stride", "2"]
    args = ["segment", str(tmp_path / "photo.png"), "--labels", "wall,grass", *model, "--out", str(tmp_path / "out")]
    run = CliRunner().invoke(main, [*args, *flags])
    assert run.exit_code == 0, run.output
    options = json.loads((tmp_path / "out" / "photo.json").read_text())["options"]
    assert options["key_smoothing_variant"] == "released" and options["slide_refine"] == "window"
    assert options["pamr"] is True and options["pamr_stride"] == 2
    bad = CliRunner().invoke(main, [*args, "--pamr-stride", "0"])
    assert bad.exit_code == 2 and "pamr_stride" in bad.output
