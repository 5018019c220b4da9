"""What a project's labeling config asks for: image objects and their brush/polygon label controls."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

from .errors import UnsupportedLabelConfigError

SUPPORTED_CONTROLS = {"brushlabels": "brushlabels", "polygonlabels": "polygonlabels"}
# Interactive prompts: smart keypoints and boxes (Label Studio sends them only with smart="true"), and text.
SMART_CONTROLS = {"keypointlabels": "keypoint", "rectanglelabels": "box", "textarea": "text"}


@dataclass(frozen=True)
class LabelControl:
    """One ``<BrushLabels>`` or ``<PolygonLabels>`` control on one ``<Image>``.

    ``labels`` are the config's label values; ``prompts[i]`` are the texts that
    find ``labels[i]``: the value itself plus its ``predicted_values`` synonyms.
    """

    from_name: str
    to_name: str
    data_key: str  # the task data field that holds the image URL
    result_type: str  # "brushlabels" or "polygonlabels"
    labels: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class SmartControl:
    """An interactive prompt control on an image: a smart ``<KeyPointLabels>`` or ``<RectangleLabels>``, or a
    ``<TextArea>``; ``kind`` is ``keypoint``, ``box`` or ``text``."""

    from_name: str
    to_name: str
    kind: str
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProjectSchema:
    controls: tuple[LabelControl, ...]
    smart: tuple[SmartControl, ...] = ()

    @property
    def data_keys(self) -> list[str]:
        return sorted({c.data_key for c in self.controls})

    @property
    def texts(self) -> list[str]:
        """Every label text and synonym of every output control, once each (what text embeddings are made of)."""
        return list(dict.fromkeys(text for control in self.controls for prompts in control.prompts for text in prompts))

    @property
    def labels_digest(self) -> str:
        """A short id of the label set proposals are made for: each output control's labels and synonyms.

        It is part of MaskCLIP's model version, so proposals for different
        label sets carry different versions.
        """
        parts = [[c.from_name, c.to_name, list(c.labels), [list(p) for p in c.prompts]] for c in self.controls]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:6]

    def output_for(self, to_name: str) -> LabelControl | None:
        """The brush (preferred) or polygon control that interactive masks on image ``to_name`` are given to."""
        on_image = [c for c in self.controls if c.to_name == to_name]
        brushes = [c for c in on_image if c.result_type == "brushlabels"]
        return (brushes or on_image or [None])[0]


def parse_label_config(config: str, max_labels: int = 1000, max_prompts: int = 4000) -> ProjectSchema:
    """Find the supported controls of a labeling config, or say clearly why there are none.

    Every label and synonym costs a text embedding and a class in every
    segmentation, so both are capped over the whole config (all controls).
    """
    if not isinstance(config, str) or not config.strip():
        raise UnsupportedLabelConfigError("the labeling config is empty; send the project's label_config XML.")
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises several types for malformed XML
        raise UnsupportedLabelConfigError(f"the labeling config is not valid XML: {exc}") from exc

    objects = {obj.name: obj for obj in interface.objects}
    controls: list[LabelControl] = []
    smart: list[SmartControl] = []
    seen = []
    for control in interface.controls:
        seen.append(control.tag)
        smart += _smart_controls(control, objects)
        controls += _label_controls(control, objects)
        _check_limits(controls, control, max_labels, max_prompts)
    if not controls:
        found = ", ".join(f"<{t}>" for t in dict.fromkeys(seen)) or "no control tags"
        raise UnsupportedLabelConfigError(
            f"this backend predicts <BrushLabels> and <PolygonLabels> on an <Image>; the config has {found}. "
            'Add e.g. <BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels>.'
        )
    return ProjectSchema(tuple(controls), tuple(s for s in smart if any(c.to_name == s.to_name for c in controls)))


def _smart_controls(control, objects: dict) -> list[SmartControl]:
    """A smart ``<KeyPointLabels>``/``<RectangleLabels>`` or a ``<TextArea>`` on images, as prompt controls."""
    kind = control.tag.lower()
    if kind not in SMART_CONTROLS or (kind != "textarea" and not _true(control.attr.get("smart"))):
        return []
    labels = tuple(getattr(control, "labels", ()) or ())
    return [
        SmartControl(control.name, to_name, SMART_CONTROLS[kind], labels)
        for to_name in control.to_name
        if to_name in objects and objects[to_name].tag.lower() == "image"
    ]


def _label_controls(control, objects: dict) -> list[LabelControl]:
    """A ``<BrushLabels>``/``<PolygonLabels>`` control, once per image it labels."""
    kind = control.tag.lower()
    if kind not in SUPPORTED_CONTROLS:
        return []
    found = []
    for to_name in control.to_name:
        target = objects.get(to_name)
        if target is None or target.tag.lower() != "image" or not target.value or not target.value.startswith("$"):
            continue
        labels = tuple(control.labels)
        if not labels:
            raise UnsupportedLabelConfigError(f"<{control.tag} name={control.name!r}> has no <Label> values.")
        prompts = tuple(_prompts(label, control.labels_attrs[label].attr) for label in labels)
        found.append(LabelControl(control.name, to_name, target.value[1:], SUPPORTED_CONTROLS[kind], labels, prompts))
    return found


def _check_limits(controls: list[LabelControl], control, max_labels: int, max_prompts: int) -> None:
    """Every label and synonym costs a text embedding and a class in every segmentation: both are capped."""
    if sum(len(c.labels) for c in controls) > max_labels:
        raise UnsupportedLabelConfigError(
            f"the config has over {max_labels} labels (at <{control.tag} name={control.name!r}>, all "
            f"controls counted), over this backend's limit; raise MASKCLIP_MAX_LABELS to allow more."
        )
    if sum(len(p) for c in controls for p in c.prompts) > max_prompts:
        raise UnsupportedLabelConfigError(
            f"the config has over {max_prompts} label texts and predicted_values synonyms (at "
            f"<{control.tag} name={control.name!r}>, all controls counted), over this backend's limit; "
            "raise MASKCLIP_MAX_PROMPTS to allow more."
        )


def _true(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _prompts(label: str, attrs: dict) -> tuple[str, ...]:
    synonyms = [s.strip() for s in str(attrs.get("predicted_values") or "").split(",") if s.strip()]
    return tuple(dict.fromkeys([label, *synonyms]))


class SchemaCache:
    """Parsed configs by their text: parsing XML for every request is wasted work."""

    def __init__(self, max_labels: int, size: int = 64, max_prompts: int = 4000) -> None:
        self.max_labels = max_labels
        self.max_prompts = max_prompts
        self.size = size
        self._items: OrderedDict[str, ProjectSchema] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, config: str) -> ProjectSchema:
        key = hashlib.sha256(config.encode()).hexdigest() if isinstance(config, str) else ""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        schema = parse_label_config(config, self.max_labels, self.max_prompts)
        with self._lock:
            self._items[key] = schema
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return schema
