"""BoostModule: the bilevel training loop of BOOST as a LightningModule (manual optimisation).

One training step, top to bottom (:meth:`BoostModule.training_step`):

    inner  forward the inner batch → per-row losses ℓᵢ; gather the weighting's per-row inputs of the global batch
           wᵢ = weighting(inputs) (detached)                         L_in = Σ wᵢmᵢℓᵢ / Σ wᵢ   (mᵢ: the objective)
           policy_opt: zero_grad → manual_backward(L_in)
    outer  when due (every ``outer_every_n_steps`` policy steps, after ``head_warmup_steps``), for a learned weighting:
           g = ∂L_val(θ')/∂w  (hypergradient at the θ the inner gradient was taken at)
           head_opt:   zero_grad → manual_backward(Σ gᵢ·wᵢ(φ) + regulariser) → clip → step
    inner  policy_opt: clip → step

The hypergradient is taken before the policy steps so that v = ∇L_val and the finite-difference probe see the same θ
as the inner gradient (the one-step lookahead of DESIGN.md); it reads the live LoRA tensors but probes θ + εv
functionally, so the pending policy gradient is untouched.

Accumulation at both levels (:class:`~boost_lightning.bilevel.schedule.BilevelSchedule`): the outer schedule counts
policy steps, and the head steps at most once per policy step.

Faults: any non-finite weight, loss, gradient or hypergradient raises :class:`~boost_lightning.faults.NonFiniteError`
where it is found; the step catches it in one place and the :class:`~boost_lightning.faults.FaultGuard` undoes the
step (no optimizer has stepped yet: every check runs before the first ``.step()``). A batch whose weights are all zero
(``real_only`` on a batch without real rows) is skipped the same way and counted apart, never as a policy step.

``trainer.global_step`` counts every optimizer ``.step()`` (policy, head, reference adapter); the explicit
``inner_steps`` and ``outer_steps`` counters (logged, checkpointed) are what ``max_inner_steps`` and the diagnostics
read.

Granularity: the weighted unit i above is a row (``granularity="trajectory"``) or one assistant turn of a row
(``"turn"``: ℓᵢ is the turn's agent-token NLL, the sums run over every turn of the global batch, each turn carries its
row's objective multiplier). The training step is the same code either way; only the policy's forward
(``TrajectoryOutput`` per unit), the weighting's view of the batch
(:func:`~boost_lightning.models.features.unit_columns`) and the unit count of the lookahead change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from boost_lightning import distributed as dp
from boost_lightning.bilevel.hypergradient import Hypergradient, HypergradientOptions, unit_rms
from boost_lightning.bilevel.policy import policy_hypergradient
from boost_lightning.bilevel.schedule import BilevelSchedule
from boost_lightning.bilevel.tradeoff import tradeoff
from boost_lightning.data.collate import concat_batches, row_keys, take_rows
from boost_lightning.faults import (
    EmptyBatchError,
    FaultGuard,
    FaultLimitError,
    SkippedStep,
    check_finite,
    check_grads_finite,
)
from boost_lightning.models.features import unit_columns
from boost_lightning.models.policy import GRANULARITIES, PolicyModel, TrajectoryOutput
from boost_lightning.models.reference import ReferenceAdapter
from boost_lightning.models.weight_head import weight_statistics
from boost_lightning.objectives import Objective, build_objective, weighted_loss
from boost_lightning.preemption import rng_state, set_rng_state
from boost_lightning.weightings import Weighting, build_weighting

__all__ = ["BoostModule", "FaultLimitError"]


@dataclass
class _Rows:
    """The global inner batch as the weighting and objective see it (gathered; identical on every rank).

    Its N entries are units: rows, or assistant turns at turn granularity (a turn carries its row's multiplier).
    """

    inputs: Tensor  # [N, k] the weighting's per-unit inputs
    synthetic: Tensor  # [N] bool
    multiplier: Tensor  # [N] the objective's multiplier mᵢ
    local: slice  # this rank's units


class BoostModule(LightningModule):
    """BOOST: learn one weight per trajectory so that training on the weighted mix helps held-out real tasks.

    Args:
        policy: The inner-level learner (an HF causal LM with LoRA).
        weighting: How rows are weighted: a :class:`~boost_lightning.weightings.Weighting` (``class_path``), or a
            short name: ``learned`` (BOOST: a head trained through the hypergradient), ``uniform``, ``real_only``,
            ``synthetic_only``, ``return_filter``, ``return_softmax``, ``advantage_softmax``, ``l2rw``.
        objective: The per-row inner loss: an :class:`~boost_lightning.objectives.Objective` or a short name:
            ``bc`` (agent-token NLL), ``top_return_bc``, ``rwr``, ``awr``.
        policy_optimizer: Optimizer of the policy's trainable (LoRA) parameters. Default: AdamW(lr=1e-4).
        head_optimizer: Optimizer of the weighting's parameters (the learned head). Default: Adam(lr=1e-3).
        policy_scheduler: Optional LR scheduler of the policy optimizer, stepped once per inner step.
        head_scheduler: Optional LR scheduler of the head optimizer, stepped once per outer step.
        hypergradient: How ∂L_val/∂w is estimated (method, lookahead lr, probe, preconditioner, normalisation).
        outer_every_n_steps: An outer (head) update every this many policy steps.
        head_warmup_steps: Policy steps of plain weighted SFT before the first outer update.
        inner_accumulate_grad_batches: Batches whose inner gradients are accumulated per policy step.
        outer_accumulate_grad_batches: Due policy steps whose hypergradients are accumulated per head step.
        micro_batch_size: Split the inner batch into chunks of this many rows for forward/backward (memory);
            the weights are computed on the whole batch first, so the result does not depend on the split.
        policy_grad_clip: Max global grad norm of the policy (None: off).
        head_grad_clip: Max global grad norm of the head (None: off).
        max_inner_steps: Stop after this many policy steps (``trainer.max_steps`` counts the optimizer steps of every
            level).
        max_consecutive_faults: Stop with an error after this many consecutive skipped steps.
        granularity: What one weight is given to. ``trajectory``: a whole row. ``turn``: each assistant turn (a
            maximal run of agent tokens in ``labels``; no change to the data) gets its own weight, from the head's
            features of that turn (its NLL, the surprise of the observation that answers it, its pooled state, its
            tokens, plus its row's return, source and turn count; add ``position`` to the head's features to show it
            where the turn sits). The inner loss is then Σ_u w_u·m_u·ℓ_u / Σ_u w_u over every turn of the global
            batch, ℓ_u the turn's mean agent-token NLL: with uniform weights that is SFT where every turn counts
            once, whatever its length (the trajectory default averages tokens per row). The hypergradient, the
            ``weights/*`` and ``tradeoff/*`` logs (ESS, means per source) are per turn, and so are the head's
            batches: expect several times more units per batch, and one more all-gather per step; the policy's
            forward costs the same. Validation and test losses stay per row. ``predict`` writes one record per row
            with its ``turn_scores`` (the writer adds ``turn_weights``). Weightings whose inputs only make sense per
            trajectory (``advantage_softmax``) refuse ``turn``.
        source_sampling: How the head's weights reach the policy. ``natural``: inner batches follow the data module's
            mix and the weights are loss coefficients, so a scarce source the head prefers gets a large coefficient
            on the few rows that happen to be drawn (with 1 % real rows, most batches hold none). ``weights``
            (resampling, as DoReMi-style mixing does): the data module draws real and synthetic rows in two streams
            and each inner batch takes round(p·B) real rows (stochastic rounding) and synthetic ones for the rest,
            where p is the share of the weight mass the head gives real rows on the natural mix (running per-source
            means of its unnormalised weights; the natural share until both sources have been seen). Each row's
            weight is then multiplied by π_s/p_s (π the natural share of its source) and renormalised, so a batch's
            expected loss is the natural mix's weighted loss: a preferred source gets more rows per batch instead of
            a larger coefficient. Needs a weighting that resamples (``learned`` with ``reweight: all``) and real
            rows; leave ``data.real_fraction`` unset. Logged as ``sampling/real_share`` and ``sampling/real_rows``.
        reference_steps: Train the reference adapter (built for a head that reads ``excess_loss`` or
            ``reference_surprise``) during the first this many policy steps only, then freeze it, as RHO-LOSS trains its
            reference once before the learner. A frozen reference saves a forward and backward of the validation batch
            and the batch's real rows every step (about one SFT step); its features still cost one no-grad forward of
            the inner batch. ``None``: trained every step of the run; ``0``: never trained (the features then compare
            the policy with its own initial state). Ignored without a reference. A reference frozen after a third of
            the benchmark's run lost 23 points of success on guess_number (``docs/experiments.md``, entry 19): the
            features need a reference that keeps learning the trusted rows as the policy learns.
        reference_batch_size: Train the reference adapter on the first this many rows of each step's validation batch
            (per device) besides the inner batch's real rows, instead of on the whole validation batch: its training
            then costs a forward and backward of that many rows, where the whole batch costs about one SFT step.
            ``None``: the whole validation batch. Ignored without a reference. Trained on 4 of 16 rows, the reference
            lost 18 points of success on guess_number (``docs/experiments.md``, entry 20).
    """

    def __init__(
        self,
        policy: PolicyModel,
        weighting: Weighting | str = "learned",
        objective: Objective | str = "bc",
        policy_optimizer: OptimizerCallable | None = None,
        head_optimizer: OptimizerCallable | None = None,
        policy_scheduler: LRSchedulerCallable | None = None,
        head_scheduler: LRSchedulerCallable | None = None,
        hypergradient: HypergradientOptions | None = None,
        outer_every_n_steps: int = 1,
        head_warmup_steps: int = 0,
        inner_accumulate_grad_batches: int = 1,
        outer_accumulate_grad_batches: int = 1,
        micro_batch_size: int | None = None,
        policy_grad_clip: float | None = 1.0,
        head_grad_clip: float | None = 1.0,
        max_inner_steps: int | None = None,
        max_consecutive_faults: int = 10,
        granularity: Literal["trajectory", "turn"] = "trajectory",
        source_sampling: Literal["natural", "weights"] = "natural",
        reference_steps: int | None = None,
        reference_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.schedule = BilevelSchedule(inner_accumulate_grad_batches, outer_accumulate_grad_batches,
                                        outer_every_n_steps, head_warmup_steps)
        # Objects are config (class_path) but not checkpoint material: the counters and tensors are saved instead.
        self.save_hyperparameters(ignore=["policy", "weighting", "objective", "hypergradient", "policy_optimizer",
                                          "head_optimizer", "policy_scheduler", "head_scheduler"])
        self.automatic_optimization = False
        # Checkpoints hold the trainable tensors only (LoRA, head); the frozen base model is rebuilt from its
        # path or config, so loading is intentionally non-strict about it.
        self.strict_loading = False
        self.policy = policy
        self.weighting = build_weighting(weighting)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity not in self.weighting.granularities:
            raise ValueError(f"granularity={granularity!r} is not supported for the {type(self.weighting).__name__} "
                             f"weighting (it weighs {' or '.join(self.weighting.granularities)} units only); use "
                             f"granularity='trajectory' or another weighting")
        self.granularity = granularity
        if source_sampling not in ("natural", "weights"):
            raise ValueError(f"source_sampling must be 'natural' or 'weights', got {source_sampling!r}")
        if source_sampling == "weights" and not self.weighting.resamples:
            raise ValueError(f"source_sampling='weights' needs a weighting that resamples (learned with reweight: "
                             f"all); {type(self.weighting).__name__} does not")
        self.source_sampling = source_sampling
        if reference_steps is not None and reference_steps < 0:
            raise ValueError(f"reference_steps must be >= 0 or None, got {reference_steps}")
        if reference_batch_size is not None and reference_batch_size < 1:
            raise ValueError(f"reference_batch_size must be >= 1 or None, got {reference_batch_size}")
        self._natural_real_share: float | None = None  # set at setup from the data module's row counts
        self.weighting.bind(policy.hidden_size)
        self.objective = build_objective(objective)
        self.hypergradient = hypergradient if hypergradient is not None else HypergradientOptions()
        self.policy_optimizer, self.head_optimizer = policy_optimizer, head_optimizer
        self.policy_scheduler, self.head_scheduler = policy_scheduler, head_scheduler
        self.guard = FaultGuard(max_consecutive_faults)
        # Built from the policy's trainable tensors once they exist (setup, or before a checkpoint loads into it).
        self.reference: ReferenceAdapter | None = None
        self.inner_steps = 0
        self.outer_steps = 0
        self.empty_batches = 0
        self._pending_rng: dict[str, Any] | None = None  # RNG states of a loaded checkpoint, set when training starts
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.test_loss = MeanMetric()
        self.test_accuracy = MeanMetric()

    @property
    def faults(self) -> dict[str, int]:
        """Skipped steps per kind of non-finite value."""
        return self.guard.counts

    @property
    def reference_trains(self) -> bool:
        """Whether this policy step trains the reference adapter (``reference_steps`` not yet reached)."""
        limit = self.hparams.reference_steps
        return self.reference is not None and (limit is None or self.inner_steps < limit)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.policy.check_data(getattr(datamodule, "tokenizer", None), getattr(datamodule, "max_length", None))
        # A weighting that keeps one source trains on full batches of that source, not on mixed batches whose other
        # rows weigh nothing (a batch with none of them would be a step on no data).
        if stage == "fit" and self.weighting.keeps != "all" and hasattr(datamodule, "draw_only"):
            datamodule.draw_only(self.weighting.keeps)
        # The same for a weighting that drops rows by their content (a pool-wide return cut, a ground-truth label).
        if stage == "fit" and hasattr(datamodule, "keep_rows"):
            datamodule.keep_rows(self.weighting.select)
        if stage == "fit" and self.source_sampling == "weights":
            if not hasattr(datamodule, "draw_real_stream"):
                raise ValueError("source_sampling='weights' needs a data module with draw_real_stream "
                                 "(BoostDataModule): the real rows come in a stream of their own")
            counts = datamodule.draw_real_stream()
            self._natural_real_share = counts["real"] / (counts["real"] + counts["synthetic"])

    def configure_model(self) -> None:
        """Build the reference adapter, for a weighting whose features read it, at the policy's current (initial)
        tensors. Idempotent; called by the Trainer before a checkpoint is restored, and by :meth:`on_load_checkpoint`.
        """
        if self.weighting.needs_reference and self.reference is None:
            self.reference = ReferenceAdapter(self.policy)

    # -- optimisers ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[dict[str, Any]]:
        policy_params = list(self.policy.trainable_named_parameters().values())
        optimizers = [((self.policy_optimizer or _default_adamw)(policy_params), self.policy_scheduler)]
        if self.weighting.learns:  # a weighting without parameters has no outer level and no optimizer
            optimizers.append(((self.head_optimizer or _default_adam)(self.weighting.parameters()),
                               self.head_scheduler))
        if self.reference is not None:  # trained alongside the policy: the same optimizer and schedule
            optimizers.append(((self.policy_optimizer or _default_adamw)(list(self.reference.parameters())),
                               self.policy_scheduler))
        configs = []
        for opt, sched in optimizers:
            entry: dict[str, Any] = {"optimizer": opt}
            if sched is not None:
                entry["lr_scheduler"] = {"scheduler": sched(opt), "interval": "step"}
            configs.append(entry)
        return configs

    # -- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Mapping[str, Any]], batch_idx: int) -> dict[str, Tensor] | None:
        inner = self._compose(batch, batch_idx) if self.source_sampling == "weights" else batch["inner"]
        outer = batch["outer"]
        policy_opt, head_opt, reference_opt = self._optimizers()
        cycle = self.schedule.next(self.inner_steps, self.weighting.learns)
        self.guard.snapshot(self.weighting)
        try:
            # ---- inner level: losses → weights of the global batch (detached) → backward -------------------------
            out = self._forward(inner)
            if self.reference is not None:
                out = self._with_reference(inner, out)
            rows = self._gather_rows(out, inner)
            hypergrad = self._hypergradient(inner, outer, out, rows) if self.weighting.needs_hypergradient else None
            weights = self._weights(rows, hypergrad)
            if cycle.first:
                policy_opt.zero_grad()
            inner_loss = self._inner_backward(inner, out, rows, weights)
            if cycle.last:  # checked before the head steps: a policy step that cannot happen leaves no head step
                check_grads_finite("grad", policy_opt)

            # ---- reference adapter (trusted rows only, until frozen): zero_grad → backward ---------------------------
            if reference_opt is not None and self.reference_trains:
                if cycle.first:
                    reference_opt.zero_grad()
                self._reference_backward(inner, outer)
                if cycle.last:
                    check_grads_finite("grad", reference_opt)

            # ---- outer level: hypergradient → head: zero_grad → backward → clip → step ---------------------------
            if cycle.outer:
                hypergrad = self._hypergradient(inner, outer, out, rows, weights[rows.local])
                if self.weighting.observes_validation:  # after this step's weights: no row sees its own step's batch
                    # Sync point: every rank's validation pooled states (V·H floats), only for a weighting reading them.
                    self.weighting.observe_validation(dp.all_gather_rows(hypergrad.val_pooled)[0])
                if cycle.head_zero:
                    head_opt.zero_grad()
                self._outer_backward(rows, hypergrad)
                if cycle.head_step:
                    check_grads_finite("hypergrad", head_opt)
                    self._clip_and_step(head_opt, self.hparams.head_grad_clip)
                    self.outer_steps += 1

            # ---- inner level (and the reference alongside): clip → step -------------------------------------------
            if cycle.last:
                self._clip_and_step(policy_opt, self.hparams.policy_grad_clip)
                if reference_opt is not None and self.reference_trains:
                    self._clip_and_step(reference_opt, self.hparams.policy_grad_clip)
                self.inner_steps += 1
                self.guard.succeeded()
        except SkippedStep as skipped:
            return self._skip(skipped, policy_opt, head_opt, reference_opt)
        self._log_step(rows, out, weights, inner_loss, hypergrad)
        result = {"weights": weights[rows.local], "is_synthetic": inner["is_synthetic"].detach(),
                  "hypergradient": hypergrad.grad_weights[rows.local] if hypergrad is not None else None}
        if out.unit_row is not None:
            # Callbacks read one weight per row of the batch (the mean of its turns'); the turns' own ride along.
            result.update(weights=_row_means(result["weights"], out.unit_row, inner["input_ids"].shape[0]),
                          turn_weights=result["weights"], unit_row=out.unit_row)
        return result

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hparams.max_inner_steps is not None and self.inner_steps >= self.hparams.max_inner_steps:
            self.trainer.should_stop = True

    def _optimizers(self) -> tuple[Any, Any, Any]:
        """(policy, head, reference) optimizers in configure_optimizers' order; None where a level is absent."""
        optimizers = self.optimizers()
        found = list(optimizers) if isinstance(optimizers, list) else [optimizers]
        policy = found.pop(0)
        head = found.pop(0) if self.weighting.learns else None
        reference = found.pop(0) if self.reference is not None else None
        return policy, head, reference

    def _forward(self, inner: Mapping[str, Any]) -> TrajectoryOutput:
        return self._units(lambda b: self.policy.trajectory_forward(b, granularity=self.granularity), inner)

    def _units(self, forward: Callable[[Mapping[str, Any]], TrajectoryOutput],
               batch: Mapping[str, Any]) -> TrajectoryOutput:
        """``forward`` of the whole batch, or, with ``micro_batch_size``, of its chunks without grad, concatenated."""
        micro = self.hparams.micro_batch_size
        if micro is None or micro >= batch["input_ids"].shape[0]:
            return forward(batch)
        # Weights are a function of the whole batch (per-batch normalisation), so they are computed on a no-grad
        # pass first and the chunks are forwarded again with grad in _inner_backward (one extra forward).
        with torch.no_grad():
            return _cat_outputs([forward(c) for c in _chunks(batch, micro)], micro)

    def _compose(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """The inner batch under ``source_sampling="weights"``, with the weighting's importance factors set for it.

        Slot j of the global batch (W ranks × B rows) holds row j of the global real stream if j < q, else row j of the
        global synthetic stream, q = round(p·W·B) (stochastic rounding). Rank r's slots are rB .. rB + B − 1, so it
        takes the first q_r = clamp(q − rB, 0, B) rows of its real batch and the rest of its synthetic batch: the global
        batch is the one a single process would compose, whatever the world size. p comes from the weighting's
        buffers and the draw from (epoch, batch index), the same on every rank and in a resumed run.
        """
        natural = self._natural_real_share
        if natural is None:
            raise RuntimeError("source_sampling='weights' composes batches set up by BoostModule.setup('fit')")
        share = min(max(self.weighting.real_share(natural), 1e-6), 1 - 1e-6)
        size = batch["inner"]["input_ids"].shape[0]
        world, rank = (self.trainer.world_size, self.global_rank) if self._trainer is not None else (1, 0)
        expected = share * size * world
        draw = torch.rand((), generator=torch.Generator().manual_seed(self.current_epoch * 1_000_003 + batch_idx))
        real_rows = min(int(expected) + int(float(draw) < expected - int(expected)), size * world)
        local = min(max(real_rows - rank * size, 0), size)
        self.weighting.importance = torch.tensor([natural / share, (1 - natural) / (1 - share)])
        self.log_dict({"sampling/real_share": share, "sampling/real_rows": float(real_rows)})
        return concat_batches([take_rows(batch["real"], 0, local), take_rows(batch["inner"], local, size)])

    @torch.no_grad()
    def _with_reference(self, batch: Mapping[str, Any], out: TrajectoryOutput) -> TrajectoryOutput:
        """``out`` with the reference adapter's features of the same units (one extra forward, no backward)."""
        ref = self._units(lambda b: self.reference(self.policy, b, granularity=self.granularity), batch)
        return ReferenceAdapter.annotate(out, ref)

    def _gather_rows(self, out: TrajectoryOutput, inner: Mapping[str, Any]) -> _Rows:
        if out.unit_row is not None:
            return self._gather_turns(out, inner)
        # Sync point: one all-gather of B·(1 + k) floats, small next to the policy's forward. Every rank then computes
        # the weights and multipliers of the whole global batch exactly as one process would and keeps its own rows.
        table, local = dp.all_gather_rows(torch.cat([inner["reward"].float().unsqueeze(1),
                                                     inner["is_synthetic"].float().unsqueeze(1),
                                                     self.weighting.inputs(out, inner)], dim=1))
        return _Rows(inputs=table[:, 2:], synthetic=table[:, 1].bool(),
                     multiplier=self.objective.multiplier(table[:, 0]), local=local)

    def _gather_turns(self, out: TrajectoryOutput, inner: Mapping[str, Any]) -> _Rows:
        """The global batch's turns: the objective's multipliers are a function of the rows (their batch statistics,
        a top fraction or a mean return, count each trajectory once), so rows and turns are gathered apart (ranks may
        hold different numbers of turns) and each turn takes its row's multiplier."""
        returns, row_local = dp.all_gather_rows(inner["reward"].float().unsqueeze(1))
        multiplier = self.objective.multiplier(returns[:, 0])
        columns = unit_columns(inner, out)
        # The row index rides in a float column: exact for any batch below 2²⁴ rows.
        table, local = dp.all_gather_rows(torch.cat([(out.unit_row + row_local.start).float().unsqueeze(1),
                                                     columns["is_synthetic"].float().unsqueeze(1),
                                                     self.weighting.inputs(out, columns)], dim=1))
        return _Rows(inputs=table[:, 2:], synthetic=table[:, 1].bool(), multiplier=multiplier[table[:, 0].long()],
                     local=local)

    def _weights(self, rows: _Rows, hypergrad: Hypergradient | None) -> Tensor:
        """Weights [N] of the global batch; raises when they are non-finite or all zero."""
        weights = self.weighting(rows.inputs, hypergrad).detach()
        check_finite("weights", weights)
        if not bool((weights > 0).any()):
            raise EmptyBatchError(type(self.weighting).__name__)
        return weights

    def _inner_backward(self, inner: Mapping[str, Any], out: TrajectoryOutput, rows: _Rows, weights: Tensor) -> Tensor:
        """Backward of L_in = Σ wᵢmᵢℓᵢ / Σ wᵢ over the global batch's units, chunked by rows if ``micro_batch_size``
        is set.

        Each rank backpropagates its term Σ_local / Σ_global w (scaled by 1/A under accumulation) and the policy
        gradients are summed over ranks; the returned L_in (detached) is the global value on every rank.
        """
        total = weights.sum().clamp(min=1e-12)
        local_w, multiplier = weights[rows.local], rows.multiplier[rows.local]
        loss_value = dp.all_reduce_sum(weighted_loss(out.loss.detach() * multiplier, local_w, total))
        check_finite("inner_loss", loss_value)
        scale = 1.0 / self.hparams.inner_accumulate_grad_batches
        micro = self.hparams.micro_batch_size
        params = list(self.policy.trainable_named_parameters().values())
        with dp.summed_gradients(params):
            if micro is None or micro >= inner["input_ids"].shape[0]:
                self._local_backward(weighted_loss(out.loss * multiplier, local_w, total) * scale)
            else:
                start = 0  # a chunk of rows holds a contiguous run of units (units are ordered by row)
                for chunk in _chunks(inner, micro):
                    losses = self.policy.trajectory_forward(chunk, granularity=self.granularity).loss
                    part = slice(start, start + losses.shape[0])
                    start = part.stop
                    self._local_backward(weighted_loss(losses * multiplier[part], local_w[part], total) * scale)
        return loss_value

    def _reference_backward(self, inner: Mapping[str, Any], outer: Mapping[str, Any]) -> None:
        """Backward of the reference adapter's loss: the mean NLL of the agent and observation tokens
        (:meth:`ReferenceAdapter.training_losses`) over the trusted rows of the global step, the inner batch's real rows
        and the validation batch (real rows, never trained on by the policy; its first ``reference_batch_size`` rows).

        Each rank backpropagates its rows' sum over the global count; the gradients are summed over ranks.
        """
        real = ~inner["is_synthetic"].bool()
        if self.hparams.reference_batch_size is not None:
            outer = take_rows(outer, 0, self.hparams.reference_batch_size)
        batches = [outer] + ([{k: v[real] for k, v in inner.items() if _is_row_tensor(v, real)}] if real.any() else [])
        count = dp.all_reduce_sum(torch.tensor(float(sum(b["input_ids"].shape[0] for b in batches)),
                                               device=inner["input_ids"].device))
        params = list(self.reference.parameters())
        total = 0.0
        with dp.summed_gradients(params):
            for trusted in batches:
                losses = self.reference.training_losses(self.policy, trusted)
                loss = losses.sum() / count.clamp(min=1)
                check_finite("inner_loss", loss)
                self._local_backward(loss / self.hparams.inner_accumulate_grad_batches)
                total = total + loss.detach()
        self.log("reference/loss", dp.all_reduce_sum(torch.as_tensor(total, device=count.device)))

    def _hypergradient(self, inner: Mapping[str, Any], outer: Mapping[str, Any], out: TrajectoryOutput, rows: _Rows,
                       weights: Tensor | None = None) -> Hypergradient:
        """∂L_val/∂wᵢ of the global inner batch's units (gathered, identical on every rank), at ``weights`` (this
        rank's units; uniform by default)."""
        policy_opt = self._optimizers()[0]
        optimizer = getattr(policy_opt, "optimizer", policy_opt)  # the raw optimizer under Lightning's wrapper
        hypergrad = policy_hypergradient(self.policy, inner, outer, self.hypergradient, optimizer,
                                         rows.multiplier[rows.local], out.loss.detach(), weights, self.granularity,
                                         probe_seed=self.outer_steps)
        check_finite("hypergrad", hypergrad.grad_weights, hypergrad.val_loss)
        return hypergrad

    def _outer_backward(self, rows: _Rows, hypergrad: Hypergradient) -> None:
        """Backward of the head's surrogate Σ gᵢ·wᵢ(φ) (+ regulariser) into the weighting's parameters.

        The head runs on the global batch on every rank (it is tiny), with the global g.
        """
        g = hypergrad.grad_weights
        if self.hypergradient.normalize:
            # Only g's direction across rows carries the signal; a unit RMS puts it on the regulariser's scale.
            g = unit_rms(g) / g.shape[0]
        surrogate = self.weighting.outer_loss(rows.inputs, g)
        self._local_backward(surrogate / (self.hparams.inner_accumulate_grad_batches
                                          * self.hparams.outer_accumulate_grad_batches))
        # Every rank computed the same gradient from the same inputs; rank 0's copy (a few thousand floats) is
        # broadcast so that the head replicas stay identical even where kernels are not bitwise deterministic.
        dp.broadcast_tensors_([p.grad for p in self.weighting.parameters() if p.grad is not None])
        self.log("outer/surrogate", surrogate.detach())

    def _local_backward(self, loss: Tensor) -> None:
        """``manual_backward`` with the DDP reducer off (``no_sync``): gradients stay local until synced here.

        DDP's own reducer is kept out of the way: with two backward passes per step over disjoint parameters (policy,
        head) it would wait forever for the unused ones unless ``find_unused_parameters`` were set, and it averages
        where the weighted loss needs a sum (:func:`~boost_lightning.distributed.summed_gradients` does that).
        """
        wrapper = self.trainer.strategy.model if self._trainer is not None else None
        with wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) else contextlib.nullcontext():
            self.manual_backward(loss)

    def _skip(self, skipped: SkippedStep, policy_opt, head_opt, reference_opt) -> None:
        """Undo the step (both levels and the reference unchanged, the weighting's running state restored) and count
        it."""
        self.guard.rollback(self.weighting, (policy_opt, head_opt, reference_opt))
        self.schedule.drop_partial_outer()
        if isinstance(skipped, EmptyBatchError):
            self.empty_batches += 1
            self.log("inner/empty_batches", float(self.empty_batches))
            return None
        self.log(f"faults/{skipped.kind}", float(self.guard.record(skipped.kind)))
        return None

    # -- logging --------------------------------------------------------------------------------------------------
    def _log_step(self, rows: _Rows, out: TrajectoryOutput, weights: Tensor, inner_loss: Tensor,
                  hypergrad: Hypergradient | None) -> None:
        # Statistics of the global batch (one all-gather) rather than sync_dist means of per-rank values: the ESS of
        # the global weights is not the mean of per-rank ESS. Weights and inner_loss are already global.
        table, _ = dp.all_gather_rows(torch.cat([out.loss.detach().float()[:, None], out.pooled.detach().float()], 1))
        # The PAC-Bayes trade-off: weighted empirical risk vs ESS vs task shift (weighted-synthetic vs real MMD²).
        bound = tradeoff(table[:, 0], weights, table[:, 1:], rows.synthetic)
        metrics = {"inner/nll": table[:, 0].mean(), "inner/lr": self._optimizers()[0].param_groups[0]["lr"],
                   "inner_steps": float(self.inner_steps), "outer_steps": float(self.outer_steps),
                   "tradeoff/weighted_risk": bound.weighted_risk, "tradeoff/ess": bound.ess,
                   **weight_statistics(weights, rows.synthetic)}
        if torch.isfinite(bound.task_shift):
            metrics["tradeoff/task_shift"] = bound.task_shift
        if hypergrad is not None:
            metrics.update({"hypergrad/norm": hypergrad.grad_weights.norm(), "hypergrad/v_norm": hypergrad.v_norm})
        bar = {"inner/loss": inner_loss, "weights/ess": metrics.pop("weights/ess")}
        self.log_dict(metrics)
        self.log_dict({**bar,
                       **({"outer/val_loss": hypergrad.val_loss} if hypergrad is not None else {})}, prog_bar=True)

    def _clip_and_step(self, optimizer, max_norm: float | None) -> None:
        """clip → step, then the optimizer's own LR scheduler (once per step of its level)."""
        if max_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        for config in self.trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer.optimizer:
                config.scheduler.step()

    # -- validation / prediction --------------------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_loss, self.val_accuracy)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """``test/loss``: mean agent-token NLL per row of the test split (held-out real rows)."""
        self._evaluate(batch, "test", self.test_loss, self.test_accuracy)

    def _evaluate(self, batch: Mapping[str, Any], prefix: str, loss: MeanMetric, accuracy: MeanMetric) -> None:
        out = self.policy.trajectory_forward(batch)
        agent_tokens = batch["num_agent_tokens"].clamp(min=1).float()
        loss.update(out.loss)
        accuracy.update(out.correct / agent_tokens, weight=agent_tokens)
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=out.loss.shape[0])
        self.log(f"{prefix}/token_accuracy", accuracy, batch_size=out.loss.shape[0])

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One record per row: ``row_id``, ``task_id``, ``source``, ``content_hash`` (when the batch has it), the
        weighting's raw ``score`` and its per-row inputs as ``features``; the writer normalises and writes them.

        At turn granularity a record also holds ``turn_scores`` (one per assistant turn, in order), its ``features``
        map each name to the per-turn values, and its ``score`` is the log-mean-exp of its turn scores: where weights
        are ∝ exp(score) (the default softmax head), rows then rank by score as by the mean of their turn weights,
        which is the ``weight`` the writer gives them."""
        out = self.policy.trajectory_forward(batch, granularity=self.granularity)
        if self.reference is not None:
            out = self._with_reference(batch, out)
        inputs = self.weighting.inputs(out, unit_columns(batch, out))
        scores = self.weighting.scores(inputs)
        names = self.weighting.input_names
        records = row_keys(batch)
        if out.unit_row is None:
            for i, record in enumerate(records):
                record["score"] = float(scores[i])
                record["features"] = {name: float(inputs[i, j]) for j, name in enumerate(names)}
            return records
        for i, record in enumerate(records):
            turns = (out.unit_row == i).nonzero(as_tuple=True)[0]
            turn_scores = scores[turns].double()
            # A row without an agent token (the data checks rule it out) has no turn and weighs nothing.
            record["score"] = float(torch.logsumexp(turn_scores, 0) - math.log(turns.numel())) if turns.numel() \
                else float("-inf")
            record["turn_scores"] = turn_scores.tolist()
            record["features"] = {name: inputs[turns, j].tolist() for j, name in enumerate(names)}
        return records

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("policy.") or k in trainable
        }
        checkpoint["boost"] = {
            "inner_steps": self.inner_steps,
            "outer_steps": self.outer_steps,
            "empty_batches": self.empty_batches,
            "guard": self.guard.state_dict(),
            "schedule": self.schedule.state_dict(),
            "hypergradient": asdict(self.hypergradient),
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()  # before the state dict loads: its reference tensors need a module to go to
        state = checkpoint.get("boost", {})
        self._pending_rng = state.get("rng")
        self.inner_steps = state.get("inner_steps", 0)
        self.outer_steps = state.get("outer_steps", 0)
        self.empty_batches = state.get("empty_batches", 0)
        self.guard.load_state_dict(state.get("guard", {}))
        self.schedule.load_state_dict(state.get("schedule", {}))

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


def _is_row_tensor(value: Any, rows: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows.shape[0]


def _chunks(batch: Mapping[str, Any], size: int):
    n = batch["input_ids"].shape[0]
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


def _cat_outputs(outs: list[TrajectoryOutput], size: int) -> TrajectoryOutput:
    """The outputs of consecutive chunks of ``size`` rows as one; turns' row indices shift to the whole batch's."""
    fields = {f: torch.cat([getattr(o, f) for o in outs]) for f in ("loss", "surprise", "pooled", "correct")}
    if outs[0].unit_row is None:
        return TrajectoryOutput(**fields)
    return TrajectoryOutput(**fields, unit_row=torch.cat([o.unit_row + i * size for i, o in enumerate(outs)]),
                            position=torch.cat([o.position for o in outs]), tokens=torch.cat([o.tokens for o in outs]))


def _row_means(values: Tensor, unit_row: Tensor, rows: int) -> Tensor:
    """[rows] mean of each row's units (0 for a row without one)."""
    sums = values.new_zeros(rows).index_add(0, unit_row, values)
    counts = values.new_zeros(rows).index_add(0, unit_row, torch.ones_like(values))
    return sums / counts.clamp(min=1)
