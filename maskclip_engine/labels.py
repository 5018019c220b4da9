"""Label sets: the labels to segment, each with its synonyms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from maskclip_engine.errors import InvalidLabelsError

LabelInput = str | Sequence[str]


@dataclass(frozen=True)
class LabelSet:
    """Labels to segment, each with one or more synonyms (its first is its name).

    A label scores the maximum over its synonyms, so "dog|puppy" finds either.
    """

    synonyms: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, labels: Sequence[LabelInput] | LabelSet) -> LabelSet:
        """Accept ``["cat", ["dog", "puppy"]]``; reject empty lists, blanks and duplicates."""
        if isinstance(labels, LabelSet):
            return labels
        if isinstance(labels, str):
            raise InvalidLabelsError(
                f"labels must be a list of names, not one string ({labels!r}); e.g. ['cat', ['dog', 'puppy']]."
            )
        parsed: list[tuple[str, ...]] = []
        for item in labels:
            names = (item,) if isinstance(item, str) else tuple(item)
            cleaned = tuple(n.strip() for n in names if isinstance(n, str) and n.strip())
            if not cleaned or len(cleaned) != len(names):
                raise InvalidLabelsError(f"label {item!r} is empty or not text; every label needs a name.")
            parsed.append(cleaned)
        if not parsed:
            raise InvalidLabelsError("the label list is empty; give at least one label to segment.")
        seen: set[str] = set()
        for names in parsed:
            if names[0] in seen:
                raise InvalidLabelsError(f"label {names[0]!r} appears twice; label names must be unique.")
            seen.add(names[0])
        return cls(tuple(parsed))

    @classmethod
    def from_string(cls, text: str) -> LabelSet:
        """Parse the CLI form ``"cat,dog|puppy,grass"`` (commas between labels, bars between synonyms)."""
        return cls.parse([[s for s in part.split("|")] for part in text.split(",")])

    @property
    def names(self) -> list[str]:
        return [names[0] for names in self.synonyms]

    @property
    def synonyms_lists(self) -> list[list[str]]:
        """Each label's synonyms as a list (the JSON form checkpoints and configs keep)."""
        return [list(names) for names in self.synonyms]

    @property
    def prompts(self) -> list[str]:
        """Every synonym once, in order."""
        return [s for names in self.synonyms for s in names]

    @property
    def owner(self) -> list[int]:
        """For each entry of :attr:`prompts`, the index of its label."""
        return [i for i, names in enumerate(self.synonyms) for _ in names]

    def __len__(self) -> int:
        return len(self.synonyms)
