"""How nodes pace their reconnect attempts (remote and NBD nodes alike).

Owns only the numbers and the one rule built on them: the delay before the
next attempt starts at BACKOFF_START, grows by BACKOFF_FACTOR and never
exceeds BACKOFF_MAX seconds.
"""

from __future__ import annotations

#: Reconnect backoff: first retry delay, growth factor and cap (seconds).
BACKOFF_START = 0.05
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = 2.0


def next_delay(delay: float) -> float:
    """The delay after `delay`."""
    return min(delay * BACKOFF_FACTOR, BACKOFF_MAX)
