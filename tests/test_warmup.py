"""Label configs seen in /setup or a PROJECT_UPDATED webhook are embedded at once, a bounded number at a time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from backend.app import create_app
from ls_integration.label_config import parse_label_config
from ls_integration.predictor import Predictor
from maskclip_engine import SegmentOptions
from maskclip_service.errors import WarmupBusyError
from maskclip_service.settings import Settings
from tests.tiny_models import TinyModel


def brush_config(*labels: str) -> str:
    inner = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{inner}</BrushLabels></View>'
    )


@pytest.fixture
def predictor(tiny_vit: TinyModel, tmp_path: Path) -> Predictor:
    settings = Settings(
        model=str(tiny_vit.config),
        pretrained=str(tiny_vit.state_dict),
        device="cpu",
        cache_dir=tmp_path / "cache",
        model_dir=tmp_path / "models",
        segment=SegmentOptions(short_side=64),
        max_warmups=1,
        warmup_queue=1,
    )
    return Predictor.from_settings(settings)


def _cached(predictor: Predictor, *texts: str) -> bool:
    before = predictor.segmenter.text.encoded_prompts
    predictor.segmenter.text.embed(list(texts))
    return predictor.segmenter.text.encoded_prompts == before


def test_setup_warms_the_labels_in_the_background(predictor: Predictor) -> None:
    client = create_app(predictor.settings, predictor).test_client()
    reply = client.post("/setup", json={"project": "3", "schema": brush_config("road", "tree")})
    assert reply.status_code == 200
    assert predictor.warmup.submit(parse_label_config(brush_config("road", "tree")).texts).result(timeout=60) == 2
    assert _cached(predictor, "road", "tree")


def test_project_updated_webhook_warms_the_new_labels(predictor: Predictor) -> None:
    client = create_app(predictor.settings, predictor).test_client()
    # The payload as Label Studio 1.23.2 sends it: the project serialised with all its fields.
    payload = {"action": "PROJECT_UPDATED", "project": {"id": 4, "title": "p", "label_config": brush_config("boat")}}
    started = time.perf_counter()
    reply = client.post("/webhook", json=payload)
    assert reply.status_code == 200 and reply.json["status"] == "warming"
    assert time.perf_counter() - started < 0.5  # Label Studio's webhook timeout is 1 s
    predictor.warmup.submit(parse_label_config(brush_config("boat")).texts).result(timeout=60)
    assert _cached(predictor, "boat")
    bad = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 4, "label_config": "<View/>"}})
    assert bad.status_code == 200 and bad.json["status"] == "ignored"


def test_warmups_are_bounded_and_a_flood_gets_429(predictor: Predictor) -> None:
    client = create_app(predictor.settings, predictor).test_client()
    warmup = predictor.warmup
    with predictor._device_lock:  # a long prediction holds the model: warm-ups wait for it
        first = warmup.submit(parse_label_config(brush_config("cat")).texts)
        assert warmup.submit(parse_label_config(brush_config("cat")).texts) is first  # seen before: not warmed again
        second = warmup.submit(parse_label_config(brush_config("dog")).texts)  # waits in the queue
        assert warmup.pending == 2
        with pytest.raises(WarmupBusyError, match="MASKCLIP_MAX_WARMUPS"):
            warmup.submit(parse_label_config(brush_config("fish")).texts)
        reply = client.post("/setup", json={"project": "5", "schema": brush_config("bird")})
        assert reply.status_code == 429 and "MASKCLIP_WARMUP_QUEUE" in reply.json["error"]
        flood = client.post(
            "/webhook", json={"action": "PROJECT_UPDATED", "project": {"label_config": brush_config("x")}}
        )
        assert flood.status_code == 429
        assert client.get("/health").status_code == 200  # the server stays responsive
    assert first.result(timeout=60) == 1 and second.result(timeout=60) == 1
    assert warmup.pending == 0
    assert client.post("/setup", json={"project": "5", "schema": brush_config("bird")}).status_code == 200
