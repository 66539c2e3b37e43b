"""The weighting interface: which weight each row of the global inner batch gets.

A weighting is a plain ``nn.Module`` (its buffers, e.g. running statistics, ride in checkpoints and are restored
when a step is skipped). ``BoostModule`` calls it the same way whatever it is:

    inputs  = weighting.inputs(out, batch)        # [b, k] per-row inputs of this rank's rows (detached)
    table   = all_gather(inputs)                  # [N, k] the global batch, identical on every rank
    weights = weighting(table, hypergradient)     # [N] detached; the inner loss is Σ wᵢmᵢℓᵢ / Σ wᵢ

and, for a weighting with parameters (``learned``), once per outer step

    loss = weighting.outer_loss(table, g)         # g = ∂L_val/∂w [N]; backward reaches the weighting's parameters

Only ratios of weights within a batch matter (the reduction divides by Σw). Computing them on the gathered global
batch makes every batch statistic (a normalisation, a top fraction, a softmax, a fitted baseline) that of a
one-process run with the same global batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from boost_lightning.bilevel.hypergradient import Hypergradient
from boost_lightning.models.policy import TrajectoryOutput

#: Columns of :meth:`Weighting.inputs` for the weightings that read the batch's own fields.
ROW_COLUMNS = ("source", "reward", "length", "turns")


def row_columns(batch: Mapping[str, Tensor]) -> Tensor:
    """[b, 4] float: is_synthetic, reward, token length, agent turns (:data:`ROW_COLUMNS`)."""
    return torch.stack([batch["is_synthetic"].float(), batch["reward"].float(), batch["length"].float(),
                        batch["num_turns"].float()], dim=1)


class Weighting(nn.Module):
    """Base class of the trajectory weightings (module docstring).

    Class attributes a subclass sets:
        keeps: The rows this weighting can give a non-zero weight: ``all``, ``real`` or ``synthetic``. A data module
            that knows it draws only those rows (so a batch is always full of rows that count).
        needs_hypergradient: The weights are a function of this batch's hypergradient at uniform weights (``l2rw``):
            the step computes it before asking for the weights.
        observes_validation: Each outer step's validation pooled states are passed to :meth:`observe_validation`.
        needs_reference: Its inputs read a reference adapter's forward (``TrajectoryOutput.excess_loss``,
            ``reference_surprise``): the module trains one on trusted rows and scores every batch with it.
        resamples: It can set the share of real rows per inner batch (``real_share``) and correct a batch drawn that
            way (``importance``), for ``BoostModule(source_sampling="weights")``.
        granularities: The units it can weigh: ``trajectory`` and, where its inputs keep their meaning when each
            assistant turn is a unit (the row's columns repeated per turn, a turn's own ``length``), ``turn``.
    """

    keeps: str = "all"
    needs_hypergradient: bool = False
    granularities: tuple[str, ...] = ("trajectory", "turn")
    #: :meth:`observe_validation` reads the validation rows' pooled states (the step gathers them only then).
    observes_validation: bool = False
    #: :meth:`inputs` reads the reference adapter's fields of the policy output (the module then trains one).
    needs_reference: bool = False
    #: Has :meth:`real_share` and :attr:`importance` (``BoostModule(source_sampling="weights")``).
    resamples: bool = False
    #: The weighting has parameters that the outer level trains through the hypergradient (``head_optimizer``).
    learns: bool = False
    #: Names of the columns of :meth:`inputs` (the features ``predict`` writes out).
    input_names: Sequence[str] = ROW_COLUMNS

    def bind(self, hidden_size: int) -> None:
        """Build whatever depends on the policy (the learned head's input layer). Default: nothing."""

    def inputs(self, out: TrajectoryOutput, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-row inputs [b, k] of this rank's rows (float, detached)."""
        return row_columns(batch)

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        """Weights [N] (detached) of the global batch from its gathered inputs [N, k]."""
        raise NotImplementedError

    def outer_loss(self, inputs: Tensor, grad_weights: Tensor) -> Tensor:
        """Surrogate whose gradient in the weighting's parameters is the hypergradient's chain rule.

        Only weightings with parameters have an outer level; the default raises.
        """
        raise NotImplementedError(f"{type(self).__name__} has no outer level")

    def normalize(self, scores: Tensor, synthetic: Tensor) -> Tensor:
        """Weights (mean 1) of a set of rows from their :meth:`scores`, e.g. a scored file; default ∝ exp(score)."""
        w = torch.exp(scores.float() - scores.float().max())
        return w / w.mean().clamp(min=1e-30)

    def observe_validation(self, pooled: Tensor) -> None:
        """The validation rows' pooled states [V, H] of an outer step (gathered: the same on every rank). Default:
        ignored."""

    def select(self, rows: Mapping[str, Sequence[Any]]) -> list[bool] | None:
        """The training rows this weighting can give a non-zero weight, decided once from the rows themselves.

        Args:
            rows: Columns of every training row, real rows first: ``is_synthetic`` (0/1), ``reward``, ``meta``
                (dicts), ``row_id`` (index in its split's input) and ``content_hash``.

        Returns:
            One bool per row, or ``None`` (default) when it is decided per batch. A data module that supports it
            (:meth:`BoostDataModule.keep_rows`) then batches the kept rows only, so every batch is full of rows that
            count instead of mixing in rows that weigh nothing.
        """
        return None

    def scores(self, inputs: Tensor) -> Tensor:
        """Unnormalised per-row scores [N] for ``predict`` (comparable across batches). Default: log of the weights
        of the batch the rows came in."""
        return torch.log(self(inputs).clamp(min=1e-30))
