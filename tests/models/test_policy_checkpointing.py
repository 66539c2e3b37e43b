"""Gradient checkpointing and bf16-mixed precision on a tiny LoRA Llama: same gradients, same hypergradient."""

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel import HypergradientOptions, exact_hypergradient, first_order_hypergradient
from boost_lightning.models import PolicyModel, WeightHead
from boost_lightning.module import BoostModule
from boost_lightning.weightings import Learned


def make_policy(config, checkpointing, **kw):
    policy = PolicyModel(config=config, r=4, lora_alpha=8, seed=0, gradient_checkpointing=checkpointing, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in policy.trainable_named_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy.train()  # HF layers checkpoint only in train mode


def count_layer_forwards(policy):
    # The checkpoint wraps the layer's forward (not its __call__), so count a submodule the forward calls.
    mlp = policy.model.get_base_model().get_decoder().layers[0].mlp
    calls = []
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_checkpointing_recomputes_layers_and_gives_the_same_lora_gradients(tiny_llama_config):
    batch = random_batch(tiny_llama_config["vocab_size"], batch_size=4, seed=0)
    grads = {}
    for checkpointing in (False, True):
        policy = make_policy(tiny_llama_config, checkpointing)
        calls, handle = count_layer_forwards(policy)
        params = policy.trainable_named_parameters()
        loss = policy.trajectory_forward(batch).loss.mean()
        loss.backward()
        handle.remove()
        # The checkpointed layer's forward runs again inside the backward: proof that checkpointing is on.
        assert len(calls) == (2 if checkpointing else 1)
        grads[checkpointing] = {n: p.grad.clone() for n, p in params.items()}
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7)


def test_functional_forward_at_other_params_has_the_right_gradient_under_checkpointing(tiny_llama_config):
    # The recompute of a checkpointed layer would read the live parameters, not the functional ones: the policy
    # must run such a call without checkpointing (the exact hypergradient differentiates at θ − α∇L_in).
    batch = random_batch(tiny_llama_config["vocab_size"], batch_size=4, seed=0)
    grads = []
    for checkpointing in (False, True):
        policy = make_policy(tiny_llama_config, checkpointing)
        shifted = {n: (p + 0.1).detach().requires_grad_(True) for n, p in policy.trainable_named_parameters().items()}
        loss = policy.functional_losses(batch, shifted).mean()
        grads.append(torch.autograd.grad(loss, list(shifted.values())))
        layers = [m for m in policy.model.modules() if type(m).__name__.endswith("DecoderLayer")]
        assert all(m.gradient_checkpointing == checkpointing for m in layers)  # flags restored after the call
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["first_order", "exact"])
def test_hypergradient_is_the_same_with_and_without_checkpointing(tiny_llama_config, method):
    vocab = tiny_llama_config["vocab_size"]
    inner_batch, val_batch = random_batch(vocab, batch_size=6, seed=0), random_batch(vocab, batch_size=4, seed=1)
    results = []
    for checkpointing in (False, True):
        policy = make_policy(tiny_llama_config, checkpointing)
        params = policy.trainable_named_parameters()
        calls, handle = count_layer_forwards(policy)

        def inner(p, policy=policy):
            return policy.functional_losses(inner_batch, p)

        def val(p, policy=policy):
            return policy.functional_losses(val_batch, p).mean()

        if method == "first_order":
            base = policy.trajectory_forward(inner_batch).loss.detach()
            calls.clear()
            hg = first_order_hypergradient(params, inner, val, lr=1e-2, base_losses=base, eps=1e-2)
            # val forward + its recompute in the backward + one no-grad probe forward.
            assert len(calls) == (3 if checkpointing else 2)
        else:
            hg = exact_hypergradient(params, inner, val, torch.ones(6), lr=1e-2)
        handle.remove()
        results.append(hg)
    plain, ckpt = results
    scale = plain.grad_weights.abs().max().item()
    torch.testing.assert_close(ckpt.grad_weights, plain.grad_weights, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(ckpt.v_norm, plain.v_norm, rtol=1e-5, atol=0)
    assert plain.grad_weights.abs().max() > 0


def _loader(vocab, steps):
    items = [{"inner": random_batch(vocab, 4, seed=i), "outer": random_batch(vocab, 4, seed=100 + i)}
             for i in range(steps)]
    return DataLoader(items, batch_size=None)


@pytest.mark.parametrize("precision,checkpointing", [("32-true", True), ("bf16-mixed", False)])
def test_boost_steps_run_with_checkpointing_and_with_bf16_mixed_on_cpu(tiny_llama_config, precision, checkpointing):
    policy = make_policy(tiny_llama_config, checkpointing)
    module = BoostModule(policy, Learned(WeightHead()), policy_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                         head_optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                         hypergradient=HypergradientOptions(lookahead_lr=0.1))
    module.configure_model()  # the default head reads a reference adapter: build it before the copy
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", precision=precision)
    trainer.fit(module, train_dataloaders=_loader(policy.vocab_size, 3))
    assert module.inner_steps == 3 and module.outer_steps == 3
    assert sum(module.faults.values()) == 0, module.faults
    moved = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any("lora_" in n for n in moved) and any(n.startswith("weighting.head.") for n in moved), moved
    assert any(n.startswith("reference.") for n in moved), moved
    assert all("lora_" in n or n.startswith("weighting.head.") for n in moved), moved
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bf16_autocast_first_order_hypergradient_tracks_fp32(tiny_llama_config):
    # bf16-mixed runs the probe forwards in bf16; at the default ε the difference ℓ(θ+εv) − ℓ(θ) must still carry
    # the signal (cosine 0.97 with fp32 here).
    vocab = tiny_llama_config["vocab_size"]
    inner_batch, val_batch = random_batch(vocab, batch_size=8, seed=0), random_batch(vocab, batch_size=4, seed=1)
    policy = make_policy(tiny_llama_config, False)
    params = policy.trainable_named_parameters()
    results = []
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            base = policy.trajectory_forward(inner_batch).loss.detach()
            results.append(first_order_hypergradient(
                params, lambda p: policy.functional_losses(inner_batch, p),
                lambda p: policy.functional_losses(val_batch, p).mean(), lr=1e-2, base_losses=base, eps=1e-2,
                central=False).grad_weights)
    cosine = torch.nn.functional.cosine_similarity(results[0], results[1], dim=0)
    assert cosine > 0.9, cosine
