"""The README's Python snippet runs as written, on a tiny local model in place of the real weights."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import scene
from tests.tiny_models import TinyModel

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_snippet() -> str:
    section = README.read_text().split("## Use it from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README.md's 'Use it from Python' section has no python block"
    return match.group(1)


def test_the_readme_snippet_segments_an_image(tiny_vit: TinyModel, tmp_path: Path, monkeypatch) -> None:
    snippet = _python_snippet()
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 4  # the import and three lines
    # Only the weights and the file change: real CLIP weights cannot be downloaded here.
    tiny = f'"{tiny_vit.config}", pretrained="{tiny_vit.state_dict}"'
    snippet = snippet.replace('"ViT-B-16", pretrained="openai"', tiny)
    assert str(tiny_vit.state_dict) in snippet, "the snippet no longer builds its segmenter the way this test expects"
    Image.fromarray(scene(seed=3)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    result = namespace["result"]
    assert result.label_map.shape == (96, 160)
    assert result.masks and set(result.masks) <= {"cat", "dog", "grass"}
    for mask in result.masks.values():
        assert mask.shape == (96, 160) and mask.dtype == np.bool_
