"""A trained student on its way to serving: what judging, storing and promoting it share.

A training job builds one :class:`Candidate` once its student is trained and
hands that single object through every later step, rather than the same
handful of values loose (as :class:`workers.preannotate.RunContext` does for a
pre-annotation run).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ls_integration.training_data import ProjectData
from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.gate import GateConfig, Verdict, judge
from maskclip_engine.students.registry import ModelRegistry
from maskclip_service.settings import Settings

from .progress import Progress


@dataclass(frozen=True)
class Candidate:
    """One training job's student and everything it is judged, stored and promoted with."""

    project: int
    settings: Settings
    segmenter: Segmenter  # the teacher, under the job's settings
    checkpoint: StudentCheckpoint  # the trained student (its metrics are filled in once judged)
    labels: LabelSet
    data: ProjectData  # its held-out images are what it is judged on
    progress: Progress
    job: Any  # the RQ job running it; None outside a queue

    @cached_property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.settings.model_dir)

    @cached_property
    def gate(self) -> GateConfig:
        return GateConfig(margin=self.settings.gate_margin, confidence=self.settings.gate_confidence)

    def judge(self) -> Verdict:
        """The candidate against whatever model is active for the project right now."""
        return judge(
            self.segmenter, self.registry, self.project, self.checkpoint, self.labels, self.data.held_out, self.gate
        )
