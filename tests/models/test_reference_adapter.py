"""The reference adapter behind the ``excess_loss`` / ``reference_surprise`` head features: a second set of the
policy's LoRA tensors on the same frozen base, trained alongside the policy on the agent and observation tokens of
trusted rows only (the inner batch's real rows and the validation batch).

Expected values come from a second, independently built policy whose LoRA tensors are set to the reference's and
whose losses are taken with a plain forward, not through the functional path the module uses.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel.hypergradient import HypergradientOptions
from boost_lightning.models import PolicyModel, WeightHead
from boost_lightning.models.features import REFERENCE_FEATURES
from boost_lightning.module import BoostModule
from boost_lightning.weightings import Learned

FEATURES = ("hidden", "loss", "surprise", "reward", "source", "length", "turns", "excess_loss", "reference_surprise")


def reference_module(tiny_llama_config, features=FEATURES, **kwargs) -> BoostModule:
    """A module whose head reads the reference features; plain SGD at both levels (and for the reference)."""
    kwargs.setdefault("policy_optimizer", lambda p: torch.optim.SGD(p, lr=0.1))
    kwargs.setdefault("head_optimizer", lambda p: torch.optim.SGD(p, lr=1.0))
    kwargs.setdefault("policy_grad_clip", None)
    policy = PolicyModel(config=tiny_llama_config, r=4, lora_alpha=8, seed=0)
    return BoostModule(policy, Learned(WeightHead(features=features, seed=0)), **kwargs)


def policy_at(tiny_llama_config, tensors: dict[str, torch.Tensor]) -> PolicyModel:
    """A separately built policy (same base) whose trainable tensors are ``tensors``."""
    policy = PolicyModel(config=tiny_llama_config, r=4, lora_alpha=8, seed=0)
    with torch.no_grad():
        for name, p in policy.trainable_named_parameters().items():
            p.copy_(tensors[name])
    return policy


def modelled_tokens_nll(policy: PolicyModel, batch: dict) -> torch.Tensor:
    """[B] mean NLL of each row's agent and observation tokens, from the whole model's logits (with graph)."""
    logits = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["input_ids"][:, 1:],
                                            reduction="none")
    keep = ((batch["labels"][:, 1:] != -100) | batch["obs_mask"][:, 1:].bool()) & (batch["attention_mask"][:, 1:] > 0)
    return (nll * keep).sum(1) / keep.sum(1)


def item(vocab: int, seed: int = 0, batch_size: int = 4) -> dict:
    return {"inner": random_batch(vocab, batch_size, seed=seed),
            "outer": random_batch(vocab, batch_size, seed=100 + seed)}


class Inputs(Callback):
    """The head's inputs of every training batch, read before the step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with torch.no_grad():
            out = module.policy.trajectory_forward(batch["inner"])
            out = module._with_reference(batch["inner"], out)
        self.seen.append(out)


def test_only_a_head_that_reads_reference_features_gets_a_reference(tiny_llama_config, make_module, fit_module):
    default = make_module()  # the default head reads both reference features
    fit_module(default, [item(default.policy.vocab_size)])
    assert default.reference is not None and len(default.trainer.optimizers) == 3
    plain = reference_module(tiny_llama_config, features=("hidden", "loss", "surprise", "reward", "source"))
    fit_module(plain, [item(plain.policy.vocab_size)])
    assert plain.reference is None and not plain.weighting.needs_reference
    assert len(plain.trainer.optimizers) == 2
    for feature in REFERENCE_FEATURES:
        module = reference_module(tiny_llama_config, features=("loss", feature))
        fit_module(module, [item(module.policy.vocab_size)])
        assert module.reference is not None and len(module.trainer.optimizers) == 3
        assert module.weighting.input_names == ("loss", feature)


def test_features_are_zero_excess_at_the_shared_start_and_match_a_separate_model_after(tiny_llama_config):
    module = reference_module(tiny_llama_config)
    module.configure_model()
    batch = random_batch(module.policy.vocab_size, 4, seed=3)
    with torch.no_grad():
        out = module._with_reference(batch, module.policy.trajectory_forward(batch))
    # The reference starts as a copy of the policy's tensors: no excess, the policy's own surprise.
    assert torch.equal(out.excess_loss, torch.zeros(4))
    torch.testing.assert_close(out.reference_surprise, out.surprise, rtol=0, atol=1e-6)

    # Move the reference away; the features are then those of a model built at its tensors.
    with torch.no_grad():
        for p in module.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        out = module._with_reference(batch, module.policy.trajectory_forward(batch))
        expected = policy_at(tiny_llama_config, {k: v.detach() for k, v in module.reference.params().items()})
        ref = expected.trajectory_forward(batch)
    torch.testing.assert_close(out.excess_loss, out.loss - ref.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.reference_surprise, ref.surprise, rtol=0, atol=1e-5)
    assert out.excess_loss.abs().min() > 1e-4


@pytest.mark.parametrize("validation_rows", [None, 1])
def test_reference_step_is_plain_sgd_on_the_trusted_rows_only(tiny_llama_config, fit_module, validation_rows):
    module = reference_module(tiny_llama_config, reference_batch_size=validation_rows)
    vocab = module.policy.vocab_size
    step = item(vocab, seed=5)
    start = {k: v.detach().clone() for k, v in module.policy.trainable_named_parameters().items()}
    fit_module(module, [step])

    # By hand: one SGD step (lr 0.1) on the mean NLL of the agent and observation tokens of the inner batch's real
    # rows and the validation batch (its first `reference_batch_size` rows), from a plain forward of the whole model.
    hand = policy_at(tiny_llama_config, start)
    real = ~step["inner"]["is_synthetic"].bool()
    rows = slice(0, validation_rows)
    trusted = [{k: v[real] for k, v in step["inner"].items() if isinstance(v, torch.Tensor)},
               {k: v[rows] for k, v in step["outer"].items() if isinstance(v, torch.Tensor)}]
    losses = torch.cat([modelled_tokens_nll(hand, b) for b in trusted])
    params = hand.trainable_named_parameters()
    grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), grads):
        expected = p.detach() - 0.1 * (g if g is not None else torch.zeros_like(p))
        torch.testing.assert_close(module.reference.params()[name].detach(), expected, rtol=0, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")

    # The synthetic rows never reach it: other synthetic rows, the same reference step.
    other = copy.deepcopy(step)
    synthetic = other["inner"]["is_synthetic"].bool()
    other["inner"]["input_ids"][synthetic] = random_batch(vocab, 4, seed=77)["input_ids"][synthetic]
    again = reference_module(tiny_llama_config, reference_batch_size=validation_rows)
    fit_module(again, [other])
    for name, p in module.reference.params().items():
        torch.testing.assert_close(again.reference.params()[name], p, rtol=0, atol=1e-6)


def test_every_level_moves_and_the_frozen_base_does_not(tiny_llama_config, fit_module):
    module = reference_module(tiny_llama_config, policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                              head_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    module.configure_model()  # builds the reference (the Trainer calls it the same way)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    record = Inputs()
    fit_module(module, [item(module.policy.vocab_size, seed=s) for s in range(4)], callbacks=[record])
    after = dict(module.named_parameters())
    for prefix in ("policy.", "weighting.", "reference."):
        trained = [n for n in before if n.startswith(prefix) and n not in frozen]
        assert trained and any(not torch.equal(before[n], after[n]) for n in trained), prefix
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    # From the second step on the two adapters differ, and the features say so.
    assert all(o.excess_loss.abs().max() > 0 for o in record.seen[1:])
    # The reference never trains on the policy's tensors: it keeps its own copies.
    policy = module.policy.trainable_named_parameters()
    assert all(p is not policy[n] for n, p in module.reference.params().items())


def test_micro_batches_give_the_same_run(tiny_llama_config, fit_module, assert_same_runs):
    items = [item(tiny_llama_config["vocab_size"], seed=s, batch_size=6) for s in range(3)]
    runs = []
    for micro in (None, 2):
        module = reference_module(tiny_llama_config, micro_batch_size=micro,
                                  hypergradient=HypergradientOptions(normalize=False))
        fit_module(module, items)
        runs.append(module)
    assert_same_runs(runs)


def test_a_skipped_step_leaves_the_reference_unchanged(tiny_llama_config, fit_module):
    module = reference_module(tiny_llama_config)
    bad = item(module.policy.vocab_size)
    bad["inner"]["reward"][0] = float("nan")  # a non-finite head input: the step is undone
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.reference.named_parameters()}
    fit_module(module, [bad])
    assert module.faults["weights"] == 1 and module.inner_steps == 0
    for n, p in module.reference.named_parameters():
        assert torch.equal(p, before[n]), n


def test_checkpoint_resume_equals_the_uninterrupted_run(tmp_path, tiny_llama_config, fit_module, assert_same_runs):
    from lightning.pytorch.callbacks import ModelCheckpoint

    items = [item(tiny_llama_config["vocab_size"], seed=s) for s in range(4)]
    whole = reference_module(tiny_llama_config, policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    fit_module(whole, items, max_epochs=2)

    first = reference_module(tiny_llama_config, policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    save = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    fit_module(first, items, max_epochs=1, callbacks=[save], enable_checkpointing=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert any(k.startswith("reference.") for k in ckpt["state_dict"]) and len(ckpt["optimizer_states"]) == 3
    resumed = reference_module(tiny_llama_config, policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    fit_module(resumed, items, max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert_same_runs([whole, resumed], atol=1e-6)

    # Loading outside a Trainer builds the reference before its tensors arrive.
    loaded = BoostModule.load_from_checkpoint(tmp_path / "last.ckpt", policy=PolicyModel(
        config=tiny_llama_config, r=4, lora_alpha=8, seed=0), weighting=Learned(WeightHead(features=FEATURES, seed=0)))
    for n, p in first.reference.named_parameters():
        assert torch.equal(dict(loaded.reference.named_parameters())[n], p), n


def test_predict_writes_the_reference_features(tmp_path, tiny_llama_config, make_row, write_jsonl, tiny_tokenizer):
    from boost_lightning.callbacks import TrajectoryWeightWriter
    from boost_lightning.data import BoostDataModule

    real = [make_row(i, source="real") for i in range(3)]
    synthetic = [make_row(100 + i) for i in range(5)]
    validation = [make_row(200 + i) for i in range(2)]
    dm = BoostDataModule(real=write_jsonl("real.jsonl", real), synthetic=write_jsonl("syn.jsonl", synthetic),
                         validation=write_jsonl("val.jsonl", validation), tokenizer=tiny_tokenizer, batch_size=4,
                         max_length=128, predict="train", cache_dir=str(tmp_path / "cache"))
    module = reference_module(tiny_llama_config)
    path = tmp_path / "weights.jsonl"
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[TrajectoryWeightWriter(output_path=str(path))]).predict(module, datamodule=dm,
                                                                                return_predictions=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:
        assert set(REFERENCE_FEATURES) <= set(row["features"])
        assert row["features"]["excess_loss"] == pytest.approx(0.0, abs=1e-6)  # untrained: the same tensors


def test_command_line_reference_features_fit_and_log_the_reference_loss(tmp_path, make_row, write_jsonl,
                                                                        tiny_cli_config):
    from boost_lightning.cli import cli_main

    config = tiny_cli_config(
        data={"real": write_jsonl("real.jsonl", [make_row(i, source="real") for i in range(4)]),
              "synthetic": write_jsonl("synthetic.jsonl", [make_row(100 + i) for i in range(8)]),
              "validation": write_jsonl("validation.jsonl", [make_row(200 + i) for i in range(4)])},
        trainer={"max_steps": 10, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                 "enable_model_summary": False},
        model={"max_inner_steps": 2})
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    cli = cli_main(["fit", "--config", "config.yaml",
                    "--model.weighting.init_args.head.init_args.features=[hidden,loss,excess_loss,reference_surprise]"])
    assert cli.model.reference is not None and cli.model.inner_steps == 2
    assert "reference/loss" in cli.trainer.logged_metrics


class ReferenceSnapshots(Callback):
    """The reference's tensors after every training batch."""

    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append({n: p.detach().clone() for n, p in module.reference.named_parameters()})


@pytest.mark.parametrize("limit", [0, 2])
def test_reference_steps_train_the_reference_that_long_then_freeze_it(tiny_llama_config, fit_module, limit):
    items = [item(tiny_llama_config["vocab_size"], seed=s) for s in range(4)]
    always = reference_module(tiny_llama_config)
    seen_always = ReferenceSnapshots()
    fit_module(always, items, callbacks=[seen_always])
    frozen = reference_module(tiny_llama_config, reference_steps=limit)
    frozen.configure_model()
    start = {n: p.detach().clone() for n, p in frozen.reference.named_parameters()}
    seen = ReferenceSnapshots()
    fit_module(frozen, items, callbacks=[seen])

    # Up to the limit it is the same reference as one trained all run (the same steps on the same batches) ...
    for step in range(limit):
        for n, p in seen.after[step].items():
            torch.testing.assert_close(p, seen_always.after[step][n], rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    # ... and from then on it does not move, while the policy and the head still train and the features still read it.
    last = seen.after[limit - 1] if limit else start
    for snapshot in seen.after[limit:]:
        assert all(torch.equal(p, last[n]) for n, p in snapshot.items())
    assert any(not torch.equal(p, seen_always.after[-1][n]) for n, p in seen.after[-1].items())
    assert frozen.inner_steps == frozen.outer_steps == 4 and not frozen.reference_trains
    # Lightning's global_step counts optimizer steps: three per batch while the reference trains, two after.
    assert frozen.trainer.global_step == 3 * limit + 2 * (4 - limit)


def test_reference_options_refuse_bad_values(tiny_llama_config):
    with pytest.raises(ValueError, match="reference_steps must be >= 0"):
        reference_module(tiny_llama_config, reference_steps=-1)
    with pytest.raises(ValueError, match="reference_batch_size must be >= 1"):
        reference_module(tiny_llama_config, reference_batch_size=0)


def test_a_frozen_reference_resumes_frozen(tmp_path, tiny_llama_config, fit_module, assert_same_runs):
    from lightning.pytorch.callbacks import ModelCheckpoint

    items = [item(tiny_llama_config["vocab_size"], seed=s) for s in range(3)]
    whole = reference_module(tiny_llama_config, reference_steps=4)
    fit_module(whole, items, max_epochs=2)
    first = reference_module(tiny_llama_config, reference_steps=4)
    fit_module(first, items, max_epochs=1, enable_checkpointing=True,
               callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)])
    resumed = reference_module(tiny_llama_config, reference_steps=4)
    fit_module(resumed, items, max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert_same_runs([whole, resumed], atol=1e-6)
    for n, p in whole.reference.named_parameters():
        torch.testing.assert_close(dict(resumed.reference.named_parameters())[n], p, rtol=0, atol=1e-6)
