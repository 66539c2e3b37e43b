"""Named specs: strings that stand for data or a tokenizer which the data layer cannot make itself.

The data layer reads files, dataset directories and HF tokenizer names. Other layers make data too (the simulators
of :mod:`boost_lightning.envs` generate the embedded tasks' splits and tokenizer; :mod:`boost_lightning.models`
resolves model aliases), but the data layer never imports them: dependencies run from those layers to this one.
Instead they register a *resolver* here, and :func:`~boost_lightning.data.sources.load_splits` and
:func:`~boost_lightning.data.tokenizer.load_tokenizer` pass every string spec through :func:`resolve_spec` before
reading it. So a YAML config can say ``real: embedded:maze/real`` and ``tokenizer: smollm2-135m-instruct`` while
``BoostDataModule`` only ever sees what those strings resolve to.

A resolver takes the spec string and returns what it stands for (a path, or a ready object: a ``datasets.Dataset``
for ``"data"``, a tokenizer for ``"tokenizer"``), or ``None`` when the spec is not one of its kind. Resolvers are tried
in registration order; a spec that none claims is used as it is (a path or a hub name).

The package's own resolvers (``embedded:<task>/<split>``, ``embedded:<task>``, model aliases) live in
:mod:`boost_lightning.resolve`, which ``import boost_lightning`` registers: every import of a submodule runs it first,
so the specs work in Python and in the CLI alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

SpecKind = Literal["data", "tokenizer"]
SpecResolver = Callable[[str], Any]

_RESOLVERS: dict[str, dict[str, SpecResolver]] = {"data": {}, "tokenizer": {}}


def _registry(kind: str) -> dict[str, SpecResolver]:
    if kind not in _RESOLVERS:
        raise ValueError(f"unknown spec kind {kind!r} (expected one of {', '.join(_RESOLVERS)})")
    return _RESOLVERS[kind]


def register_spec_resolver(kind: SpecKind, name: str, resolver: SpecResolver) -> None:
    """Register ``resolver`` for ``kind`` specs under ``name``, replacing any resolver of that name.

    Args:
        kind: ``"data"`` (split specs) or ``"tokenizer"`` (tokenizer specs).
        name: Identifies the resolver (registering a name again replaces it in place, so re-imports are harmless).
        resolver: ``spec -> what it stands for``, or ``None`` when ``spec`` is not its kind. It may raise
            ``ValueError`` for a spec of its kind that is malformed.
    """
    _registry(kind)[name] = resolver


def unregister_spec_resolver(kind: SpecKind, name: str) -> None:
    """Remove the resolver registered as ``name`` for ``kind`` specs (nothing happens if there is none)."""
    _registry(kind).pop(name, None)


def resolve_spec(kind: SpecKind, spec: str) -> Any:
    """What ``spec`` stands for: the answer of the first registered resolver that claims it, else ``spec`` itself.

    Args:
        kind: ``"data"`` or ``"tokenizer"``.
        spec: The string from a config or a call.
    """
    for resolver in _registry(kind).values():
        resolved = resolver(spec)
        if resolved is not None:
            return resolved
    return spec
