"""How many windows one forward pass of the image tower takes, learnt from the device.

On a CPU a batch buys no throughput, so the tower takes one window at a
time (docs/performance.md measures it). On CUDA one window's forward is a few
milliseconds and launch-bound, so windows of equal size go through together,
up to ``SegmentOptions.batch_size``. A batch that does not fit the device's
memory is halved, and the smaller limit holds for every later batch of that
model, so an out-of-memory error costs one retry, not one per batch. A
single window that does not fit raises :class:`DeviceMemoryError`, which says
what to change.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

import torch

from maskclip_engine.errors import DeviceMemoryError

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class DeviceBatches:
    """The most windows one forward takes on a model's device (thread-safe)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.limit: int | None = 1 if device.type == "cpu" else None  # None: as large as the caller asks
        self._lock = threading.Lock()

    def run(self, pixels: torch.Tensor, forward: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` over ``pixels`` ``[B, 3, H, W]`` in batches within the limit; outputs concatenated."""
        parts = []
        start = 0
        while start < pixels.shape[0]:
            size = min(self.limit or pixels.shape[0], pixels.shape[0] - start)
            try:
                parts.append(forward(pixels[start : start + size]))
            except torch.OutOfMemoryError as exc:
                self._halve(size, pixels.shape[-2:], exc)
                continue  # the same windows again, in smaller batches
            start += size
        if len(parts) == 1:
            return parts[0]
        return torch.cat([f for f, _ in parts]), torch.cat([k for _, k in parts])

    def _halve(self, size: int, window: torch.Size, exc: BaseException) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if size == 1:
            raise DeviceMemoryError(
                f"one {window[0]}x{window[1]} window does not fit the memory of {self.device}; lower short_side or "
                "max_long_side, use mode 'slide' with a smaller crop, choose a lower precision, or free the device."
            ) from exc
        with self._lock:
            self.limit = max(1, min(self.limit or size, size) // 2)
            limit = self.limit
        log.warning(
            "%s ran out of memory on %d windows of %dx%d; batches of %d from now on",
            self.device,
            size,
            window[0],
            window[1],
            limit,
        )


_BY_MODEL: weakref.WeakKeyDictionary[torch.nn.Module, DeviceBatches] = weakref.WeakKeyDictionary()
_BY_MODEL_LOCK = threading.Lock()


def device_batches(model: torch.nn.Module, device: torch.device) -> DeviceBatches:
    """The one :class:`DeviceBatches` of ``model``: every segmenter sharing the model shares what was learnt."""
    with _BY_MODEL_LOCK:
        found = _BY_MODEL.get(model)
        if found is None or found.device != device:
            found = _BY_MODEL[model] = DeviceBatches(device)
        return found
