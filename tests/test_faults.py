"""Fault injection (a non-finite reward, inner loss, gradient or hypergradient skips that step and changes nothing),
the consecutive-fault limit, and invariance of the weighted loss and the hypergradient to batching and padding."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Callback

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel import policy as bilevel_policy
from boost_lightning.bilevel.hypergradient import Hypergradient, first_order_hypergradient
from boost_lightning.models import PolicyModel
from boost_lightning.module import FaultLimitError
from boost_lightning.objectives import weighted_loss

STEPS = 3
FAULTY = 1  # index of the batch that gets the fault


# Adam at both levels: its moment estimates and step counts are state a skipped step must not touch.
ADAM = {"policy_optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2),
        "head_optimizer": lambda p: torch.optim.Adam(p, lr=1e-2)}


def batches(vocab, steps=STEPS, size=4):
    return [{"inner": random_batch(vocab, size, seed=i), "outer": random_batch(vocab, size, seed=100 + i)}
            for i in range(steps)]


class Around(Callback):
    """Everything a step may change, just before and just after batch ``index``; optional injection hooks."""

    def __init__(self, index=FAULTY, before=None, after=None):
        self.index, self.inject, self.cleanup = index, before, after
        self.start = self.end = None
        self.logged = {}

    @staticmethod
    def _state(trainer, module):
        return (copy.deepcopy(module.state_dict()), [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
                (module.inner_steps, module.outer_steps))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.index:
            if self.inject is not None:
                self.inject(module)
            self.start = self._state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            self.end = self._state(trainer, module)
            self.logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("faults/")}
            if self.cleanup is not None:
                self.cleanup(module)


def assert_unchanged(spy):
    (params0, opts0, counters0), (params1, opts1, counters1) = spy.start, spy.end
    assert counters0 == counters1
    for name in params0:  # LoRA, head and the head's running feature statistics
        assert torch.equal(params0[name], params1[name]), name
    for before, after in zip(opts0, opts1):
        assert before["param_groups"] == after["param_groups"]
        assert before["state"].keys() == after["state"].keys()
        for index, values in before["state"].items():  # exp_avg, exp_avg_sq, step
            for key, value in values.items():
                assert torch.equal(value, after["state"][index][key]), (index, key)


def nan_reward(items, module):
    items[FAULTY]["inner"]["reward"][0] = float("nan")


def huge_reward(items, module):
    # exp(β·R) of the reward-weighted objective overflows: the inner loss is inf with finite (uniform) weights.
    items[FAULTY]["inner"]["reward"][:] = torch.tensor([0.0, 1e30, -1e30, float("inf")])


def _hook(select):
    handles = []

    def inject(module):
        params = [p for n, p in module.named_parameters() if select(n) and p.requires_grad]
        handles.append(params[0].register_hook(lambda g: torch.full_like(g, float("nan"))))

    def cleanup(module):
        while handles:
            handles.pop().remove()

    return inject, cleanup


def nan_hypergradient(module):
    # Poison what the estimator returns; the module's own check must catch it.
    real = first_order_hypergradient

    def broken(*args, **kwargs):
        hg = real(*args, **kwargs)
        return Hypergradient(hg.grad_weights * float("nan"), hg.val_loss, hg.v_norm, hg.directional)

    bilevel_policy.first_order_hypergradient = broken


def restore_hypergradient(module):
    bilevel_policy.first_order_hypergradient = first_order_hypergradient


CASES = {
    # name: (module kwargs, batch edit, injection before the batch, cleanup after it, fault kind)
    "nan_reward": ({}, nan_reward, None, None, "weights"),
    "inf_inner_loss": ({"weighting": "uniform", "objective": "rwr"}, huge_reward, None, None,
                       "inner_loss"),
    "nan_policy_grad": ({}, None, *_hook(lambda n: "lora_" in n), "grad"),
    "nan_hypergradient": ({}, None, nan_hypergradient, restore_hypergradient, "hypergrad"),
    "nan_head_grad": ({}, None, *_hook(lambda n: n.startswith("weighting.head.")), "hypergrad"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_fault_skips_the_step_counts_it_and_changes_nothing(tiny_llama_config, case, make_module, fit_module):
    kwargs, edit, inject, cleanup, kind = CASES[case]
    module = make_module(**{**ADAM, **kwargs})
    items = batches(tiny_llama_config["vocab_size"])
    if edit is not None:
        edit(items, module)
    spy = Around(before=inject, after=cleanup)
    fit_module(module, items, [spy])

    assert_unchanged(spy)  # neither level moved: LoRA, head, feature statistics, optimizer states, counters
    assert module.faults[kind] == 1 and sum(module.faults.values()) == 1, module.faults
    assert spy.logged == {f"faults/{kind}": 1.0}
    # The steps around it ran normally and the consecutive count was reset by the next good step.
    assert module.inner_steps == STEPS - 1
    assert module.guard.consecutive == 0
    if module.weighting.learns:
        assert module.outer_steps == STEPS - 1


def test_k_consecutive_faults_stop_the_run_with_a_clear_error(tiny_llama_config, make_module, fit_module):
    module = make_module(**ADAM, max_consecutive_faults=3)
    items = batches(tiny_llama_config["vocab_size"], steps=5)
    for item in items[1:]:
        item["inner"]["reward"][0] = float("nan")
    with pytest.raises(FaultLimitError, match=r"3 consecutive steps skipped .*last: weights.*rewards"):
        fit_module(module, items)
    assert module.inner_steps == 1 and module.faults["weights"] == 3


def test_isolated_faults_do_not_add_up_to_the_limit(tiny_llama_config, make_module, fit_module):
    module = make_module(**ADAM, max_consecutive_faults=2)
    items = batches(tiny_llama_config["vocab_size"], steps=5)
    for item in items[::2]:  # faults at 0, 2, 4 with good steps between
        item["inner"]["reward"][0] = float("nan")
    fit_module(module, items)
    assert module.faults["weights"] == 3 and module.inner_steps == 2


# -- invariance -------------------------------------------------------------------------------------------------------
def _split(batch, size):
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, batch["input_ids"].shape[0], size)]


def _repad(batch, pad_id, extra=0, left=False):
    """The same rows padded ``extra`` columns longer, on the right or the left."""
    lengths = batch["attention_mask"].sum(1)
    width = batch["input_ids"].shape[1] + extra
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "turn_ids": -1, "obs_mask": False}
    out = dict(batch)
    for name, pad in pads.items():
        if name not in batch:
            continue
        value = torch.full((batch[name].shape[0], width), pad, dtype=batch[name].dtype)
        for i, n in enumerate(lengths.tolist()):
            if left:
                value[i, width - n :] = batch[name][i, :n]
            else:
                value[i, :n] = batch[name][i, :n]
        out[name] = value
    return out


@pytest.fixture()
def problem(tiny_policy, tiny_llama_config):
    vocab = tiny_llama_config["vocab_size"]
    inner, outer = random_batch(vocab, 8, seed=3), random_batch(vocab, 8, seed=4)
    weights = torch.rand(8, generator=torch.Generator().manual_seed(0)) * 2
    return tiny_policy, inner, outer, weights, tiny_llama_config["pad_token_id"]


def _loss_and_hypergradient(policy, inners, outers, weights):
    """Σwℓ/Σw and ∂L_val/∂w with the inner batch forwarded in ``inners`` chunks and the validation batch in
    ``outers`` chunks (row-count weighted mean)."""
    params = policy.trainable_named_parameters()
    total = weights.sum()
    losses = torch.cat([policy.trajectory_forward(chunk).loss for chunk in inners])
    loss = sum(weighted_loss(losses[i : i + len(c["input_ids"])], weights[i : i + len(c["input_ids"])], total)
               for i, c in zip(range(0, 8, len(inners[0]["input_ids"])), inners))
    rows = sum(len(c["input_ids"]) for c in outers)

    def inner_fn(p):
        return torch.cat([policy.functional_losses(c, p) for c in inners])

    def val_fn(p):
        return sum(policy.functional_losses(c, p).sum() for c in outers) / rows

    hg = first_order_hypergradient(params, inner_fn, val_fn, lr=0.1, base_losses=losses.detach())
    return loss.detach(), hg


def test_weighted_loss_and_hypergradient_do_not_depend_on_micro_batch_split(problem):
    policy, inner, outer, weights, _ = problem
    reference = _loss_and_hypergradient(policy, [inner], [outer], weights)
    for size in (4, 1):
        loss, hg = _loss_and_hypergradient(policy, _split(inner, size), _split(outer, size), weights)
        torch.testing.assert_close(loss, reference[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(hg.grad_weights, reference[1].grad_weights, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(hg.val_loss, reference[1].val_loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("left, extra", [(False, 7), (True, 0), (True, 5)], ids=["right+7", "left", "left+5"])
def test_weighted_loss_and_hypergradient_do_not_depend_on_padding(problem, left, extra):
    policy, inner, outer, weights, pad = problem
    reference = _loss_and_hypergradient(policy, [inner], [outer], weights)
    loss, hg = _loss_and_hypergradient(policy, [_repad(inner, pad, extra, left)], [_repad(outer, pad, extra, left)],
                                       weights)
    torch.testing.assert_close(loss, reference[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(hg.grad_weights, reference[1].grad_weights, rtol=1e-3, atol=1e-5)


def test_uniform_weights_reproduce_plain_sft_over_several_steps(tiny_llama_config, make_module, fit_module):
    """BoostModule with ``weighting=uniform`` is LoRA SFT: the same updates as a hand-written mean-NLL loop."""
    items = batches(tiny_llama_config["vocab_size"], steps=3)
    module = make_module("uniform", policy_grad_clip=None, policy_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    fit_module(module, items)

    plain = PolicyModel(config=tiny_llama_config, r=4, lora_alpha=8, seed=0)
    params = list(plain.trainable_named_parameters().values())
    opt = torch.optim.SGD(params, lr=0.1)
    for item in items:
        opt.zero_grad()
        plain.trajectory_forward(item["inner"]).loss.mean().backward()
        opt.step()
    for (name, a), b in zip(module.policy.trainable_named_parameters().items(), params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
