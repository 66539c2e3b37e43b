"""Per-unit features for the weight head: what the head may know about a trajectory, or about one assistant turn.

All features are detached from the policy: the head is trained only through the hypergradient, never by
backpropagating into the policy. Ground-truth quality labels in ``meta`` are never used.

At turn granularity a weighting reads the batch through :func:`unit_columns`: the row's columns repeated for each of
its turns, with the turn's own ``length`` and ``position``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from boost_lightning.models.policy import TrajectoryOutput

#: Scalar features of every unit, in the order they are stacked. ``hidden`` (the pooled hidden state) comes first
#: when enabled.
SCALAR_FEATURES = ("loss", "surprise", "reward", "source", "length", "turns")
#: Scalar features that tell the turns of one trajectory apart (stacked after :data:`SCALAR_FEATURES`; constant for
#: whole trajectories, so they are off by default).
TURN_FEATURES = ("position",)
#: Scalar features relative to the validation set (opt-in): ``val_similarity``, the cosine of a unit's pooled state to
#: the running centroid of the validation rows' pooled states (:meth:`WeightHead.observe_validation`).
VALIDATION_FEATURES = ("val_similarity",)
#: Scalar features of a reference adapter trained on trusted rows only (on by default; the module then trains one):
#: ``excess_loss`` (the unit's NLL under the policy minus under the reference, RHO-LOSS) and ``reference_surprise``
#: (the observation NLL under the reference: observations the real dynamics do not produce stand out).
REFERENCE_FEATURES = ("excess_loss", "reference_surprise")
ALL_FEATURES = ("hidden", *SCALAR_FEATURES, *TURN_FEATURES, *VALIDATION_FEATURES, *REFERENCE_FEATURES)
#: The head's default inputs, chosen on the benchmark (``docs/experiments.md``): the reference features are the only
#: inputs that separate rows whose agent turns look plausible but follow other dynamics.
DEFAULT_FEATURES = ("hidden", *SCALAR_FEATURES, *REFERENCE_FEATURES)


def validate_feature_names(names: Sequence[str]) -> tuple[str, ...]:
    """Check feature names against :data:`ALL_FEATURES` and return them in canonical order."""
    unknown = sorted(set(names) - set(ALL_FEATURES))
    if unknown:
        raise ValueError(f"unknown head features {unknown}; choose from {list(ALL_FEATURES)}")
    if not names:
        raise ValueError("the weight head needs at least one feature")
    return tuple(n for n in ALL_FEATURES if n in names)


def scalar_features(out: TrajectoryOutput, batch: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Stack the enabled scalar features into [B, k] (float32, detached).

    ``loss`` is the agent-token NLL, ``surprise`` the observation-token NLL (environment replies the policy
    did not expect: shifted tasks and hallucinating simulators stand out there), ``length`` is log(1+tokens)
    (the row's tokens; a turn's agent tokens), ``turns`` the row's number of agent turns, ``position`` a turn's
    index within its row (0 for a whole trajectory), ``val_similarity`` the batch column of that name (the head's
    similarity of each unit to the validation set, :meth:`WeightHead.validation_similarity`), ``excess_loss`` and
    ``reference_surprise`` the reference adapter's fields of ``out``.
    """
    columns = {
        "loss": lambda: out.loss.detach(),
        "surprise": lambda: out.surprise,
        "reward": lambda: batch["reward"],
        "source": lambda: batch["is_synthetic"],
        "length": lambda: torch.log1p(batch["length"].float()),
        "turns": lambda: batch["num_turns"].float(),
        "position": lambda: batch["position"] if "position" in batch else torch.zeros_like(out.loss),
        "val_similarity": lambda: batch["val_similarity"],
        "excess_loss": lambda: _reference_column(out.excess_loss, "excess_loss"),
        "reference_surprise": lambda: _reference_column(out.reference_surprise, "reference_surprise"),
    }
    picked = [columns[n]().float() for n in names if n in columns]
    if not picked:
        return out.loss.new_zeros(out.loss.shape[0], 0)
    return torch.stack(picked, dim=1).detach()


def _reference_column(value: Tensor | None, name: str) -> Tensor:
    if value is None:
        raise ValueError(f"the head feature {name!r} needs the reference adapter's forward of the batch; it is "
                         f"computed by BoostModule (ReferenceAdapter.features) when the weighting asks for it")
    return value


def unit_columns(batch: Mapping[str, Any], out: TrajectoryOutput) -> dict[str, Any]:
    """The batch as a weighting reads it at turn granularity: one entry per turn of ``out`` (``out.unit_row``).

    Every per-row column (a [B] tensor or a list of B values: ``reward``, ``is_synthetic``, ``num_turns``, ``row_id``,
    ``task_id``, ``meta``, ...) is repeated for each of the row's turns; ``length`` and ``num_agent_tokens`` become the
    turn's agent tokens, and ``position`` (the turn's index within its row) is added. Token-level [B, T] columns are
    left out: a turn has no row of tokens of its own. Returns ``batch`` as is for a per-row ``out``.
    """
    if out.unit_row is None:
        return dict(batch)
    rows = out.unit_row
    size = batch["input_ids"].shape[0]
    columns: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == size:
            columns[name] = value[rows.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == size:
            columns[name] = [value[i] for i in rows.tolist()]
    columns["length"] = columns["num_agent_tokens"] = out.tokens
    columns["position"] = out.position
    return columns
