from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from maskclip_engine import MASKCLIP_TEMPLATES, InvalidLabelsError, LabelSet, Segmenter
from maskclip_engine.backbone.short_context import ShortContextTower
from maskclip_engine.backbone.templates import SCENE_TEMPLATES
from maskclip_engine.backbone.text import TextEmbedder
from maskclip_engine.segmenter import label_logits
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
    grouped = label_logits(features, text, owner, 2)
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
    """Counts runs of the text encoder (short-context or full) behind the caches."""
    calls = [0]
    encode = segmenter.text._encode

    def counted(*args, **kwargs):
        calls[0] += 1
        return encode(*args, **kwargs)

    segmenter.text._encode = counted  # type: ignore[method-assign]
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
        f"emb = s.text_embeddings({labels!r})\n"
        "print(json.dumps({'calls': s.text.encoded_prompts, 'emb': emb.tolist()}))\n"
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


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_rn"])
def test_short_context_encoding_equals_encode_text(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    tiny: TinyModel = request.getfixturevalue(name)
    for pretrained in (tiny.state_dict, tiny.torchscript):  # GELU and QuickGELU towers
        segmenter = Segmenter.from_pretrained(str(tiny.config), str(pretrained), cache_dir=tmp_path / name)
        clip = segmenter.clip
        tower = ShortContextTower.of(clip.model)
        assert tower is not None
        sentences = [
            t.format(label) for label in ("cat", "a very long traffic light name", "x") for t in MASKCLIP_TEMPLATES
        ]
        tokens = clip.tokenizer(sentences)
        lengths = set((tower.pooled_positions(tokens) + 1).tolist())
        assert len(lengths) > 3 and max(lengths) < tokens.shape[1]  # several real lengths, all shorter than the context
        with torch.no_grad():
            full = clip.model.encode_text(tokens)
            short = tower.encode(tokens, batch_size=7)  # batches smaller than a length group, too
        torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
        # The embedder's short path equals its full-context path.
        full_embedder = TextEmbedder(clip, None, short_context=False)
        assert full_embedder.tower is None
        torch.testing.assert_close(
            TextEmbedder(clip, None).embed(["cat", "sky"]), full_embedder.embed(["cat", "sky"]), rtol=1e-5, atol=1e-6
        )


def test_non_causal_towers_keep_the_full_context(tiny_vit: TinyModel) -> None:
    model = open_clip.create_model(tiny_vit.name).eval()
    assert ShortContextTower.of(model) is not None
    model.attn_mask = torch.zeros_like(model.attn_mask)  # bidirectional: padding would change the result
    assert ShortContextTower.of(model) is None
    model = open_clip.create_model(tiny_vit.name).eval()
    model.text_pool_type = "last"  # the last position sees the padding
    assert ShortContextTower.of(model) is None
    assert ShortContextTower.of(torch.nn.Linear(2, 2)) is None


def test_memory_cache_is_bounded_lru(vit_segmenter: Segmenter) -> None:
    embedder = TextEmbedder(vit_segmenter.clip, None, templates=("a photo of a {}.",), memory_entries=2)
    embedder.embed(["a", "b"])
    embedder.embed(["a"])  # "a" becomes the most recent
    embedder.embed(["c"])  # evicts "b"
    assert embedder.memory_size == 2
    before = embedder.encoded_prompts
    embedder.embed(["a", "c"])
    assert embedder.encoded_prompts == before
    embedder.embed(["b"])
    assert embedder.encoded_prompts == before + 1
    with pytest.raises(ValueError):
        TextEmbedder(vit_segmenter.clip, None, memory_entries=-1)
