"""Weightings without an outer level: the baselines BOOST is compared against.

* :class:`Uniform`: real and synthetic alike (plain SFT on the mix).
* :class:`RealOnly` / :class:`SyntheticOnly`: one source, the other weighted 0.
* :class:`ReturnFilter`: real rows plus the top ``fraction`` of the synthetic rows by return (filtered behaviour
  cloning, e.g. Chen et al. 2021, "Decision Transformer", §5 %BC), selected once over the whole pool.
* :class:`ReturnSoftmax`: wᵢ ∝ exp(Rᵢ/T) (RW; Hong et al., ICLR 2023, "Harnessing Mixed Offline RL Datasets via
  Trajectory Weighting").
* :class:`AdvantageSoftmax`: wᵢ ∝ exp((Rᵢ − b̂ᵢ)/T) with b̂ a least-squares baseline of the return on length and turns
  fitted to every batch seen (AW; same paper).
* :class:`L2RW`: Ren et al., ICML 2018, "Learning to Reweight Examples": wᵢ ∝ max(0, ⟨∇L_val, ∇ℓᵢ⟩), from this
  batch's hypergradient at uniform weights; nothing is learned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from boost_lightning.bilevel.hypergradient import Hypergradient
from boost_lightning.weightings.base import Weighting


class Uniform(Weighting):
    """Every row weight 1: plain SFT on the mix."""

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        return torch.ones_like(inputs[:, 0])


class RealOnly(Weighting):
    """Real rows weight 1, synthetic rows 0. Train with a data module that draws real rows only (``keeps``)."""

    keeps = "real"

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        return 1.0 - inputs[:, 0]


class SyntheticOnly(Weighting):
    """Synthetic rows weight 1, real rows 0."""

    keeps = "synthetic"

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        return inputs[:, 0].clone()


class ReturnFilter(Weighting):
    """Real rows plus the top ``fraction`` of the synthetic rows by return (ties kept).

    With a data module that supports it, the cut is made once over the whole synthetic pool (:meth:`select`) and
    batches hold kept rows only; otherwise it is made within each batch.

    Args:
        fraction: Share of the synthetic rows kept, in (0, 1].
    """

    def __init__(self, fraction: float = 0.5) -> None:
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        # The pool's return cut once :meth:`select` has seen the pool; NaN: cut within each batch.
        # float32, as the batch's rewards are: the cut row itself must compare equal.
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def select(self, rows: Mapping[str, Sequence[Any]]) -> list[bool]:
        """Real rows and the synthetic rows at or above the pool's top-``fraction`` return."""
        synthetic = torch.tensor([bool(s) for s in rows["is_synthetic"]])
        reward = torch.tensor([float(r) for r in rows["reward"]], dtype=torch.float32)
        keep = top_fraction_mask(reward, synthetic, self.fraction).bool()
        if synthetic.any():
            self.threshold.fill_(float(reward[keep & synthetic].min()))
        return (keep | ~synthetic).tolist()

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        synthetic, reward = inputs[:, 0].bool(), inputs[:, 1]
        if torch.isnan(self.threshold):
            kept = top_fraction_mask(reward, synthetic, self.fraction)
        else:
            kept = (synthetic & (reward.float() >= self.threshold.to(reward.device))).float()
        return torch.maximum((~synthetic).float(), kept)


class ReturnSoftmax(Weighting):
    """wᵢ ∝ exp(Rᵢ / temperature) over the batch.

    Args:
        temperature: T; smaller concentrates the weight on the highest returns.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        return _softmax_weights(inputs[:, 1] / self.temperature)


class AdvantageSoftmax(Weighting):
    """wᵢ ∝ exp((Rᵢ − b̂ᵢ) / temperature), b̂ a ridge fit of the return on [1, log(1 + length), turns] over every batch
    seen so far (sufficient statistics in buffers: O(1) memory, checkpointed, restored when a step is skipped).

    Trajectory granularity only: the baseline is a function of the whole trajectory's length and turns.

    Args:
        temperature: T; smaller concentrates the weight on the largest advantages.
        ridge: Ridge term of the baseline's least-squares fit.
    """

    granularities = ("trajectory",)

    def __init__(self, temperature: float = 0.1, ridge: float = 1e-3) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.ridge = temperature, ridge
        self.register_buffer("xtx", torch.zeros(3, 3, dtype=torch.float64))
        self.register_buffer("xty", torch.zeros(3, dtype=torch.float64))

    def baseline(self, inputs: Tensor, update: bool = True) -> Tensor:
        """Fold the batch into the fit (unless ``update`` is False), then predict its baseline [N]."""
        reward, length, turns = inputs[:, 1], inputs[:, 2], inputs[:, 3]
        x = torch.stack([torch.ones_like(turns, dtype=torch.float64), torch.log1p(length.double()), turns.double()],
                        dim=1).to(self.xtx.device)
        if update:
            self.xtx += x.T @ x
            self.xty += x.T @ reward.detach().double().to(self.xty.device)
        beta = torch.linalg.solve(self.xtx + self.ridge * torch.eye(3, dtype=torch.float64, device=self.xtx.device),
                                  self.xty)
        return (x @ beta).to(reward.device, torch.float32)

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        return _softmax_weights((inputs[:, 1] - self.baseline(inputs)) / self.temperature)

    def scores(self, inputs: Tensor) -> Tensor:
        return (inputs[:, 1] - self.baseline(inputs, update=False)) / self.temperature


class L2RW(Weighting):
    """Learning to reweight: wᵢ ∝ max(0, ⟨∇L_val, ∇ℓᵢ⟩), rescaled to mean 1 (all zero if no row helps)."""

    needs_hypergradient = True

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        if hypergradient is None:
            raise ValueError("l2rw weights are computed from the batch's hypergradient")
        w = hypergradient.directional.clamp(min=0)
        total = w.sum()
        return w * (w.shape[0] / total) if total > 0 else w

    def scores(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError("l2rw weights exist only within a training batch: they are its hypergradient")


def top_fraction_mask(reward: Tensor, among: Tensor, fraction: float) -> Tensor:
    """1 for the top ``fraction`` (by reward, ties kept) of the rows where ``among`` is true, else 0."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    mask = torch.zeros_like(reward, dtype=torch.float)
    n = int(among.sum())
    if n == 0:
        return mask
    keep = max(1, round(fraction * n))
    threshold = torch.topk(reward[among].float(), keep).values.min()
    mask[among & (reward.float() >= threshold)] = 1.0
    return mask


def _softmax_weights(z: Tensor) -> Tensor:
    # Subtracting the max only rescales all weights of the batch by one constant: it cancels in Σwℓ/Σw.
    return torch.exp(z.float() - z.float().max())


__all__ = ["AdvantageSoftmax", "L2RW", "RealOnly", "ReturnFilter", "ReturnSoftmax", "SyntheticOnly", "Uniform",
           "top_fraction_mask"]
