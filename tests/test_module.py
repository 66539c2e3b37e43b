"""BoostModule on a tiny LoRA Llama: which parameters each level moves, SFT equivalence, faults, resume."""


import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel.hypergradient import HypergradientOptions
from boost_lightning.models import PolicyModel, WeightHead
from boost_lightning.module import BoostModule, FaultLimitError
from boost_lightning.weightings import Learned


def snapshot(module):
    module.configure_model()  # builds the reference adapter (the default head reads it) before the copy
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def test_inner_step_moves_only_lora_and_outer_step_moves_only_head(make_module, fit_module, make_items):
    module = make_module(head_warmup_steps=100)  # no outer step
    before = snapshot(module)
    fit_module(module, make_items(steps=2))
    moved = changed(before, module)
    assert moved and all("lora_" in n for n in moved), moved  # the policy's LoRA and the reference adapter's copy
    assert any(n.startswith("reference.") for n in moved) and any(n.startswith("policy.") for n in moved), moved
    assert module.inner_steps == 2 and module.outer_steps == 0

    module = make_module(hypergradient=HypergradientOptions(lookahead_lr=0.1),
                         policy_optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    before = snapshot(module)
    fit_module(module, make_items(steps=2))
    moved = changed(before, module)
    assert moved and all(n.startswith("weighting.head.") for n in moved), moved
    assert module.outer_steps == 2


def test_both_levels_move_their_own_parameters_in_a_normal_run(make_module, fit_module, make_items):
    module = make_module()
    before = snapshot(module)
    fit_module(module, make_items(steps=3))
    moved = changed(before, module)
    assert any(n.startswith("weighting.head.") for n in moved)
    assert any(n.startswith("policy.") and "lora_" in n for n in moved)
    assert any(n.startswith("reference.") for n in moved)
    frozen = [n for n in before if n.startswith("policy.") and "lora_" not in n]
    assert frozen and not (set(frozen) & moved)


def test_zero_init_head_equals_uniform_sft_bit_for_bit_on_first_step(make_module, fit_module, make_items):
    data = make_items(steps=1)
    learned = make_module(weighting="learned")
    uniform = make_module(weighting="uniform")
    fit_module(learned, data)
    fit_module(uniform, data)
    for (n, a), (_, b) in zip(learned.policy.named_parameters(), uniform.policy.named_parameters()):
        assert torch.equal(a, b), n


def test_consecutive_faults_stop_the_run_with_a_clear_error(make_module, fit_module, make_items):
    # An infinite learning rate makes every later forward non-finite: each inner step is a fault.
    module = make_module(max_consecutive_faults=2,
                         policy_optimizer=lambda p: torch.optim.SGD(p, lr=float("inf")))
    with pytest.raises(FaultLimitError, match="consecutive steps skipped"):
        fit_module(module, make_items(steps=5))


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, make_module, fit_module, make_items):
    from lightning.pytorch.callbacks import ModelCheckpoint

    adam = dict(policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                head_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))

    full = make_module(**adam)
    fit_module(full, make_items(steps=3), max_epochs=2)

    first = make_module(**adam)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", callbacks=[ckpt])
    trainer.fit(first, train_dataloaders=DataLoader(make_items(steps=3), batch_size=None))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert all(k.startswith("weighting.") or "lora_" in k for k in saved["state_dict"]), "frozen base saved"
    # The policy's LoRA tensors and the reference adapter's copy of them (the default head reads the reference).
    policy_keys = [k for k in saved["state_dict"] if k.startswith("policy.")]
    assert len(policy_keys) == len(first.policy.trainable_named_parameters()) == len(first.reference.tensors)
    assert sum(k.startswith("reference.") for k in saved["state_dict"]) == len(first.reference.tensors)
    assert len(saved["optimizer_states"]) == 3
    assert saved["boost"]["inner_steps"] == 3

    resumed = make_module(**adam)
    fit_module(resumed, make_items(steps=3), max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert (resumed.inner_steps, resumed.outer_steps) == (full.inner_steps, full.outer_steps) == (6, 6)
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    for (n, a), (_, b) in zip(full.named_buffers(), resumed.named_buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("weighting", ["learned", "return_filter"])
def test_micro_batch_split_gives_the_same_run(weighting, make_module, fit_module, make_items, assert_same_runs):
    data = make_items(steps=3, batch_size=8)
    runs = []
    for micro in (None, 4, 1):
        # Raw hypergradient: its unit-RMS normalisation would scale fp32 finite-difference rounding (~1e-7 of the
        # loss) up to O(1) head steps under this test's SGD lr of 1, and the comparison is at 1e-6.
        module = make_module(weighting=weighting, micro_batch_size=micro,
                             hypergradient=HypergradientOptions(normalize=False))
        fit_module(module, data)
        runs.append(module)
    assert_same_runs(runs)


def test_inner_gradient_accumulation_equals_one_big_batch(tiny_llama_config, make_module, fit_module):
    vocab = tiny_llama_config["vocab_size"]
    big = random_batch(vocab, 8, seed=0)
    halves = [{k: v[i : i + 4] for k, v in big.items()} for i in (0, 4)]
    outer = random_batch(vocab, 4, seed=9)
    one = make_module(weighting="uniform")
    fit_module(one, DataLoader([{"inner": big, "outer": outer}], batch_size=None))
    two = make_module(weighting="uniform", inner_accumulate_grad_batches=2)
    fit_module(two, DataLoader([{"inner": h, "outer": outer} for h in halves], batch_size=None))
    assert one.inner_steps == two.inner_steps == 1
    for (n, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_tradeoff_scalars_are_logged_and_match_the_batch(make_module, fit_module, make_items):
    # Uniform weights: the weighted risk is the plain mean NLL and the ESS is the batch size.
    module = make_module(weighting="uniform")
    trainer = fit_module(module, make_items(steps=1, batch_size=6))
    metrics = trainer.logged_metrics
    assert metrics["tradeoff/ess"].item() == pytest.approx(6.0)
    assert metrics["tradeoff/weighted_risk"].item() == pytest.approx(metrics["inner/nll"].item(), rel=1e-6)
    assert metrics["tradeoff/task_shift"].item() >= 0.0


def test_hypergradient_normalisation_only_rescales_the_head_gradient(make_module, fit_module, make_items):
    # One outer step with plain SGD and no clipping: the normalised run's head update is the raw run's times one
    # scalar, 1 / (B · rms(g)), the same for every head parameter.
    deltas = []
    for normalize in (False, True):
        module = make_module(head_grad_clip=None,
                             hypergradient=HypergradientOptions(lookahead_lr=0.1, normalize=normalize),
                             policy_optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
        before = snapshot(module)
        fit_module(module, make_items(steps=1, batch_size=6))
        deltas.append(torch.cat([(p.detach() - before[n]).flatten() for n, p in module.named_parameters()
                                 if n.startswith("weighting.head.")]))
    raw, normalized = deltas
    moved = raw.abs() > raw.abs().max() * 1e-2
    ratio = normalized[moved] / raw[moved]
    assert moved.sum() > 10 and ratio.min() > 0
    torch.testing.assert_close(ratio, ratio.median().expand_as(ratio), rtol=1e-3, atol=0)


def test_adam_preconditioned_hypergradient_uses_the_policy_optimizers_second_moments(make_module, fit_module,
                                                                                     make_items):
    adam = lambda p: torch.optim.AdamW(p, lr=1e-2)  # noqa: E731
    runs = {}
    for pre in ("none", "adam"):
        module = make_module(hypergradient=HypergradientOptions(preconditioner=pre),
                             policy_optimizer=adam)
        fit_module(module, make_items(steps=3))
        runs[pre] = torch.cat([p.detach().flatten() for n, p in module.named_parameters()
                               if n.startswith("weighting.head.")])
        assert module.outer_steps == 3
    # Step 1 has no second moments yet (P = I, identical); from step 2 on the probe direction differs. With SGD
    # (make_module's default elsewhere) there are no second moments and ``adam`` is the identity.
    assert not torch.allclose(runs["none"], runs["adam"])
    with pytest.raises(ValueError, match="preconditioner"):
        HypergradientOptions(preconditioner="rmsprop")


def test_reweight_synthetic_trains_the_head_and_keeps_real_rows_at_weight_one(tiny_llama_config, fit_module,
                                                                              make_items):
    class Record(Callback):
        def __init__(self):
            self.outputs = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.outputs.append((outputs["weights"], outputs["is_synthetic"].bool()))

    policy = PolicyModel(config=tiny_llama_config, r=4, lora_alpha=8, seed=0)
    module = BoostModule(policy, Learned(WeightHead(reweight="synthetic")), head_grad_clip=None,
                         policy_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                         head_optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    before, record = snapshot(module), Record()
    fit_module(module, make_items(steps=4, batch_size=6), callbacks=[record])
    assert any(n.startswith("weighting.head.") for n in changed(before, module))
    later = record.outputs[1:]  # the first batch is uniform (zero-initialised head)
    assert any((w[s] - 1).abs().max() > 1e-6 for w, s in later)
    for w, s in record.outputs:
        assert (~s).any() and s.any()
        torch.testing.assert_close(w[~s], torch.ones_like(w[~s]))
        torch.testing.assert_close(w[s].mean(), torch.tensor(1.0))
