"""Training data is never all or nothing: bad annotations and images are skipped, counted, and the rest trains."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from ls_integration.errors import AnnotationError
from ls_integration.label_config import parse_label_config
from ls_integration.training_data import label_map
from tests.label_studio_server import TOKEN, brush_config, scene_project
from tests.scenes import CLASSES

CONTROL = parse_label_config(brush_config(CLASSES)).controls[0]


def brush(rle: list[int], width: int, height: int) -> dict:
    return {
        "from_name": CONTROL.from_name,
        "to_name": CONTROL.to_name,
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": rle, "brushlabels": [CLASSES[0]]},
    }


def polygon(points: list) -> dict:
    return {
        "from_name": CONTROL.from_name,
        "to_name": CONTROL.to_name,
        "type": "polygonlabels",
        "value": {"points": points, "polygonlabels": [CLASSES[0]]},
    }


def test_a_good_brush_region_reads() -> None:
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:10, 5:15] = 255
    rle = [int(b) for b in mask2rle(mask)]
    labels = label_map({"result": [brush(rle, 30, 20)]}, CONTROL, 20, 30)
    assert (labels == 0).sum() == 50 and (labels == -1).sum() == 550


@pytest.mark.parametrize(
    "region",
    [
        brush([255, 255, 255, 255, 0, 0, 0], 30, 20),  # the header claims 4 GiB: refused before decoding
        brush([int(b) for b in mask2rle(np.zeros((20, 30), dtype=np.uint8))], 300, 200),  # header and size disagree
        brush([0, 0, 9, 96, 1, 2], 30, 20),  # truncated: the header says 2400 values, the data ends
        brush([0, 0, 0, 16, 0, 0, 0], 10**6, 10**6),  # a trillion pixels claimed
        brush(["x", 1, 2, 3, 4], 30, 20),  # not bytes
        polygon([[10, 10], [20, float("nan")], [30, 40]]),
        polygon([[10, 10], [20], [30, 40]]),
        polygon([[10, 10], [1e300, 20], [30, 40]]),
        polygon([[i % 100, (i * 7) % 100] for i in range(200_000)]),
    ],
)
def test_bad_regions_are_refused_without_allocating(region: dict) -> None:
    started = time.perf_counter()
    with pytest.raises(AnnotationError):
        label_map({"result": [region]}, CONTROL, 20, 30)
    assert time.perf_counter() - started < 2


def test_a_project_with_a_corrupt_annotation_trains_and_reports_it(
    monkeypatch, label_studio, documents, tiny_vit, tmp_path
) -> None:
    project, tasks = scene_project(label_studio, documents, "one corrupt annotation", annotated=4, plain=1)
    corrupt = tasks[-1]  # the plain task gets an annotation whose RLE claims 4 GiB
    label_studio.api(
        "POST",
        f"/api/tasks/{corrupt['id']}/annotations",
        json={"result": [brush([255, 255, 255, 255, 0, 0], 160, 120)]},
    )
    label_studio.api("POST", f"/api/projects/{project}/import", json=[{"image": "/data/local-files/?d=gone.png"}])
    for key, value in {
        "MASKCLIP_MODEL": str(tiny_vit.config),
        "MASKCLIP_PRETRAINED": str(tiny_vit.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_SHORT_SIDE": "128",
        "MASKCLIP_TRAIN_CROP": "128",
        "MODEL_DIR": str(tmp_path),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
    }.items():
        monkeypatch.setenv(key, value)
    from workers.training_job import train_project

    result = train_project(project, trigger="test", options={"iterations": 10})
    assert result["skipped_annotations"] == 1 and result["skipped_images"] == 1
    assert result["version"] == f"student-p{project}-v1"
    assert result["held_out_miou"] is None or not math.isnan(result["held_out_miou"])
