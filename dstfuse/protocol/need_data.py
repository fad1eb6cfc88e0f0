"""`NEED_DATA`: what a sans-IO codec returns when it needs more bytes.

One sentinel for every codec of the package (our protocol's `Connection`,
the NBD client and server codecs), so that `event is NEED_DATA` means the
same wherever a caller meets it. It is an enum member so that the identity
check narrows the type for mypy.
"""

from __future__ import annotations

import enum
from typing import Final


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    __str__ = __repr__


NEED_DATA: Final = NeedData.NEED_DATA
