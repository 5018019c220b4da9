"""The on-disk feature store: each image's backbone output, shared by every process that can see the folder.

Backend replicas and workers on many hosts point at one folder (by default
``MODEL_DIR/features``). Each entry is one safetensors file named by the hash
of its :class:`~maskclip_engine.features.image_features.FeatureKey`::

    features/
        3f/3fa9...c1.safetensors     features, keys and window geometry of one image

* **Compact**: features in 8 bits and keys in 4 bits per value, one fp16 scale
  per location and 256-channel block (:mod:`~maskclip_engine.features.compact`):
  about 0.94 MB for a 640x480 image at short side 448. :meth:`FeatureStore.put` returns the values
  as they read back, so an image's first answer equals every later one.
  Entries written before this encoding (16-bit ``features`` and ``keys``) are
  still read.
* **Never served wrong**: the file's metadata holds the full key and a
  CRC-32 of the tensor bytes; a truncated, corrupt or mismatched entry is
  deleted and reported as missing, so the caller recomputes it.
* **Atomic, many writers**: entries are written to a temporary name and
  renamed into place; two processes writing the same image write the same
  bytes, and readers see one whole file or none.
* **Bounded**: at most ``max_bytes`` in all; reading an entry refreshes its
  modification time, and the least recently used entries go first. Writers
  keep one running total in the folder under an advisory file lock, so many
  writers together pass the bound by at most an entry each.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from maskclip_engine.atomic import atomic_write
from maskclip_engine.features import compact
from maskclip_engine.features.image_features import FeatureKey, ImageFeatures, Window

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
FEATURE_BITS, KEY_BITS = 8, 4
STALE_TEMP_S = 3600  # a temporary file this old was left by a killed writer
_SCAN_EVERY = 32  # a process counts the folder on its first write and every 32 writes; between, the shared total
TOTAL = ".total"  # the bytes the entries take, as the writers keep count under the lock


class FeatureStore:
    """Image features on disk under ``root``, at most ``max_bytes`` (``0``: the store is off)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the feature store size must be 0 (off) or more bytes, got {max_bytes}.")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._writes = 0
        self.hits = self.misses = self.rejected = 0

    @classmethod
    def sized(cls, root: Path, gigabytes: float) -> FeatureStore:
        return cls(root, int(gigabytes * 1024**3))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def path(self, key: FeatureKey) -> Path:
        digest = key.digest
        return self.root / digest[:2] / f"{digest}{SUFFIX}"

    # ------------------------------------------------------------------ reading
    def get(self, key: FeatureKey, device: torch.device | str = "cpu") -> ImageFeatures | None:
        """The stored features of ``key`` in float32 on ``device``, or ``None`` (missing or unusable)."""
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            features = self._read(path, key, device)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            log.warning("feature store entry %s is unusable and is recomputed: %s", path, exc)
            self.rejected += 1
            self.misses += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        try:
            os.utime(path)  # recency for eviction
        except OSError:
            pass
        return features

    def _read(self, path: Path, key: FeatureKey, device: torch.device | str) -> ImageFeatures:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if json.loads(meta.get("key", "null")) != key.to_dict():
                raise ValueError("its key does not match (another image, model or option set)")
            tensors = {name: handle.get_tensor(name) for name in sorted(handle.keys())}
        if meta.get("checksum") != _checksum(*tensors.values()):
            raise ValueError("its tensors do not match their checksum (corrupt or partly written)")
        if meta.get("format") == compact.FORMAT:
            channels = json.loads(meta["channels"])
            features = compact.decode(_quantised(tensors, "features", channels[0], FEATURE_BITS), device)
            keys = compact.decode(_quantised(tensors, "keys", channels[1], KEY_BITS), device)
        elif "format" in meta:
            raise ValueError(f"it was written in format {meta['format']!r}, which this version does not read")
        else:  # the 16-bit entries of earlier versions
            features = tensors["features"].to(device, torch.float32)
            keys = tensors["keys"].to(device, torch.float32)
        windows = tuple(Window(*w) for w in json.loads(meta["windows"]))
        if features.shape[0] != len(windows) or keys.shape[0] != len(windows):
            raise ValueError("its tensors do not hold one map per window")
        return ImageFeatures(
            features=features,
            keys=keys,
            windows=windows,
            resized=tuple(json.loads(meta["resized"])),  # type: ignore[arg-type]
            image_size=tuple(json.loads(meta["image_size"])),  # type: ignore[arg-type]
            stride=int(meta["stride"]),
        )

    # ------------------------------------------------------------------ writing
    def put(self, key: FeatureKey, value: ImageFeatures) -> ImageFeatures:
        """Store ``value`` compactly; returns it as it reads back. Never raises for a full or read-only disk.

        With the store off, ``value`` comes back unchanged.
        """
        if not self.enabled:
            return value
        features = compact.encode(value.features, FEATURE_BITS)
        keys = compact.encode(value.keys, KEY_BITS)
        device = value.features.device
        rounded = ImageFeatures(
            compact.decode(features, device),
            compact.decode(keys, device),
            value.windows,
            value.resized,
            value.image_size,
            value.stride,
        )
        tensors = dict(sorted({**features.tensors("features"), **keys.tensors("keys")}.items()))
        metadata = {
            "format": compact.FORMAT,
            "key": json.dumps(key.to_dict(), sort_keys=True),
            "checksum": _checksum(*tensors.values()),
            "channels": json.dumps([features.channels, keys.channels]),
            "windows": json.dumps([[w.top, w.left, w.height, w.width] for w in value.windows]),
            "resized": json.dumps(list(value.resized)),
            "image_size": json.dumps(list(value.image_size)),
            "stride": str(value.stride),
        }
        data = save(tensors, metadata=metadata)
        if len(data) > self.max_bytes:
            return rounded
        path = self.path(key)
        try:
            atomic_write(path, lambda handle: handle.write(data), durable=False)  # an entry can always be recomputed
        except OSError as exc:
            log.warning("could not write feature store entry %s: %s", path, exc)
            return rounded
        with self._lock:
            self._writes += 1
            count = self._writes % _SCAN_EVERY == 1  # drift (deletions by hand, lost updates) is corrected here
        with self._exclusive():
            total = None if count else self._read_total()
            if total is None or total + len(data) > self.max_bytes:
                total = self._evict()
            else:
                total += len(data)
            self._write_total(total)
        return rounded

    # ------------------------------------------------------------------ bounding
    def entries(self) -> Iterator[os.DirEntry]:
        """Every stored entry (temporary files of writers at work are not entries)."""
        if not self.root.is_dir():
            return
        for shard in os.scandir(self.root):
            if shard.is_dir(follow_symlinks=False) and len(shard.name) == 2:
                yield from (e for e in os.scandir(shard.path) if e.name.endswith(SUFFIX) and e.is_file())

    def size(self) -> int:
        """Bytes the entries take now."""
        return sum(_stat_size(e) for e in self.entries())

    def evict(self) -> int:
        """Drop least recently used entries until the store fits its bound; returns the bytes now stored."""
        with self._exclusive():
            total = self._evict()
            self._write_total(total)
        return total

    def _evict(self) -> int:
        """:meth:`evict`'s work; the caller holds the lock."""
        found = []
        for entry in self.entries():
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue  # another process evicted it
            found.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in found)
        for _, size, path in sorted(found):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            total -= size
        self._remove_stale_temporaries()
        return total

    def _read_total(self) -> int | None:
        try:
            return int((self.root / TOTAL).read_text())
        except (OSError, ValueError):
            return None  # never counted, or torn by a killed writer: count the folder

    def _write_total(self, total: int) -> None:
        try:
            (self.root / TOTAL).write_text(str(total))
        except OSError as exc:
            log.warning("could not record the feature store's size: %s", exc)

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        for shard in self.root.glob("??"):
            for temporary in shard.glob(".*.tmp"):
                try:
                    if temporary.stat().st_mtime < cutoff:
                        temporary.unlink()
                except FileNotFoundError:
                    pass

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One evictor at a time among the processes sharing the folder (advisory ``flock``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".evict.lock", "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except OSError:  # a file system without locks: eviction still works, only less coordinated
                pass
            try:
                yield
            finally:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                except OSError:
                    pass


def _quantised(tensors: dict[str, torch.Tensor], name: str, channels: int, bits: int) -> compact.Quantised:
    return compact.Quantised(tensors[f"{name}.values"], tensors[f"{name}.scales"], int(channels), bits)


def _checksum(*tensors: torch.Tensor) -> str:
    """CRC-32 of the tensors' shapes, dtypes and bytes: it catches damage, not tampering, and costs a few
    milliseconds for an entry."""
    crc = 0
    for tensor in tensors:
        crc = zlib.crc32(str((tuple(tensor.shape), str(tensor.dtype))).encode(), crc)
        crc = zlib.crc32(tensor.contiguous().view(torch.uint8).numpy(), crc)
    return f"crc32:{crc:08x}"


def _stat_size(entry: os.DirEntry) -> int:
    try:
        return entry.stat().st_size
    except FileNotFoundError:
        return 0
