from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maskclip_engine import MASKCLIP_TEMPLATES, InvalidLabelsError, LabelSet, Segmenter
from maskclip_engine.prompts import SCENE_TEMPLATES
from maskclip_engine.segmenter import Segmenter as _Segmenter
from tests.tiny_models import TinyModel


def test_85_templates_are_clip_imagenet_plus_scene() -> None:
    assert len(MASKCLIP_TEMPLATES) == 85
    assert MASKCLIP_TEMPLATES[0] == "a bad photo of a {}."
    assert MASKCLIP_TEMPLATES[-5:] == SCENE_TEMPLATES
    assert all(t.count("{}") == 1 for t in MASKCLIP_TEMPLATES)


def test_text_embeddings_are_the_normalised_prompt_ensemble(vit_segmenter: Segmenter) -> None:
    clip = vit_segmenter.clip
    embeddings = vit_segmenter.text_embeddings(["cat", "traffic light"])
    assert embeddings.shape == (2, clip.embed_dim)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        sentences = [t.format("traffic light") for t in MASKCLIP_TEMPLATES]
        each = F.normalize(clip.model.encode_text(clip.tokenizer(sentences)), dim=-1)
    torch.testing.assert_close(embeddings[1], F.normalize(each.mean(0), dim=0), rtol=1e-4, atol=1e-5)


def test_a_label_with_synonyms_has_one_row_their_renormalised_mean(vit_segmenter: Segmenter) -> None:
    rows = vit_segmenter.text_embeddings([["dog", "puppy"], "grass"])
    single = vit_segmenter.text_embeddings(["dog", "puppy"])
    torch.testing.assert_close(rows[0], F.normalize(single.sum(0), dim=0))


def test_label_logit_is_the_max_over_its_synonyms(vit_segmenter: Segmenter) -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 32, 3, 4)
    text = F.normalize(torch.randn(3, 32), dim=-1)
    owner = torch.tensor([0, 0, 1])
    grouped = _Segmenter._label_logits(features, text, owner, 2)
    each = torch.einsum("bdhw,sd->bshw", F.normalize(features, dim=1), text)
    torch.testing.assert_close(grouped[:, 0], each[:, :2].amax(dim=1))
    torch.testing.assert_close(grouped[:, 1], each[:, 2])


def test_label_parsing() -> None:
    labels = LabelSet.from_string(" cat , dog|puppy ,grass")
    assert labels.names == ["cat", "dog", "grass"]
    assert labels.prompts == ["cat", "dog", "puppy", "grass"]
    assert labels.owner == [0, 1, 1, 2]
    for bad in ([], ["cat", ""], ["cat", "cat"], [["dog", 3]], "cat,dog"):
        with pytest.raises(InvalidLabelsError):
            LabelSet.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidLabelsError):
        LabelSet.from_string("cat,,dog")


def _counting(segmenter: Segmenter) -> list[int]:
    calls = [0]
    encode = segmenter.clip.model.encode_text

    def counted(*args, **kwargs):
        calls[0] += 1
        return encode(*args, **kwargs)

    segmenter.clip.model.encode_text = counted  # type: ignore[method-assign]
    return calls


def test_text_cache_second_call_and_second_process(tiny_vit: TinyModel, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    labels = ["sky", ["road", "street"], "tree"]
    segmenter = Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.state_dict), cache_dir=cache)
    calls = _counting(segmenter)
    first = segmenter.text_embeddings(labels)
    assert calls[0] > 0 and segmenter.text.encoded_prompts == 4 * 85
    calls[0] = 0
    again = segmenter.text_embeddings(labels)
    segmenter.segment(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), labels)
    assert calls[0] == 0
    torch.testing.assert_close(first, again)

    script = (
        "import json, sys, torch\n"
        "from maskclip_engine import Segmenter\n"
        f"s = Segmenter.from_pretrained({str(tiny_vit.config)!r}, {str(tiny_vit.state_dict)!r},"
        f" cache_dir={str(cache)!r})\n"
        "calls = [0]\n"
        "encode = s.clip.model.encode_text\n"
        "def counted(*a, **k):\n"
        "    calls[0] += 1\n"
        "    return encode(*a, **k)\n"
        "s.clip.model.encode_text = counted\n"
        f"emb = s.text_embeddings({labels!r})\n"
        "print(json.dumps({'calls': calls[0], 'emb': emb.tolist()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["calls"] == 0
    torch.testing.assert_close(torch.tensor(report["emb"]), first)


def test_cache_is_keyed_by_weights_and_templates(tiny_vit: TinyModel, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.state_dict), cache_dir=cache)
    plain.text_embeddings(["boat"])
    other = Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.torchscript), cache_dir=cache)
    other_calls = _counting(other)
    other.text_embeddings(["boat"])
    assert other_calls[0] > 0  # other weights: not served from the first model's entries
    from maskclip_engine.text import TextEmbedder

    short = TextEmbedder(plain.clip, cache, templates=("a photo of a {}.",))
    short.embed(["boat"])
    assert short.encoded_prompts == 1


def test_unreadable_cache_entry_is_recomputed(tiny_vit: TinyModel, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    segmenter = Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.state_dict), cache_dir=cache)
    good = segmenter.text_embeddings(["lamp"])
    for entry in (cache / "text-embeddings").rglob("*.npy"):
        entry.write_bytes(b"garbage")
    fresh = Segmenter.from_pretrained(str(tiny_vit.config), str(tiny_vit.state_dict), cache_dir=cache)
    torch.testing.assert_close(fresh.text_embeddings(["lamp"]), good)
    assert fresh.text.encoded_prompts == 85
