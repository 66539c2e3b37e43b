"""BoostModule: the bilevel training loop of BOOST as a LightningModule (manual optimisation).

One training step, top to bottom:

    inner  forward the mixed batch → per-trajectory losses ℓᵢ and detached features
           wᵢ = head(features) (detached; or a baseline weighting)     L_in = Σ wᵢℓᵢ / Σ wᵢ
           policy_opt: zero_grad → manual_backward(L_in)
    outer  every ``outer_every_n_steps`` inner steps (after ``head_warmup_steps``):
           g = ∂L_val(θ')/∂w  (hypergradient at the same θ the inner gradient was taken at)
           head_opt: zero_grad → manual_backward(Σ gᵢ·wᵢ(φ) + regulariser) → clip → step
    inner  policy_opt: clip → step

The hypergradient is taken before the policy steps so that v = ∇L_val and the finite-difference probe see the
same θ as the inner gradient (the one-step lookahead of DESIGN.md). It reads the live LoRA tensors but probes
θ + εv functionally, so the pending policy gradient is untouched.

``trainer.global_step`` counts every optimizer ``.step()`` of both levels; the explicit ``inner_steps`` and
``outer_steps`` counters (logged, checkpointed) are what ``max_inner_steps`` reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from boost_lightning import distributed as dp
from boost_lightning.baselines.weighting import (
    WEIGHTINGS,
    RunningBaseline,
    fixed_weights,
    l2rw_weights,
)
from boost_lightning.bilevel.hypergradient import (
    Hypergradient,
    exact_hypergradient,
    first_order_hypergradient,
    unit_rms,
)
from boost_lightning.bilevel.tradeoff import tradeoff
from boost_lightning.models.features import scalar_features
from boost_lightning.models.policy import PolicyModel, TrajectoryOutput
from boost_lightning.models.weight_head import WeightHead, effective_sample_size
from boost_lightning.objectives import (
    advantage_weighted,
    behaviour_cloning,
    filtered_bc,
    reward_weighted,
    weighted_loss,
)
from boost_lightning.preemption import rng_state, set_rng_state

OBJECTIVES = ("bc", "filtered_bc", "reward_weighted", "advantage_weighted")


class FaultLimitError(RuntimeError):
    """Raised when too many consecutive steps had to be skipped for non-finite values."""


class BoostModule(LightningModule):
    """BOOST: learn one weight per trajectory so that training on the weighted mix helps held-out real tasks.

    Args:
        policy: The inner-level learner (an HF causal LM with LoRA).
        head: The reweighting head (outer level). Built with default settings when omitted.
        policy_optimizer: Optimizer of the policy's trainable (LoRA) parameters. Default: AdamW(lr=1e-4).
        head_optimizer: Optimizer of the head. Default: Adam(lr=1e-3).
        policy_scheduler: Optional LR scheduler of the policy optimizer, stepped once per inner step.
        head_scheduler: Optional LR scheduler of the head optimizer, stepped once per outer step.
        weighting: ``learned`` (BOOST) or a baseline: ``uniform``, ``real_only``, ``synthetic_only``,
            ``filtered_bc``, ``return_weighted``, ``advantage_weighted``, ``l2rw``.
        objective: Per-trajectory inner loss: ``bc`` (agent-token NLL), ``filtered_bc`` (NLL on the top
            ``objective_fraction`` by return), ``reward_weighted`` or ``advantage_weighted`` (exp(β·(R − b))·NLL).
        objective_beta: β of the exponentiated objectives.
        objective_fraction: Kept fraction of the ``filtered_bc`` objective.
        filter_fraction: ``filtered_bc`` weighting: fraction of synthetic rows kept per batch.
        weighting_temperature: α of the ``return_weighted`` / ``advantage_weighted`` weightings.
        hypergradient: ``first_order`` (finite differences, no double backward) or ``exact`` (unrolled step,
            needs eager or math attention; a reference for small models).
        lookahead_lr: α of the one-step lookahead θ' = θ − α∇L_in. Defaults to the policy optimizer's lr.
        fd_eps: Norm of the finite-difference probe step along v = ∇L_val.
        fd_central: Central differences (one more forward of the inner batch per outer step).
        hypergradient_preconditioner: ``adam`` (default): precondition v = ∇L_val with the policy optimizer's
            second moments, 1/(√v̂ + eps), as an Adam/AdamW step does, so that gradient alignment is measured in the
            geometry the policy actually moves in (first-order only; P = I while the optimizer keeps no second
            moments, e.g. SGD or before its first step). ``none``: the lookahead is a plain SGD step (DESIGN.md).
        normalize_hypergradient: Divide the per-row hypergradient by its root mean square over the batch before
            the head's backward (surrogate (1/B)·Σ gᵢwᵢ/rms(g)). Its raw scale follows the policy's lr and loss
            scale (often ~1e-4), so without this the head regulariser's strength has no fixed meaning; with it,
            ``regularizer_strength`` ≈ 1 weighs the ESS penalty as much as the validation signal.
        outer_every_n_steps: An outer (head) update every this many inner steps.
        head_warmup_steps: Inner steps of plain weighted SFT before the first outer update.
        inner_accumulate_grad_batches: Batches whose inner gradients are accumulated per policy step.
        outer_accumulate_grad_batches: Hypergradients accumulated per head step.
        micro_batch_size: Split the inner batch into chunks of this many rows for forward/backward (memory);
            the weights are computed on the whole batch first, so the result does not depend on the split.
        policy_grad_clip: Max global grad norm of the policy (None: off).
        head_grad_clip: Max global grad norm of the head (None: off).
        max_inner_steps: Stop after this many inner steps (``trainer.max_steps`` counts both levels).
        max_consecutive_faults: Stop with an error after this many consecutive skipped steps.
    """

    def __init__(
        self,
        policy: PolicyModel,
        head: WeightHead | None = None,
        policy_optimizer: OptimizerCallable | None = None,
        head_optimizer: OptimizerCallable | None = None,
        policy_scheduler: LRSchedulerCallable | None = None,
        head_scheduler: LRSchedulerCallable | None = None,
        weighting: str = "learned",
        objective: str = "bc",
        objective_beta: float = 1.0,
        objective_fraction: float = 0.5,
        filter_fraction: float = 0.5,
        weighting_temperature: float = 0.1,
        hypergradient: str = "first_order",
        lookahead_lr: float | None = None,
        fd_eps: float = 1e-2,
        fd_central: bool = False,
        hypergradient_preconditioner: str = "adam",
        normalize_hypergradient: bool = True,
        outer_every_n_steps: int = 1,
        head_warmup_steps: int = 0,
        inner_accumulate_grad_batches: int = 1,
        outer_accumulate_grad_batches: int = 1,
        micro_batch_size: int | None = None,
        policy_grad_clip: float | None = 1.0,
        head_grad_clip: float | None = 1.0,
        max_inner_steps: int | None = None,
        max_consecutive_faults: int = 10,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        if hypergradient not in ("first_order", "exact"):
            raise ValueError(f"hypergradient must be 'first_order' or 'exact', got {hypergradient!r}")
        if hypergradient_preconditioner not in ("none", "adam"):
            raise ValueError(f"hypergradient_preconditioner must be 'none' or 'adam', "
                             f"got {hypergradient_preconditioner!r}")
        for name, value in (("outer_every_n_steps", outer_every_n_steps),
                            ("inner_accumulate_grad_batches", inner_accumulate_grad_batches),
                            ("outer_accumulate_grad_batches", outer_accumulate_grad_batches),
                            ("max_consecutive_faults", max_consecutive_faults)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.save_hyperparameters(ignore=["policy", "head", "policy_optimizer", "head_optimizer",
                                          "policy_scheduler", "head_scheduler"])
        self.automatic_optimization = False
        # Checkpoints hold the trainable tensors only (LoRA, head); the frozen base model is rebuilt from its
        # path or config, so loading is intentionally non-strict about it.
        self.strict_loading = False
        self.policy = policy
        self.head = head if head is not None else WeightHead()
        self.head.bind(policy.hidden_size)
        self.policy_optimizer, self.head_optimizer = policy_optimizer, head_optimizer
        self.policy_scheduler, self.head_scheduler = policy_scheduler, head_scheduler
        self.inner_steps = 0
        self.outer_steps = 0
        self.faults: dict[str, int] = {"inner_loss": 0, "weights": 0, "hypergrad": 0, "grad": 0}
        self._consecutive_faults = 0
        self._batches_seen = 0
        self._outer_evals = 0
        self._pending_rng: dict[str, Any] | None = None  # RNG states of a loaded checkpoint, set when training starts
        self.aw_baseline = RunningBaseline()
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()

    def setup(self, stage: str) -> None:
        # A tokenizer larger than the embedding table fails deep inside the first forward; say so up front.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None and len(tokenizer) > self.policy.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the policy's embedding table has "
                f"{self.policy.vocab_size}: raise `vocab_size` in the policy config (or use the model's own tokenizer)"
            )

    # -- optimisers ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[dict[str, Any]]:
        policy_params = list(self.policy.trainable_named_parameters().values())
        policy_opt = (self.policy_optimizer or _default_adamw)(policy_params)
        head_opt = (self.head_optimizer or _default_adam)(self.head.parameters())
        configs = []
        for opt, sched in ((policy_opt, self.policy_scheduler), (head_opt, self.head_scheduler)):
            entry: dict[str, Any] = {"optimizer": opt}
            if sched is not None:
                entry["lr_scheduler"] = {"scheduler": sched(opt), "interval": "step"}
            configs.append(entry)
        return configs

    @property
    def uses_hypergradient(self) -> bool:
        return self.hparams.weighting in ("learned", "l2rw")

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Mapping[str, Any]], batch_idx: int) -> dict[str, Tensor] | None:
        inner, outer = batch["inner"], batch["outer"]
        policy_opt, head_opt = self.optimizers()
        accumulate = self.hparams.inner_accumulate_grad_batches
        first_of_cycle = self._batches_seen % accumulate == 0
        last_of_cycle = (self._batches_seen + 1) % accumulate == 0
        self._batches_seen += 1
        # A skipped step leaves both levels as they were, the head's running feature statistics included.
        self._fault_snapshot = self._running_state()

        # ---- inner level: weights (detached) → weighted loss → backward -------------------------------------
        outer_due = self._outer_due()
        out, weights, directional, hypergrad, head_inputs = self._inner_weights(inner, outer, outer_due)
        if not torch.isfinite(weights).all():
            return self._skip("weights", policy_opt, head_opt)
        if first_of_cycle:
            policy_opt.zero_grad()
        inner_loss = self._inner_backward(inner, out, weights, scale=1.0 / accumulate)
        if not torch.isfinite(inner_loss):
            return self._skip("inner_loss", policy_opt, head_opt)
        # Checked before the head steps: a policy step that cannot happen must not leave a head step behind.
        if last_of_cycle and not _grads_finite(policy_opt):
            return self._skip("grad", policy_opt, head_opt)

        # ---- outer level: hypergradient → head step ---------------------------------------------------------
        local_hypergrad = None  # ∂L_val/∂wᵢ of this rank's rows, returned for diagnostics
        if outer_due and self.hparams.weighting == "learned":
            if hypergrad is None:
                hypergrad, rows = self._hypergradient(inner, outer, out, weights)
                local_hypergrad = hypergrad.grad_weights[rows]
            if not hypergrad.is_finite():
                return self._skip("hypergrad", policy_opt, head_opt)
            head_faults = self.faults["hypergrad"]
            self._outer_update(head_opt, head_inputs, hypergrad)
            if self.faults["hypergrad"] != head_faults:  # the head's own gradient was non-finite (already counted)
                self._discard_step(policy_opt, head_opt)
                return None

        # ---- inner level: clip → step -----------------------------------------------------------------------
        if last_of_cycle:
            self._clip(policy_opt, self.hparams.policy_grad_clip)
            policy_opt.step()
            self._step_scheduler(0)
            self.inner_steps += 1
            self._consecutive_faults = 0
        if self.hparams.max_inner_steps is not None and self.inner_steps >= self.hparams.max_inner_steps:
            self.trainer.should_stop = True

        self._log_inner(inner, out, weights, inner_loss, hypergrad)
        return {"weights": weights.detach(), "is_synthetic": inner["is_synthetic"].detach(),
                "directional": directional.detach() if directional is not None else None,
                "hypergradient": local_hypergrad.detach() if local_hypergrad is not None else None}

    def _outer_due(self) -> bool:
        if not self.uses_hypergradient:
            return False
        if self.hparams.weighting == "l2rw":
            return True
        past_warmup = self.inner_steps >= self.hparams.head_warmup_steps
        return past_warmup and self.inner_steps % self.hparams.outer_every_n_steps == 0

    def _inner_weights(self, inner, outer, outer_due: bool):
        """Forward the inner batch and decide its weights [B] (detached).

        Also returns the head's gathered inputs (``learned``; None otherwise) for the outer update of the same step.
        Weights depend on the whole batch (normalisation, top fractions, l2rw's rescaling). Under DDP every rank
        gathers the per-row inputs of the global batch (one small all-gather), computes all the weights exactly as
        one process would, and keeps its own rows; the head's running statistics see the global batch on every
        rank, so the replicas stay identical.
        """
        micro = self.hparams.micro_batch_size
        if micro is not None and micro < inner["input_ids"].shape[0]:
            # Weights are a function of the whole batch (per-batch normalisation), so they are computed on a
            # no-grad pass first and the chunks are then forwarded again with grad (one extra forward).
            with torch.no_grad():
                out = _cat_outputs([self.policy.trajectory_forward(c) for c in _chunks(inner, micro)])
        else:
            out = self.policy.trajectory_forward(inner)
        directional, hypergrad, head_inputs = None, None, None
        name = self.hparams.weighting
        nan = torch.full_like(out.loss, float("nan")).detach()
        if name == "learned":
            scalars, pooled, synthetic, rows = self._global_features(out, inner)
            if not (torch.isfinite(scalars).all() and (pooled is None or torch.isfinite(pooled).all())):
                # A non-finite feature (e.g. a NaN reward) must not reach the head's running statistics. The check
                # runs on gathered tensors, so every rank skips the step together.
                return out, nan, None, None, None
            self.head.observe(scalars)
            head_inputs = (scalars, pooled, synthetic)
            with torch.no_grad():
                weights = self.head(*head_inputs)
        elif name == "l2rw":
            local = self._local_hypergradient(inner, outer, out, torch.ones_like(out.loss))
            hypergrad, rows = _gather_hypergradient(local)
            directional = local.directional
            weights = l2rw_weights(hypergrad.directional)
        else:
            columns = torch.stack([inner["is_synthetic"].float(), inner["reward"].float(), inner["length"].float(),
                                   inner["num_turns"].float()], dim=1)
            table, rows = dp.all_gather_rows(columns)
            is_synthetic, reward, length, turns = table.unbind(1)
            baseline = 0.0
            if name == "advantage_weighted":
                baseline = self.aw_baseline.update_and_predict(reward, length, turns)
            weights = fixed_weights(name, is_synthetic, reward, self.hparams.filter_fraction,
                                    self.hparams.weighting_temperature, baseline)
        if not torch.isfinite(weights).all():
            return out, nan, directional, hypergrad, head_inputs
        return out, weights[rows].detach(), directional, hypergrad, head_inputs

    def _global_features(self, out: TrajectoryOutput, inner) -> tuple[Tensor, Tensor | None, Tensor, slice]:
        """Head inputs of the global batch (scalars [N, k], pooled [N, H] or None, is_synthetic [N]) and this
        rank's rows in them."""
        scalars = scalar_features(out, inner, self.head.scalar_names)
        k = scalars.shape[1]
        # One collective for all: B·(k + 1 + H) floats per call, small next to the policy's forward.
        columns = [scalars, inner["is_synthetic"].float().unsqueeze(1)]
        if self.head.uses_hidden:
            columns.append(out.pooled.float())
        table, rows = dp.all_gather_rows(torch.cat(columns, dim=1))
        pooled = table[:, k + 1:] if self.head.uses_hidden else None
        return table[:, :k], pooled, table[:, k], rows

    def _objective(self, losses: Tensor, reward: Tensor) -> Tensor:
        hp = self.hparams
        if hp.objective == "filtered_bc":
            return filtered_bc(losses, reward, hp.objective_fraction)
        if hp.objective == "reward_weighted":
            return reward_weighted(losses, reward, hp.objective_beta)
        if hp.objective == "advantage_weighted":
            return advantage_weighted(losses, reward, beta=hp.objective_beta)
        return behaviour_cloning(losses, reward)

    def _inner_backward(self, inner, out: TrajectoryOutput, weights: Tensor, scale: float) -> Tensor:
        """Backward of L_in = Σwℓ/Σw, chunked if ``micro_batch_size`` is set; returns L_in (detached).

        Under DDP each rank backpropagates its term Σ_local wℓ / Σ_global w and the policy gradients are summed
        over ranks (:meth:`_synced_policy_backward`); the returned L_in is the global value on every rank.
        """
        # Sync point: Σ_global w (one scalar all-reduce per step).
        total = dp.all_reduce_sum(weights.sum()).clamp(min=1e-12)
        objective = self._objective(out.loss, inner["reward"])
        micro = self.hparams.micro_batch_size
        if micro is None or micro >= weights.shape[0]:
            loss = weighted_loss(objective, weights, total)
            loss_value = dp.all_reduce_sum(loss.detach())
            if torch.isfinite(loss_value):
                self._synced_policy_backward([lambda: loss * scale])
            return loss_value
        # The objective's per-batch statistics (filter threshold, baselines) come from the whole batch: pass
        # them to each chunk as the multiplier objective/NLL computed above on the no-grad pass.
        multiplier = (objective / out.loss.clamp(min=1e-12)).detach()
        loss_value = dp.all_reduce_sum(weighted_loss(objective.detach(), weights, total))
        if not torch.isfinite(loss_value):
            return loss_value

        def chunk_loss(chunk, rows):
            losses = self.policy.trajectory_forward(chunk).loss * multiplier[rows]
            return weighted_loss(losses, weights[rows], total) * scale

        self._synced_policy_backward([
            (lambda chunk=chunk, start=start: chunk_loss(chunk, slice(start, start + micro)))
            for start, chunk in zip(range(0, weights.shape[0], micro), _chunks(inner, micro))
        ])
        return loss_value

    def _synced_policy_backward(self, losses) -> None:
        """Backpropagate each loss thunk locally, then sum this step's policy gradients over ranks.

        DDP's own reducer is kept out of the way (:meth:`_local_backward`): with two backward passes per step over
        disjoint parameters (policy, head) it would wait forever for the unused ones unless
        ``find_unused_parameters`` were set, and it averages where the weighted loss needs a sum. Instead one
        flattened all-reduce of the LoRA gradients (the same bytes DDP would move) runs once per inner batch.
        Gradients accumulated from earlier batches of an accumulation cycle are already global, so only this
        batch's increment is reduced. Parameters without a gradient stay without one (as in one process).
        """
        params = list(self.policy.trainable_named_parameters().values())
        prior = [None if p.grad is None else p.grad.clone() for p in params] if dp.is_distributed() else None
        for loss in losses:
            self._local_backward(loss())
        if prior is None:
            return
        grads = []
        for p, before in zip(params, prior):
            if p.grad is not None:
                if before is not None:
                    p.grad.sub_(before)
                grads.append(p.grad)
        dp.all_reduce_tensors_(grads, op="sum")
        for p, before in zip(params, prior):
            if p.grad is not None and before is not None:
                p.grad.add_(before)

    def _local_backward(self, loss: Tensor) -> None:
        """``manual_backward`` with the DDP reducer off (``no_sync``): gradients stay local until synced here."""
        wrapper = self.trainer.strategy.model if self._trainer is not None else None
        with wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) else contextlib.nullcontext():
            self.manual_backward(loss)

    def _hypergradient(self, inner, outer, out: TrajectoryOutput, weights: Tensor) -> tuple[Hypergradient, slice]:
        """The hypergradient of the global inner batch ([N] fields, gathered under DDP, identical on every rank) and
        this rank's rows in it."""
        return _gather_hypergradient(self._local_hypergradient(inner, outer, out, weights))

    def _local_hypergradient(self, inner, outer, out: TrajectoryOutput, weights: Tensor) -> Hypergradient:
        """∂L_val/∂wᵢ for this rank's rows, with v = ∇ of the global validation loss and the global batch size."""
        params = self.policy.trainable_named_parameters()
        lr = self.hparams.lookahead_lr or self.optimizers()[0].param_groups[0]["lr"]
        # Sync point: global inner and validation row counts (one two-element all-reduce per outer step).
        num_inner, num_val = (int(n) for n in dp.all_reduce_sum(torch.tensor(
            [inner["input_ids"].shape[0], outer["input_ids"].shape[0]], device=out.loss.device)))
        inner_fn = lambda p: self._objective(self.policy.functional_losses(inner, p), inner["reward"])  # noqa: E731
        # This rank's term of the global mean validation loss; `all_reduce` sums the terms (and their gradients).
        val_fn = lambda p: self.policy.functional_losses(outer, p).sum() / num_val  # noqa: E731
        all_reduce = dp.all_reduce_sum if dp.is_distributed() else None
        if self.hparams.hypergradient == "exact":
            return exact_hypergradient(params, inner_fn, val_fn, weights, lr, batch_size=num_inner,
                                       all_reduce=all_reduce)
        base = self._objective(out.loss.detach(), inner["reward"])
        return first_order_hypergradient(params, inner_fn, val_fn, lr, base_losses=None if self.hparams.fd_central
                                         else base, eps=self.hparams.fd_eps, central=self.hparams.fd_central,
                                         batch_size=num_inner, all_reduce=all_reduce,
                                         precondition=self._adam_preconditioner(list(params.values())))

    def _adam_preconditioner(self, params: list[Tensor]):
        """v ↦ v / (√v̂ + eps) from the policy optimizer's state; None for ``none`` or before its first step."""
        if self.hparams.hypergradient_preconditioner != "adam":
            return None
        optimizer = self.optimizers()[0].optimizer
        states = [optimizer.state.get(p, {}) for p in params]
        if not all("exp_avg_sq" in st for st in states):
            return None  # no second moments yet: the first Adam step is sign-like, P = I is the honest default
        # Each parameter is scaled with the betas/eps of its own group (a user optimizer may have several).
        group_of = {id(q): group for group in optimizer.param_groups for q in group["params"]}
        scales = []
        for p, st in zip(params, states):
            group = group_of[id(p)]
            beta2, eps = group.get("betas", (0.9, 0.999))[1], group.get("eps", 1e-8)
            scales.append(1.0 / ((st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))).sqrt() + eps))
        return lambda v: [g * scale.to(g.dtype) for g, scale in zip(v, scales)]

    def _outer_update(self, head_opt, head_inputs: tuple[Tensor, Tensor | None, Tensor],
                      hypergrad: Hypergradient) -> None:
        accumulate = self.hparams.outer_accumulate_grad_batches
        if self._outer_evals % accumulate == 0:
            head_opt.zero_grad()
        self._outer_evals += 1
        # The head runs on the global batch on every rank (features gathered once per step in _inner_weights, global
        # g from _hypergradient): the normalisation and the ESS/entropy regulariser are functions of all N weights,
        # and the head is tiny.
        weights = self.head(*head_inputs)
        # ∂/∂φ Σ gᵢ·wᵢ(φ) = Σ gᵢ ∂wᵢ/∂φ: the chain rule through the head, with g the hypergradient.
        g = hypergrad.grad_weights.to(weights.dtype)
        if self.hparams.normalize_hypergradient:
            # Only g's direction across rows carries the signal; a unit RMS puts it on the regulariser's scale.
            g = unit_rms(g) / g.shape[0]
        surrogate = (g * weights).sum() + self.head.regularization(weights)
        self._local_backward(surrogate / accumulate)
        # Every rank computed the same gradient from the same inputs; rank 0's copy (a few thousand floats) is
        # broadcast so that the head replicas stay identical even where kernels are not bitwise deterministic.
        dp.broadcast_tensors_([p.grad for p in self.head.parameters() if p.grad is not None])
        self.log("outer/val_loss", hypergrad.val_loss, prog_bar=True)
        self.log("outer/surrogate", surrogate.detach())
        self.log("hypergrad/norm", hypergrad.grad_weights.norm())
        self.log("hypergrad/v_norm", hypergrad.v_norm)
        if self._outer_evals % accumulate == 0:
            if not _grads_finite(head_opt):
                self._count_fault("hypergrad")
                head_opt.zero_grad()
                return
            self._clip(head_opt, self.hparams.head_grad_clip)
            head_opt.step()
            self._step_scheduler(1)
            self.outer_steps += 1

    # -- faults -------------------------------------------------------------------------------------------------
    def _count_fault(self, kind: str) -> None:
        self.faults[kind] += 1
        self._consecutive_faults += 1
        self.log(f"faults/{kind}", float(self.faults[kind]))
        if self._consecutive_faults >= self.hparams.max_consecutive_faults:
            raise FaultLimitError(
                f"{self._consecutive_faults} consecutive steps skipped for non-finite values (last: {kind}; "
                f"totals {self.faults}). Check the data (rewards), the learning rates and the precision."
            )

    def _skip(self, kind: str, policy_opt, head_opt=None) -> None:
        """Skip this step (both levels unchanged, see ``_discard_step``) and count the fault."""
        self._discard_step(policy_opt, head_opt)
        self._count_fault(kind)
        return None

    def _discard_step(self, policy_opt, head_opt=None) -> None:
        # Nothing has stepped yet when a fault is found (the policy gradient is checked before the head steps),
        # so dropping the pending gradients and the running statistics this batch touched undoes the whole step.
        # Gradients accumulated by earlier batches of the same accumulation cycle are dropped with it.
        policy_opt.zero_grad()
        if head_opt is not None:
            head_opt.zero_grad()
        snapshot = getattr(self, "_fault_snapshot", None)
        if snapshot is not None:
            buffers, baseline = snapshot
            with torch.no_grad():
                for name, buffer in self.head.named_buffers():
                    buffer.copy_(buffers[name])
            self.aw_baseline.load_state_dict(baseline)

    def _running_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Copies of the state a step updates besides parameters and optimizers (tiny: feature statistics)."""
        return {n: b.detach().clone() for n, b in self.head.named_buffers()}, self.aw_baseline.state_dict()

    # -- logging --------------------------------------------------------------------------------------------------
    def _log_inner(self, inner, out: TrajectoryOutput, weights: Tensor, inner_loss: Tensor,
                   hypergrad: Hypergradient | None) -> None:
        # Statistics of the global batch (one all-gather of B×3 floats) rather than sync_dist means of per-rank
        # values: the ESS of the global weights is not the mean of per-rank ESS. inner_loss is already global.
        table, _ = dp.all_gather_rows(torch.cat([weights.float()[:, None], inner["is_synthetic"].float()[:, None],
                                                 out.loss.detach().float()[:, None], out.pooled.detach().float()],
                                                dim=1))
        weights, synthetic, nll, pooled = table[:, 0], table[:, 1].bool(), table[:, 2], table[:, 3:]
        ess = effective_sample_size(weights)
        # The PAC-Bayes trade-off: weighted empirical risk vs ESS vs task shift (weighted-synthetic vs real MMD²).
        bound = tradeoff(nll, weights, pooled, synthetic)
        self.log("tradeoff/weighted_risk", bound.weighted_risk)
        self.log("tradeoff/ess", bound.ess)
        if torch.isfinite(bound.task_shift):
            self.log("tradeoff/task_shift", bound.task_shift)
        self.log("inner/loss", inner_loss, prog_bar=True)
        self.log("inner/nll", nll.mean())
        self.log("inner/lr", self.optimizers()[0].param_groups[0]["lr"])
        self.log("inner_steps", float(self.inner_steps))
        self.log("outer_steps", float(self.outer_steps))
        self.log("weights/ess", ess, prog_bar=True)
        self.log("weights/ess_fraction", ess / weights.shape[0])
        self.log("weights/max", weights.max())
        if (~synthetic).any():
            self.log("weights/mean_real", weights[~synthetic].mean())
        if synthetic.any():
            self.log("weights/mean_synthetic", weights[synthetic].mean())
        self.log("weights/mass_synthetic", weights[synthetic].sum() / weights.sum().clamp(min=1e-12))
        if hypergrad is not None and self.hparams.weighting == "l2rw":
            self.log("outer/val_loss", hypergrad.val_loss, prog_bar=True)

    def _clip(self, optimizer, max_norm: float | None) -> None:
        if max_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def _step_scheduler(self, index: int) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        configs = self.trainer.lr_scheduler_configs
        wanted = self.trainer.optimizers[index]
        for sched, cfg in zip(schedulers, configs):
            if cfg.scheduler.optimizer is wanted:
                sched.step()

    # -- validation / prediction --------------------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self.policy.trajectory_forward(batch)
        agent_tokens = batch["num_agent_tokens"].clamp(min=1).float()
        self.val_loss.update(out.loss)
        self.val_accuracy.update(out.correct / agent_tokens, weight=agent_tokens)
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=out.loss.shape[0])
        self.log("val/token_accuracy", self.val_accuracy, batch_size=out.loss.shape[0])

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        out = self.policy.trajectory_forward(batch)
        scalars = scalar_features(out, batch, self.head.scalar_names)
        scores = self.head.scores(scalars, out.pooled)
        rows = []
        for i in range(scores.shape[0]):
            rows.append({
                "row_id": int(batch["row_id"][i]),
                "task_id": batch["task_id"][i],
                "source": "synthetic" if float(batch["is_synthetic"][i]) > 0.5 else "real",
                "score": float(scores[i]),
                "features": {name: float(scalars[i, j]) for j, name in enumerate(self.head.scalar_names)},
            })
        return rows

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("policy.") or k in trainable
        }
        checkpoint["boost"] = {
            "inner_steps": self.inner_steps,
            "outer_steps": self.outer_steps,
            "faults": dict(self.faults),
            "consecutive_faults": self._consecutive_faults,
            "batches_seen": self._batches_seen,
            "outer_evals": self._outer_evals,
            "aw_baseline": self.aw_baseline.state_dict(),
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("boost", {})
        self._pending_rng = state.get("rng")
        self.inner_steps = state.get("inner_steps", 0)
        self.outer_steps = state.get("outer_steps", 0)
        self.faults.update(state.get("faults", {}))
        self._consecutive_faults = state.get("consecutive_faults", 0)
        self._batches_seen = state.get("batches_seen", 0)
        self._outer_evals = state.get("outer_evals", 0)
        if "aw_baseline" in state:
            self.aw_baseline.load_state_dict(state["aw_baseline"])

    def on_train_start(self) -> None:
        # RNG states go back when training starts, not at load time: the sanity check and the new dataloader
        # iterators (each draws a base seed) would otherwise move them away from the uninterrupted run. They are the
        # states of the save point, so the streams match exactly when the uninterrupted run drew nothing between
        # that point and its next step (no validation pass or epoch change in between).
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None


def _default_adamw(params):
    return torch.optim.AdamW(params, lr=1e-4)


def _default_adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def _grads_finite(optimizer) -> bool:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return False
    return True


def _chunks(batch: Mapping[str, Any], size: int):
    n = batch["input_ids"].shape[0]
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


def _gather_hypergradient(local: Hypergradient) -> tuple[Hypergradient, slice]:
    """Per-row fields of every rank concatenated (val_loss and v_norm are already global); this rank's rows."""
    table, rows = dp.all_gather_rows(torch.stack([local.grad_weights, local.directional], dim=1))
    return Hypergradient(grad_weights=table[:, 0], val_loss=local.val_loss, v_norm=local.v_norm,
                         directional=table[:, 1]), rows


def _cat_outputs(outs: list[TrajectoryOutput]) -> TrajectoryOutput:
    return TrajectoryOutput(*(torch.cat([getattr(o, f) for o in outs]) for f in ("loss", "surprise", "pooled",
                                                                                "correct")))


