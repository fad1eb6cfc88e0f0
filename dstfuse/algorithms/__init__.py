"""Storage algorithms, found by the name a config gives in `algorithm:`."""

from __future__ import annotations

import importlib

from .base import Algorithm, ConfigOption, ControlFile, Placement, SizeFinding

#: algorithm name -> "module:class"; imported on first use so that a storage
#: that never mirrors never imports the mirror.
_REGISTRY = {
    "linear": "dstfuse.algorithms.linear:Linear",
    "mirror": "dstfuse.mirror.algorithm:Mirror",
}

NAMES = tuple(_REGISTRY)


def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered under `name`; KeyError for unknown names."""
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = [
    "Algorithm",
    "ConfigOption",
    "ControlFile",
    "Placement",
    "SizeFinding",
    "NAMES",
    "algorithm_class",
]
