"""Short names for config objects: ``weighting: uniform`` instead of a ``class_path`` with empty ``init_args``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def build(spec: T | str, registry: Mapping[str, type[T]], base: type[T], what: str) -> T:
    """``spec`` as is when it is already a ``base``, else the class its short name stands for, built with defaults."""
    if isinstance(spec, base):
        return spec
    if spec not in registry:
        raise ValueError(f"unknown {what} {spec!r}; choose a short name from {list(registry)} or a class_path of a "
                         f"{base.__module__}.{base.__name__}")
    return registry[spec]()
