"""``group``: one weight per data source, learned online from gradient alignment with the validation loss.

The per-source alternative to per-trajectory weights (DoReMi, Xie et al., NeurIPS 2023; DGA / domain gradient
alignment, e.g. Fan et al. 2024 "DoGE"): rows are grouped by a key the user has (``meta.generator``, the file a row
came from, ...); each step, every group's log-weight moves by the mean alignment ⟨∇L_val, ∇ℓᵢ⟩ of its rows in the
batch (scale-free: divided by the batch's root mean square), an exponentiated-gradient step. The alignment is this
batch's hypergradient at uniform weights, the same quantity ``l2rw`` uses; nothing is trained by backpropagation.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from boost_lightning.bilevel.hypergradient import Hypergradient, unit_rms
from boost_lightning.models.policy import TrajectoryOutput
from boost_lightning.weightings.base import Weighting

#: The group of real rows (they are one source whatever their ``meta`` says).
REAL_GROUP = "real"


class Group(Weighting):
    """wᵢ = exp(θ_g(i)), normalised to mean 1 over the batch, θ_g += lr · mean_{i ∈ g} alignmentᵢ each step.

    Args:
        key: ``meta`` field naming a synthetic row's group; rows without it form the group ``"?"``. Real rows are
            the group ``"real"``.
        lr: Step size of the log-weights (per step; alignments are divided by their batch root mean square).
        max_log_weight: Bound of |θ_g|, so no source is switched off or takes over for good.
        max_groups: Capacity of the log-weight table (groups are numbered in order of appearance).
    """

    needs_hypergradient = True
    input_names = ("source", "group")

    def __init__(self, key: str = "generator", lr: float = 0.05, max_log_weight: float = 3.0,
                 max_groups: int = 256) -> None:
        super().__init__()
        if lr <= 0 or max_log_weight <= 0:
            raise ValueError(f"lr and max_log_weight must be > 0, got {lr}, {max_log_weight}")
        self.key, self.lr, self.max_log_weight = key, lr, max_log_weight
        self.register_buffer("log_weights", torch.zeros(max_groups, dtype=torch.float64))
        # Group id (a hash of its name, the same on every rank) → slot of the table, in order of first appearance in
        # the gathered global batch, hence the same on every rank too.
        self.slots: dict[int, int] = {}
        self.names: dict[int, str] = {}

    def get_extra_state(self) -> dict[str, Any]:
        return {"slots": dict(self.slots), "names": dict(self.names)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.slots, self.names = dict(state.get("slots", {})), dict(state.get("names", {}))

    @staticmethod
    def group_id(name: str) -> int:
        """A stable 24-bit id of a group name (exact in the float32 input column)."""
        return zlib.crc32(name.encode()) & 0xFFFFFF

    def _slot(self, gid: int) -> int:
        if gid not in self.slots:
            if len(self.slots) >= self.log_weights.shape[0]:
                raise ValueError(f"more than {self.log_weights.shape[0]} groups under meta.{self.key}; raise "
                                 "max_groups")
            self.slots[gid] = len(self.slots)
        return self.slots[gid]

    @property
    def group_weights(self) -> dict[str, float]:
        """exp(θ_g) per group name (unnormalised)."""
        return {self.names.get(gid, str(gid)): float(self.log_weights[slot].exp()) for gid, slot in self.slots.items()}

    def inputs(self, out: TrajectoryOutput, batch: Mapping[str, Any]) -> Tensor:
        synthetic = batch["is_synthetic"].float()
        names = [str((meta or {}).get(self.key, "?")) if s > 0.5 else REAL_GROUP
                 for s, meta in zip(synthetic.tolist(), batch["meta"])]
        ids = [self.group_id(n) for n in names]
        self.names.update(zip(ids, names))
        return torch.stack([synthetic, torch.tensor(ids, dtype=torch.float32, device=synthetic.device)], dim=1)

    def _index(self, inputs: Tensor) -> Tensor:
        return torch.tensor([self._slot(int(g)) for g in inputs[:, 1].tolist()], dtype=torch.long,
                            device=self.log_weights.device)

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        if hypergradient is None:
            raise ValueError("group weights are updated from the batch's hypergradient")
        index = self._index(inputs)
        alignment = unit_rms(hypergradient.directional.double()).to(self.log_weights.device)
        # Mean alignment per group present in the batch: a group's step does not grow with how often it is drawn.
        sums = torch.zeros_like(self.log_weights).index_add_(0, index, alignment)
        counts = torch.zeros_like(self.log_weights).index_add_(0, index, torch.ones_like(alignment))
        step = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        self.log_weights.add_(self.lr * step).clamp_(-self.max_log_weight, self.max_log_weight)
        return self._weights(index).to(inputs.device)

    def _weights(self, index: Tensor) -> Tensor:
        w = self.log_weights[index].exp()
        return (w / w.mean()).float()

    def scores(self, inputs: Tensor) -> Tensor:
        return self.log_weights[self._index(inputs)].float().to(inputs.device)


__all__ = ["REAL_GROUP", "Group"]
