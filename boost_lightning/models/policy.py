"""The policy: an HF causal LM with PEFT LoRA adapters, scored per trajectory.

Everything BOOST needs from the language model goes through :class:`PolicyModel`:

* ``trajectory_forward`` returns, per trajectory, the token-mean NLL over its agent tokens (with graph), the
  mean NLL of its observation tokens and a pooled hidden state (both detached: head features);
* ``functional_losses`` evaluates the same per-trajectory losses at *other* LoRA parameter values through
  ``torch.func.functional_call``, which is how the hypergradient probes θ ± εv without touching the live
  parameters (an in-place perturbation would invalidate tensors saved for the pending backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100


@dataclass
class TrajectoryOutput:
    """Per-trajectory results of one policy forward.

    Attributes:
        loss: [B] token-mean NLL over each trajectory's agent tokens (carries the graph when grad is enabled).
        surprise: [B] detached mean NLL of the observation (user/tool) tokens; 0 where a row has none.
        pooled: [B, H] detached mean of the last hidden state over the row's tokens.
        correct: [B] detached number of agent tokens predicted exactly (argmax), for token accuracy.
    """

    loss: Tensor
    surprise: Tensor
    pooled: Tensor
    correct: Tensor


class PolicyModel(nn.Module):
    """An HF causal language model with LoRA adapters (PEFT), the inner-level learner of BOOST.

    Args:
        model_name_or_path: HF hub name or local directory of a causal LM. Mutually exclusive with ``config``.
        config: Config dict of a randomly initialised model (``model_type`` plus that architecture's fields),
            for tiny models in tests and the embedded quickstart.
        r: LoRA rank (PEFT ``LoraConfig.r``).
        lora_alpha: LoRA scaling numerator (PEFT ``LoraConfig.lora_alpha``).
        lora_dropout: LoRA dropout. Defaults to 0 because the finite-difference hypergradient compares two
            forwards of the same batch; dropout noise would swamp the difference.
        target_modules: Module names that get adapters (PEFT ``LoraConfig.target_modules``), or ``all-linear``.
        modules_to_save: Modules trained in full next to the adapters (PEFT ``LoraConfig.modules_to_save``),
            e.g. ``[embed_tokens, lm_head]`` for a randomly initialised model learning a new vocabulary.
        attn_implementation: ``sdpa`` (default; works with the first-order hypergradient), ``eager`` (needed by
            the exact hypergradient, which differentiates twice) or ``flash_attention_2``.
        dtype: Parameter dtype of the base model: ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: Allow code shipped with a hub model to run. Off unless set explicitly.
        gradient_checkpointing: Recompute activations in the backward to save memory on long trajectories.
        seed: Seed for the random initialisation of ``config`` models and the LoRA matrices.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict | None = None,
        r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str = "all-linear",
        modules_to_save: list[str] | None = None,
        attn_implementation: str = "sdpa",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        if (model_name_or_path is None) == (config is None):
            raise ValueError("PolicyModel needs exactly one of `model_name_or_path` or `config`.")
        torch_dtype = _DTYPES.get(dtype)
        if torch_dtype is None:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        with _fork_rng(seed):
            if config is not None:
                cfg = dict(config)
                model_type = cfg.pop("model_type", None)
                if model_type is None:
                    raise ValueError("`config` needs a `model_type` entry (e.g. 'llama').")
                hf_config = AutoConfig.for_model(model_type, **cfg)
                base = AutoModelForCausalLM.from_config(
                    hf_config, attn_implementation=attn_implementation, dtype=torch_dtype
                )
            else:
                from boost_lightning.models.pretrained import resolve_model_path

                base = AutoModelForCausalLM.from_pretrained(
                    resolve_model_path(model_name_or_path),
                    attn_implementation=attn_implementation,
                    dtype=torch_dtype,
                    trust_remote_code=trust_remote_code,
                )
            if gradient_checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                base.enable_input_require_grads()
            lora = LoraConfig(
                r=r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=target_modules,
                modules_to_save=modules_to_save,
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, lora)
        self.attn_implementation = attn_implementation
        self.hidden_size = int(base.config.hidden_size)
        self.vocab_size = int(base.get_output_embeddings().weight.shape[0])

    # -- parameters -------------------------------------------------------------------------------------------
    def trainable_named_parameters(self) -> dict[str, Tensor]:
        """The LoRA parameters (the only ones the inner level trains), by name relative to ``self.model``."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # -- forward ----------------------------------------------------------------------------------------------
    def trajectory_forward(
        self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None, aux: bool = True
    ) -> TrajectoryOutput:
        """Per-trajectory agent NLL, observation surprise and pooled state for a collated batch.

        Args:
            batch: Collated batch with ``input_ids``, ``attention_mask``, ``labels`` and ``obs_mask``.
            params: Optional replacement values for (some of) the LoRA parameters, evaluated functionally.
            aux: Also compute surprise, pooled state and accuracy. Without it only agent positions reach the LM
                head (the hypergradient's probes need the loss alone); the other fields are then empty.
        """
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

        batch_size = input_ids.shape[0]
        agent_count = agent.sum(1).clamp(min=1).to(nll.dtype)
        loss = torch.zeros(batch_size, dtype=nll.dtype, device=nll.device).index_add(
            0, rows[is_agent], nll[is_agent]
        ) / agent_count
        if not aux:
            empty = loss.new_zeros(0)
            return TrajectoryOutput(loss=loss, surprise=empty, pooled=empty, correct=empty)
        with torch.no_grad():
            obs_count = obs.sum(1).clamp(min=1).to(nll.dtype)
            surprise = torch.zeros_like(loss).index_add(0, rows[~is_agent], nll[~is_agent].detach()) / obs_count
            hit = (logits.argmax(-1) == tokens) & is_agent
            correct = torch.zeros_like(loss).index_add(0, rows, hit.to(loss.dtype))
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()
        return TrajectoryOutput(loss=loss, surprise=surprise, pooled=pooled.detach(), correct=correct)

    def functional_losses(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Tensor:
        """Per-trajectory agent NLL [B] with the LoRA parameters replaced by ``params`` (no live parameter moves)."""
        return self.trajectory_forward(batch, params, aux=False).loss

    def generate(self, *args, **kwargs):
        """``generate`` of the wrapped HF model (used by rollout evaluation)."""
        return self.model.generate(*args, **kwargs)

    # -- internals ----------------------------------------------------------------------------------------------
    def _last_hidden(self, input_ids: Tensor, attention_mask: Tensor, params: Mapping[str, Tensor] | None) -> Tensor:
        decoder = self.model.get_base_model().get_decoder()
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if params is None:
            return decoder(**kwargs).last_hidden_state
        # Names in `params` are relative to self.model; the decoder is a submodule, so we call the whole PEFT
        # model functionally and ask for hidden states only from the decoder path.
        prefix = _module_prefix(self.model, decoder)
        sub = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        return torch.func.functional_call(decoder, sub, (), kwargs, strict=False).last_hidden_state

    def _lm_head(self, hidden: Tensor, params: Mapping[str, Tensor] | None) -> Tensor:
        head = self.model.get_base_model().get_output_embeddings()
        if params is None:
            return head(hidden)
        prefix = _module_prefix(self.model, head)
        sub = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
        if not sub:
            return head(hidden)
        return torch.func.functional_call(head, sub, (hidden,), strict=False)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _module_prefix(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("module not found under root")


@contextlib.contextmanager
def _fork_rng(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
