"""Exact text encoding at each prompt's real token length.

open_clip pads every prompt to the full context (77 tokens for CLIP), though
a prompt ensemble's sentences are about 8-20 tokens long. In a text tower
with a causal attention mask, position ``i`` attends to positions ``<= i``
only, so the output at the pooled position (the end-of-text token for
``argmax``/``eos`` pooling) never sees the padding after it: cutting the
sequence just after that position, with the positional embedding and the
causal mask cut to match, gives the same embedding for a fraction of the work.

:meth:`ShortContextTower.of` recognises the towers where this holds and
returns ``None`` for the others (bidirectional towers, padding masks, a
class token appended at the end, Hugging Face text models, ``last``
pooling), which then keep the full context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer, text_global_pool

_EXACT_POOLS = ("argmax", "eos", "first")


@dataclass(frozen=True)
class ShortContextTower:
    """The pieces of an open_clip causal text tower, run on cut sequences."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    attn_mask: torch.Tensor
    ln_final: torch.nn.Module
    projection: torch.nn.Module | torch.Tensor | None
    pool_type: str
    eos_id: int | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> ShortContextTower | None:
        """The short-context view of ``model``'s text tower, or ``None`` where it would not be exact."""
        if isinstance(model, CLIP):
            owner, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
        elif isinstance(getattr(model, "text", None), TextTransformer):
            owner = model.text
            if owner.cls_emb is not None or owner.use_pad_mask or owner.output_tokens:
                return None
            pool, eos = owner.pool_type, owner.eos_id
        else:
            return None
        mask = getattr(owner, "attn_mask", None)
        if pool not in _EXACT_POOLS or mask is None or not _is_causal(mask):
            return None
        if pool == "eos" and eos is None:
            return None
        return cls(
            token_embedding=owner.token_embedding,
            positional_embedding=owner.positional_embedding,
            transformer=owner.transformer,
            attn_mask=mask,
            ln_final=owner.ln_final,
            projection=owner.text_projection,
            pool_type=pool,
            eos_id=eos,
        )

    def pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index ``[B]`` of the position each row is pooled from (as open_clip's pooling picks it)."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)

    def encode(self, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Embeddings ``[B, D]`` equal to ``encode_text(tokens)``, rows batched by their real length.

        Rows are sorted by length and each batch is cut at its longest row: a
        shorter row's padding comes after its pooled position, where the causal
        mask hides it, so one batch serves several lengths exactly.
        """
        lengths = self.pooled_positions(tokens) + 1
        order = torch.argsort(lengths, stable=True)
        out: torch.Tensor | None = None
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            encoded = self._forward(tokens[index, : int(lengths[index].max())])
            if out is None:
                out = encoded.new_empty((tokens.shape[0], encoded.shape[1]))
            out[index] = encoded
        if out is None:
            raise ValueError("encode() needs at least one row of tokens.")
        return out

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.projection is None:
            return x
        if isinstance(self.projection, torch.nn.Linear):
            return self.projection(x)
        return x @ self.projection


def _is_causal(mask: torch.Tensor) -> bool:
    """True for an additive mask that hides exactly the positions after each query."""
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    future = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[future]).all() and (mask[~future] == 0).all())
