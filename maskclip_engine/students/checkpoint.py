"""Student checkpoints: self-describing files that load with ``weights_only``.

Architecture, labels, synonyms, text embeddings, the teacher and the
segmentation options it was trained under (dense mode, refinements,
thresholds) and metrics travel with the weights.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskclip_engine.atomic import atomic_write
from maskclip_engine.config import SegmentOptions
from maskclip_engine.errors import InvalidOptionError, WeightsUnavailableError
from maskclip_engine.students.network import StudentConfig, StudentNet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "maskclip-student/2"
# /1: one mean text embedding per label, no recorded options; still loads, served as it was trained.
READABLE_FORMATS = ("maskclip-student/1", CHECKPOINT_FORMAT)


@dataclass
class StudentCheckpoint:
    """A student and everything needed to use and judge it.

    ``options`` are the teacher's segmentation options the student was trained
    under (the worker's): its dense mode decides the CLIP features a ``clip``
    student reads, at training and when served; the rest (refinements,
    thresholds, logit scale) record how its pseudo-labels were made.
    """

    net: StudentNet
    labels: list[str]
    prompts: list[list[str]]
    teacher: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    options: SegmentOptions = field(default_factory=SegmentOptions)

    @property
    def dense_mode(self) -> str:
        return self.options.dense_mode

    def save(self, path: Path) -> None:
        """Write atomically: a reader (or a crash) never sees a half-written file."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.net.config).items()
            },
            "labels": list(self.labels),
            "prompts": [list(p) for p in self.prompts],
            "text_embeddings": self.net.classifier.text.detach().cpu(),
            "text_owner": self.net.classifier.owner.detach().cpu(),
            "options": self.options.to_dict(),
            "teacher": dict(self.teacher),
            "metrics": dict(self.metrics),
            "info": dict(self.info),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
        }
        atomic_write(Path(path), lambda handle: torch.save(payload, handle))

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> StudentCheckpoint:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsUnavailableError(f"student checkpoint {path} does not exist.") from None
        except Exception as exc:
            raise WeightsUnavailableError(f"student checkpoint {path} could not be read: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
            raise WeightsUnavailableError(f"{path} is not a MaskCLIP student checkpoint ({CHECKPOINT_FORMAT}).")
        config_fields = dict(payload["config"])
        config_fields["dilations"] = tuple(config_fields.get("dilations", ()))
        config = StudentConfig(**{**config_fields, "backbone_weights": None})
        # The trained weights replace any ImageNet initialisation, so none is looked up.
        net = StudentNet(config, payload["text_embeddings"], pretrained_backbone=False, owner=payload.get("text_owner"))
        net.load_state_dict(payload["state_dict"])
        net.to(device).eval().requires_grad_(False)
        info = payload["info"]
        options = _recorded_options(path, payload.get("options"), info)
        return cls(net, payload["labels"], payload["prompts"], payload["teacher"], payload["metrics"], info, options)


def _recorded_options(path: Path, recorded: dict[str, Any] | None, info: dict[str, Any]) -> SegmentOptions:
    """The options a checkpoint was trained under; defaults (dense mode ``maskclip``) for older ones."""
    if recorded is None:
        mode = str(info.get("dense_mode", "maskclip"))
        log.info("student %s predates recorded training options: served with dense_mode %r", path, mode)
        recorded = {"dense_mode": mode}
    known = {f.name for f in dataclasses.fields(SegmentOptions)}
    dropped = sorted(set(recorded) - known)
    if dropped:  # written by a version with options this one does not have
        log.warning("student %s records options this version does not know, ignored: %s", path, dropped)
    try:
        return SegmentOptions(**{k: v for k, v in recorded.items() if k in known})
    except (InvalidOptionError, TypeError) as exc:
        raise WeightsUnavailableError(f"student checkpoint {path} records invalid options: {exc}") from exc
