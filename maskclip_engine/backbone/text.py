"""Class text embeddings: the prompt ensemble, cached in memory and on disk.

A text embedding depends only on the model, its weights, the templates and the
text, so it is computed once per machine: the key of each entry is a hash of
those four, and each entry is one small ``.npy`` file written atomically.

Prompts are encoded at their real token length (see :mod:`.short_context`),
always in float32: the cache is shared by processes of every precision.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.atomic import atomic_write
from maskclip_engine.backbone.loading import LoadedClip
from maskclip_engine.backbone.short_context import ShortContextTower
from maskclip_engine.backbone.templates import MASKCLIP_TEMPLATES, templates_digest

DEFAULT_MEMORY_ENTRIES = 4096  # one entry is a few KB (D float32s): a few MB at most

log = logging.getLogger(__name__)


class TextEmbedder:
    """Turns texts into L2-normalised template-ensemble embeddings ``[N, D]`` (float32, CPU).

    Thread-safe. ``cache_dir=None`` keeps the cache on disk off. The memory
    cache keeps the ``memory_entries`` most recently used texts (LRU), so a
    long-running server that sees many label sets stays bounded.
    ``short_context=False`` forces the full context length (for comparison).
    """

    def __init__(
        self,
        clip: LoadedClip,
        cache_dir: Path | None,
        templates: Sequence[str] = MASKCLIP_TEMPLATES,
        batch_size: int = 256,
        memory_entries: int = DEFAULT_MEMORY_ENTRIES,
        short_context: bool = True,
    ) -> None:
        if memory_entries < 0:
            raise ValueError(f"memory_entries must be 0 or more, got {memory_entries}.")
        self.clip = clip
        self.templates = tuple(templates)
        self.batch_size = batch_size
        self.memory_entries = memory_entries
        self.cache_dir = Path(cache_dir) / "text-embeddings" if cache_dir is not None else None
        self.tower = ShortContextTower.of(clip.model) if short_context else None
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded_prompts = 0  # how many sentences went through the text encoder

    def _key(self, text: str) -> str:
        # "v2": entries are float32 from a float32 text tower; older caches held entries rounded to fp16/bf16.
        identity = "\0".join(("v2", self.clip.model_id, self.clip.weights_id, templates_digest(self.templates), text))
        return hashlib.sha256(identity.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.npy"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of ``texts`` in order, computing only what no cache holds."""
        keys = [self._key(t) for t in texts]
        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for key in keys:
                if key in self._memory:
                    found[key] = self._memory[key]
                    self._memory.move_to_end(key)
        for key in keys:
            if key not in found and (loaded := self._read(key)) is not None:
                found[key] = loaded
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        if missing:
            for text, emb in zip(missing, self._encode(missing)):
                key = self._key(text)
                found[key] = emb
                self._write(key, emb)
        self._remember(found)
        return torch.stack([found[k] for k in keys])

    def _remember(self, found: dict[str, torch.Tensor]) -> None:
        with self._lock:
            for key, emb in found.items():
                self._memory[key] = emb
                self._memory.move_to_end(key)
            while len(self._memory) > self.memory_entries:
                self._memory.popitem(last=False)

    @property
    def memory_size(self) -> int:
        """How many texts the memory cache holds now."""
        with self._lock:
            return len(self._memory)

    def _read(self, key: str) -> torch.Tensor | None:
        if self.cache_dir is None:
            return None
        path = self._path(key)
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable text-cache entry %s: %s", path, exc)
            return None
        if array.shape != (self.clip.embed_dim,):
            return None
        return torch.from_numpy(array.astype(np.float32))

    def _write(self, key: str, emb: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        path = self._path(key)
        try:
            # A cache entry is cheap to recompute: no fsync, only the rename's atomicity.
            atomic_write(path, lambda handle: np.save(handle, emb.numpy()), durable=False)
        except OSError as exc:  # a read-only cache must not break segmentation
            log.warning("could not write text cache %s: %s", path, exc)

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Per-prompt L2 norm, mean over templates, renorm: the CLIP prompt ensemble."""
        sentences = [template.format(text) for text in texts for template in self.templates]
        tokens = self.clip.tokenizer(sentences).to(self.clip.device)
        if self.tower is not None:
            encoded = self.tower.encode(tokens, self.batch_size)
        else:
            model = self.clip.model
            encoded = torch.cat(
                [model.encode_text(tokens[i : i + self.batch_size]) for i in range(0, len(tokens), self.batch_size)]
            )
        self.encoded_prompts += len(sentences)
        per_prompt = F.normalize(encoded.float(), dim=-1).cpu().reshape(len(texts), len(self.templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)
