"""A reference adapter: a second set of the policy's trainable tensors, trained on trusted (real) rows only, on their
agent and observation tokens.

RHO-LOSS (arXiv 2206.07137) scores a training example by its *excess* loss: the learner's loss minus the loss of a
reference model trained on data from the target distribution. A row that the reference finds easy but the policy does
not is worth learning; a row that only a model trained on the synthetic mix can predict (a conflicting task, a
hallucinating simulator) is not. The reference here costs no extra base weights: it is the policy's frozen base with
its own copy of the LoRA (and ``modules_to_save``) tensors, evaluated through the policy's functional forward
(:meth:`~boost_lightning.models.policy.PolicyModel.trajectory_forward` with ``params``), exactly as the hypergradient
probes θ ± εv.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from boost_lightning.models.features import REFERENCE_FEATURES
from boost_lightning.models.policy import PolicyModel, TrajectoryOutput

__all__ = ["REFERENCE_FEATURES", "ReferenceAdapter"]


class ReferenceAdapter(nn.Module):
    """The policy's trainable tensors, copied at their initial values and trained on trusted rows only.

    Args:
        policy: The policy whose trainable (LoRA) tensors are copied; built now if it is a pending pretrained model.
    """

    def __init__(self, policy: PolicyModel) -> None:
        super().__init__()
        live = policy.trainable_named_parameters()
        # Parameter names cannot hold dots; the policy's names are kept in order to map them back.
        self.names = list(live)
        self.tensors = nn.ParameterDict({_key(n): nn.Parameter(p.detach().clone()) for n, p in live.items()})

    def params(self) -> dict[str, Tensor]:
        """The reference's tensors under the policy's parameter names (what ``trajectory_forward`` substitutes)."""
        return {name: self.tensors[_key(name)] for name in self.names}

    def forward(self, policy: PolicyModel, batch: Mapping[str, Tensor], aux: bool = True,
                granularity: str = "trajectory") -> TrajectoryOutput:
        """The policy's forward of ``batch`` at the reference's tensors (with graph into them when grad is on)."""
        return policy.trajectory_forward(batch, params=self.params(), aux=aux, granularity=granularity)

    def training_losses(self, policy: PolicyModel, batch: Mapping[str, Tensor]) -> Tensor:
        """[B] per-row mean NLL, with graph into the reference's tensors, of the row's agent *and* observation tokens.

        The reference models the trusted data on both sides of the conversation: its observation NLL
        (``reference_surprise``) is then that of a model of the real dynamics, where the policy, trained on agent
        tokens only, has no reason to predict observations well. An environment reply that the real dynamics would
        not produce (a hallucinating simulator) stands out there.
        """
        labels = batch["labels"]
        if "obs_mask" in batch:
            observed = batch["obs_mask"].bool() & (batch["attention_mask"] > 0)
            labels = torch.where(observed, batch["input_ids"], labels)
        return self.forward(policy, {**batch, "labels": labels}, aux=False).loss

    @staticmethod
    def annotate(out: TrajectoryOutput, ref: TrajectoryOutput) -> TrajectoryOutput:
        """``out`` (the policy's forward of a batch) with the head features of ``ref`` (the reference's forward of
        the same batch): ``excess_loss`` = ℓ_policy − ℓ_reference and ``reference_surprise``, per unit, detached."""
        out.excess_loss = out.loss.detach() - ref.loss.detach()
        out.reference_surprise = ref.surprise.detach()
        return out


def _key(name: str) -> str:
    return name.replace(".", "/")
