"""Label Studio ids as they may appear in paths, queue keys and folder names: ASCII digits only.

``str.isdigit`` is not enough: it accepts "²" and other Unicode digits, which
``int()`` then refuses or reads as something else.
"""

from __future__ import annotations

import re

_ID = re.compile(r"[0-9]{1,18}")


def is_id(value: object) -> bool:
    """True for a non-negative int or a string of 1-18 ASCII digits (what Label Studio's ids are)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 <= value < 10**18
    return isinstance(value, str) and _ID.fullmatch(value) is not None
