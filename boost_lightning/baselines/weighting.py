"""Fixed (non-learned) trajectory weightings: the baselines BOOST is compared against.

Each returns weights [B] for one batch; the weighted reduction divides by Σw, so only ratios within a batch
matter and a pool-level normalising constant (e.g. of a softmax over the whole pool) cancels.

* ``uniform``: real and synthetic alike (plain SFT on the mix).
* ``real_only`` / ``synthetic_only``: one source, the other weighted 0.
* ``filtered_bc``: real rows plus the top ``filter_fraction`` of the batch's synthetic rows by return
  (filtered behaviour cloning, e.g. Chen et al. 2021, "Decision Transformer", §5 %BC).
* ``return_weighted``: wᵢ ∝ exp(Rᵢ/α) (RW; Hong et al., ICLR 2023, "Harnessing Mixed Offline RL Datasets via
  Trajectory Weighting"), α = 0.1 by default.
* ``advantage_weighted``: wᵢ ∝ exp((Rᵢ − b̂)/α) with b̂ a baseline fitted to the returns (AW; same paper).
* ``l2rw``: Ren et al., ICML 2018, "Learning to Reweight Examples": wᵢ ∝ max(0, ⟨∇L_val, ∇ℓᵢ⟩), recomputed for
  every batch from the same finite-difference probe as BOOST's hypergradient; nothing is learned.

Under data parallelism "the batch" is the global batch: ``BoostModule`` gathers the per-row inputs of every rank
(source, return, length, turns, or the l2rw directional derivatives), calls these functions on the whole batch,
identically on every rank, and keeps its own rows; :class:`RunningBaseline` is fitted on the gathered rows too. So
every weighting gives the weights of a one-process run on the same global batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

FIXED_WEIGHTINGS = ("uniform", "real_only", "synthetic_only", "filtered_bc", "return_weighted", "advantage_weighted")
WEIGHTINGS = ("learned", *FIXED_WEIGHTINGS, "l2rw")


def fixed_weights(
    name: str,
    is_synthetic: Tensor,
    reward: Tensor,
    filter_fraction: float = 0.5,
    temperature: float = 0.1,
    baseline: Tensor | float = 0.0,
) -> Tensor:
    """Weights [B] of a fixed weighting for one batch.

    Args:
        name: One of :data:`FIXED_WEIGHTINGS`.
        is_synthetic: [B] 1 for synthetic rows, 0 for real.
        reward: [B] trajectory returns.
        filter_fraction: ``filtered_bc``: fraction of synthetic rows kept.
        temperature: α of ``return_weighted`` / ``advantage_weighted``.
        baseline: b̂ of ``advantage_weighted`` (a scalar or one value per row).
    """
    real = 1.0 - is_synthetic.float()
    if name == "uniform":
        return torch.ones_like(real)
    if name == "real_only":
        return real
    if name == "synthetic_only":
        return 1.0 - real
    if name == "filtered_bc":
        return torch.maximum(real, top_fraction_mask(reward, is_synthetic.bool(), filter_fraction))
    if name in ("return_weighted", "advantage_weighted"):
        centred = reward.float() - (baseline if name == "advantage_weighted" else 0.0)
        # Subtracting the max only rescales all weights of the batch by one constant: it cancels in Σwℓ/Σw.
        z = centred / temperature
        return torch.exp(z - z.max())
    raise ValueError(f"unknown weighting {name!r}; choose from {list(WEIGHTINGS)}")


def top_fraction_mask(reward: Tensor, among: Tensor, fraction: float) -> Tensor:
    """1 for the top ``fraction`` (by reward, ties kept) of the rows where ``among`` is true, else 0."""
    if not 0 < fraction <= 1:
        raise ValueError("filter_fraction must be in (0, 1]")
    mask = torch.zeros_like(reward, dtype=torch.float)
    n = int(among.sum())
    if n == 0:
        return mask
    keep = max(1, round(fraction * n))
    threshold = torch.topk(reward[among].float(), keep).values.min()
    mask[among & (reward.float() >= threshold)] = 1.0
    return mask


def l2rw_weights(directional: Tensor) -> Tensor:
    """Learning-to-reweight weights from ⟨∇L_val, ∇ℓᵢ⟩: clip negatives to 0, rescale to mean 1 (zeros if none)."""
    w = directional.clamp(min=0)
    total = w.sum()
    return w * (w.shape[0] / total) if total > 0 else w


class RunningBaseline:
    """Least-squares fit of return on [1, log length, turns] from every batch seen (AW's fitted baseline).

    Sufficient statistics only (XᵀX, Xᵀy), so the fit is over all data seen so far at O(1) memory.
    """

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ridge = ridge
        self.xtx = torch.zeros(3, 3, dtype=torch.float64)
        self.xty = torch.zeros(3, dtype=torch.float64)

    @staticmethod
    def design(length: Tensor, turns: Tensor) -> Tensor:
        return torch.stack([torch.ones_like(turns, dtype=torch.float64), torch.log1p(length.double()),
                            turns.double()], dim=1)

    def update_and_predict(self, reward: Tensor, length: Tensor, turns: Tensor) -> Tensor:
        """Fold the batch into the fit, then predict its baseline [B]."""
        x = self.design(length.cpu(), turns.cpu())
        self.xtx += x.T @ x
        self.xty += x.T @ reward.detach().cpu().double()
        beta = torch.linalg.solve(self.xtx + self.ridge * torch.eye(3, dtype=torch.float64), self.xty)
        return (x @ beta).to(reward.device, torch.float32)

    def state_dict(self) -> dict:
        return {"xtx": self.xtx.clone(), "xty": self.xty.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.xtx, self.xty = state["xtx"].clone(), state["xty"].clone()
