"""BOOST's learned weighting: a small head over detached per-unit features (a trajectory, or an assistant turn with
``granularity: turn``), trained through the hypergradient."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from boost_lightning.bilevel.hypergradient import Hypergradient
from boost_lightning.faults import check_finite
from boost_lightning.models.features import REFERENCE_FEATURES, scalar_features
from boost_lightning.models.policy import TrajectoryOutput
from boost_lightning.models.weight_head import WeightHead
from boost_lightning.weightings.base import Weighting

#: How the hypergradient reaches the head's scores (:class:`Learned`'s ``score_update``).
SCORE_UPDATES = ("chain", "exponentiated")


class Learned(Weighting):
    """wᵢ = head(featuresᵢ), normalised over the batch; the head is the outer level's learner.

    The head runs on the gathered global batch on every rank (it is tiny): its normalisation and regulariser are
    functions of all N weights, and its running feature statistics see the global batch, so replicas stay identical.

    For ``BoostModule(source_sampling="weights")`` it also keeps, per source, a running log-mean of the rows'
    unnormalised weights (exp(s/T) under softmax): :meth:`real_share` turns it into the share of real rows the inner
    batches should hold, and :attr:`importance` corrects the weights of a batch drawn that way.

    Args:
        head: The reweighting head (its features, normalisation, regulariser). Built with default settings when
            omitted.
        source_momentum: With ``source_sampling="weights"``: the weight of each batch in the running per-source
            mass (an exponential moving average over training batches).
        score_update: How the hypergradient g = ∂L_val/∂w reaches the head. ``chain``: the head minimises
            Σᵢ gᵢ·wᵢ(φ), the chain rule through the batch normalisation; under softmax row i's score then moves by
            wᵢ·(gᵢ − ḡ_w), so a row whose weight has fallen near 0 gets no gradient and cannot come back, however
            well aligned it becomes later. ``exponentiated``: the head minimises Σᵢ (gᵢ − ḡ_w)·log ŵᵢ(φ), ŵ the
            weight before normalisation and ḡ_w the weighted mean of g over the rows the head normalises: an
            exponentiated-gradient (mirror-descent) step on the weights, as in DoReMi and the ``group`` weighting,
            which moves every row's log-weight by its own centred hypergradient whatever its weight.
    """

    learns = True

    def __init__(self, head: WeightHead | None = None, source_momentum: float = 0.1,
                 score_update: str = "chain") -> None:
        super().__init__()
        if not 0 < source_momentum <= 1:
            raise ValueError(f"source_momentum must be in (0, 1], got {source_momentum}")
        if score_update not in SCORE_UPDATES:
            raise ValueError(f"score_update must be one of {SCORE_UPDATES}, got {score_update!r}")
        self.score_update = score_update
        self.head = head if head is not None else WeightHead()
        self.source_momentum = source_momentum
        # Buffers: checkpointed, and restored with the feature statistics when a step is skipped.
        self.register_buffer("source_log_mass", torch.zeros(2))  # [real, synthetic]
        self.register_buffer("source_seen", torch.zeros(2, dtype=torch.bool))
        #: Per-source factors [real, synthetic] π_s/p_s of a batch drawn with real share p (natural share π); set by
        #: the module for each composed batch, None under the natural mix (which then skips the per-source mass).
        self.importance: Tensor | None = None

    @property
    def resamples(self) -> bool:  # type: ignore[override]
        # Under reweight="synthetic" real rows sit at 1 outside the normalisation: no mass to compare across sources.
        return self.head.reweight == "all"

    def real_share(self, natural: float) -> float:
        """The share of real rows that makes a batch carry the mass the head gives real rows on the natural mix:
        p = π·m_real / (π·m_real + (1 − π)·m_synthetic), m the running mean unnormalised weight per source; π
        (``natural``) until both sources have been seen."""
        if not bool(self.source_seen.all()) or natural <= 0 or natural >= 1:
            return natural
        logit = math.log(natural / (1 - natural)) + float(self.source_log_mass[0] - self.source_log_mass[1])
        return 1 / (1 + math.exp(-logit))

    @property
    def input_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.head.scalar_names

    def bind(self, hidden_size: int) -> None:
        self.head.bind(hidden_size)

    def inputs(self, out: TrajectoryOutput, batch: Mapping[str, Tensor]) -> Tensor:
        """[b, k + 1 (+ H)]: the head's scalar features, the source flag, and the pooled hidden state if used."""
        if "val_similarity" in self.head.scalar_names:
            batch = {**batch, "val_similarity": self.head.validation_similarity(out.pooled)}
        columns = [scalar_features(out, batch, self.head.scalar_names), batch["is_synthetic"].float().unsqueeze(1)]
        if self.head.uses_hidden:
            columns.append(out.pooled.detach().float())
        return torch.cat(columns, dim=1)

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return any(name in self.head.features for name in REFERENCE_FEATURES)

    @property
    def observes_validation(self) -> bool:  # type: ignore[override]
        return "val_similarity" in self.head.features

    def observe_validation(self, pooled: Tensor) -> None:
        self.head.observe_validation(pooled)

    def _split(self, inputs: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        k = len(self.head.scalar_names)
        pooled = inputs[:, k + 1:] if self.head.uses_hidden else None
        return inputs[:, :k], pooled, inputs[:, k]

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        """Fold the batch into the head's running feature statistics, then weigh it (no graph)."""
        # A non-finite feature (e.g. a NaN reward) must never reach the running statistics.
        check_finite("weights", inputs)
        scalars, pooled, synthetic = self._split(inputs)
        self.head.observe(scalars)
        with torch.no_grad():
            scores = self.head.scores(scalars, pooled)
            if self.importance is not None:  # resampling: the running per-source mass decides the next batch's share
                self._observe_sources(scores, synthetic)
            return self._importance_corrected(self.head.normalize(scores, synthetic), synthetic)

    def outer_loss(self, inputs: Tensor, grad_weights: Tensor) -> Tensor:
        """Σᵢ gᵢ·wᵢ(φ) + regulariser: its gradient in φ is Σᵢ gᵢ ∂wᵢ/∂φ, the chain rule through the head."""
        scalars, pooled, synthetic = self._split(inputs)
        scores = self.head.scores(scalars, pooled)
        weights = self._importance_corrected(self.head.normalize(scores, synthetic), synthetic)
        g = grad_weights.to(weights.dtype)
        if self.score_update == "chain":
            return (g * weights).sum() + self.head.regularization(weights)
        # Exponentiated gradient: d/ds of the chain surrogate is wᵢ(gᵢ − ḡ_w)/T under softmax; dropping the factor wᵢ
        # (the natural gradient on the simplex) keeps rows near weight 0 in the competition.
        free = synthetic >= 0.5 if self.head.reweight == "synthetic" else torch.ones_like(synthetic, dtype=torch.bool)
        if not bool(free.any()):
            return self.head.regularization(weights) + 0.0 * scores.sum()
        w, g = weights.detach()[free], g[free]
        centred = g - (w * g).sum() / w.sum().clamp(min=1e-30)
        log_weights = self.head.log_unnormalized(scores)[free]
        return (centred * log_weights).sum() + self.head.regularization(weights)

    def _observe_sources(self, scores: Tensor, synthetic: Tensor) -> None:
        """Fold each source's log-mean unnormalised weight of this batch into the running per-source mass."""
        log_weight = self.head.log_unnormalized(scores)
        for index, mask in enumerate((synthetic < 0.5, synthetic >= 0.5)):
            if bool(mask.any()):
                value = torch.logsumexp(log_weight[mask].double(), 0) - math.log(int(mask.sum()))
                rate = self.source_momentum if bool(self.source_seen[index]) else 1.0
                self.source_log_mass[index] += rate * (value.to(self.source_log_mass.dtype)
                                                       - self.source_log_mass[index])
                self.source_seen[index] = True

    def _importance_corrected(self, weights: Tensor, synthetic: Tensor) -> Tensor:
        """wᵢ·r_s / mean(w·r): a batch drawn with real share p carries the mass of a natural-mix batch (π) when each
        row is scaled by r_s = π_s/p_s, the inverse of its source's over-representation."""
        if self.importance is None:
            return weights
        factor = self.importance.to(weights)[(synthetic >= 0.5).long()]
        corrected = weights * factor
        return corrected / corrected.mean().clamp(min=1e-30)

    def scores(self, inputs: Tensor) -> Tensor:
        scalars, pooled, _ = self._split(inputs)
        return self.head.scores(scalars, pooled)

    def normalize(self, scores: Tensor, synthetic: Tensor) -> Tensor:
        return self.head.normalize(scores, synthetic)
