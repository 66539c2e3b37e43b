"""BoostModule paths beyond the default: accumulation at both levels, outer cadence with warm-up, every weighting and
objective, the exact and central-difference hypergradients, empty batches, and the setup checks."""

import pytest
import torch
from lightning.pytorch import Callback

from boost_lightning.bilevel.hypergradient import HypergradientOptions
from boost_lightning.objectives import OBJECTIVES
from boost_lightning.weightings import WEIGHTINGS


class StepLog(Callback):
    """(inner_steps, outer_steps) after every batch, and the head's parameters whenever they change."""

    def __init__(self):
        self.counters, self.head_changes = [], 0
        self._head = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.counters.append((module.inner_steps, module.outer_steps))
        head = torch.cat([p.detach().flatten().clone() for p in module.weighting.parameters()])
        if self._head is not None and not torch.equal(head, self._head):
            self.head_changes += 1
        self._head = head

    def on_train_start(self, trainer, module):
        self._head = torch.cat([p.detach().flatten().clone() for p in module.weighting.parameters()])


def test_inner_accumulation_steps_the_head_at_most_once_per_policy_step(make_module, fit_module, make_items):
    # 6 batches, 2 per policy step: 3 policy steps, each one due for the head, so exactly 3 head steps.
    log = StepLog()
    module = make_module(inner_accumulate_grad_batches=2)
    fit_module(module, make_items(steps=6), callbacks=[log])
    assert log.counters == [(0, 0), (1, 1), (1, 1), (2, 2), (2, 2), (3, 3)]
    assert log.head_changes == 3


def test_outer_cadence_counts_policy_steps_after_the_warmup(make_module, fit_module, make_items):
    # Policy steps 0..7; warm-up 2, then due where inner_steps % 3 == 0: at 3 and 6 → 2 head steps.
    log = StepLog()
    module = make_module(head_warmup_steps=2, outer_every_n_steps=3)
    fit_module(module, make_items(steps=8), callbacks=[log])
    assert module.inner_steps == 8 and module.outer_steps == 2
    outer_after = [outer for _, outer in log.counters]
    assert outer_after == [0, 0, 0, 1, 1, 1, 2, 2]
    # With inner accumulation the same cadence counts policy steps, not batches.
    module = make_module(head_warmup_steps=2, outer_every_n_steps=3, inner_accumulate_grad_batches=2)
    fit_module(module, make_items(steps=16))
    assert module.inner_steps == 8 and module.outer_steps == 2


def test_outer_accumulation_averages_due_steps_into_one_head_step(make_module, fit_module, make_items):
    log = StepLog()
    module = make_module(outer_accumulate_grad_batches=2)
    fit_module(module, make_items(steps=4), callbacks=[log])
    assert module.inner_steps == 4 and module.outer_steps == 2 and log.head_changes == 2
    assert [outer for _, outer in log.counters] == [0, 1, 1, 2]


def _moved(before, module, prefix):
    return any(not torch.equal(before[n], p.detach()) for n, p in module.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_every_weighting_trains_the_policy_and_only_learned_has_an_outer_level(weighting, make_module, fit_module,
                                                                               make_items):
    module = make_module(weighting, policy_optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    module.configure_model()  # the default learned head reads a reference adapter: built before the copy
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = fit_module(module, make_items(steps=3, batch_size=6))
    assert _moved(before, module, "policy.")
    assert (module.outer_steps > 0) == (weighting == "learned") == _moved(before, module, "weighting.")
    assert (module.reference is not None) == (weighting == "learned") == _moved(before, module, "reference.")
    assert len(trainer.optimizers) == (3 if weighting == "learned" else 1)
    assert module.inner_steps + module.empty_batches == 3 and sum(module.faults.values()) == 0


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_gives_the_loss_its_multiplier_says(objective, make_module, fit_module, make_items):
    items = make_items(steps=1, batch_size=6)
    module = make_module("uniform", objective=objective)
    trainer = fit_module(module, items)
    inner = items[0]["inner"]
    with torch.no_grad():
        nll = make_module("uniform").policy.trajectory_forward(inner).loss  # the same initial policy
    expected = (nll * module.objective.multiplier(inner["reward"])).mean()
    torch.testing.assert_close(trainer.logged_metrics["inner/loss"], expected, rtol=1e-5, atol=1e-6)


def _head_gradient(module_kwargs, make_module, items):
    module = make_module(**module_kwargs)
    inner, outer = items[0]["inner"], items[0]["outer"]
    # One outer update by hand through the module's own functions (no Trainer, no step): the head's gradient.
    module.configure_model()
    out = module._with_reference(inner, module.policy.trajectory_forward(inner))
    rows = module._gather_rows(out, inner)
    module.configure_optimizers()  # not used: lookahead_lr is given
    hypergrad = module._hypergradient(inner, outer, out, rows, module.weighting(rows.inputs))
    return hypergrad.grad_weights


def test_central_and_exact_hypergradients_agree_with_the_one_sided_default(make_module, make_items, monkeypatch):
    from boost_lightning.module import BoostModule

    monkeypatch.setattr(BoostModule, "_optimizers",
                        lambda self: (torch.optim.SGD(self.policy.trainable_named_parameters().values(), lr=0.1), None))
    items = make_items(steps=1, batch_size=6)
    base = dict(lookahead_lr=0.1, preconditioner="none")
    one_sided = _head_gradient({"hypergradient": HypergradientOptions(**base)}, make_module, items)
    central = _head_gradient({"hypergradient": HypergradientOptions(**base, fd_central=True)}, make_module, items)
    exact = _head_gradient({"hypergradient": HypergradientOptions(**base, method="exact")}, make_module, items)
    cos = torch.nn.functional.cosine_similarity
    assert cos(central, exact, dim=0) > 0.999 and cos(one_sided, exact, dim=0) > 0.99
    torch.testing.assert_close(central, exact, rtol=0.05, atol=exact.abs().max().item() * 0.05)


def test_exact_hypergradient_trains_the_head_through_the_module(make_module, fit_module, make_items):
    module = make_module(hypergradient=HypergradientOptions(method="exact", lookahead_lr=0.1))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit_module(module, make_items(steps=2))
    assert module.outer_steps == 2 and _moved(before, module, "weighting.head.")


def test_a_batch_without_any_weight_is_skipped_and_counted_not_trained_on(make_module, fit_module, make_items):
    items = make_items(steps=3, batch_size=4)
    items[1]["inner"]["is_synthetic"][:] = 1.0  # real_only: nothing in this batch carries weight
    states = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            states.append({n: p.detach().clone() for n, p in module.named_parameters()})

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            states.append({n: p.detach().clone() for n, p in module.named_parameters()})

    module = make_module("real_only", policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    fit_module(module, items, callbacks=[Spy()])
    assert module.inner_steps == 2 and module.empty_batches == 1 and sum(module.faults.values()) == 0
    before, after = states[2], states[3]  # around batch 1: AdamW's momentum and decay did not move anything
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_one_source_weighting_makes_the_datamodule_draw_only_that_source(make_module, fit_module, make_row,
                                                                            write_jsonl, tiny_tokenizer, tmp_path):
    from boost_lightning.data.datamodule import BoostDataModule

    real = write_jsonl("real.jsonl", [make_row(i, source="real") for i in range(4)])
    synthetic = write_jsonl("synthetic.jsonl", [make_row(100 + i) for i in range(20)])
    validation = write_jsonl("validation.jsonl", [make_row(200 + i, source="real") for i in range(4)])
    seen = []

    class Sources(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch["inner"]["is_synthetic"].tolist())

    dm = BoostDataModule(real=real, synthetic=synthetic, validation=validation, tokenizer=tiny_tokenizer,
                         batch_size=4, validation_batch_size=4, max_length=128, cache_dir=str(tmp_path / "cache"))
    module = make_module("real_only", max_inner_steps=3)
    fit_module(module, dm, callbacks=[Sources()], max_epochs=5)
    assert dm.real_fraction == 1.0 and seen and all(s == [0.0] * 4 for s in seen)
    assert module.inner_steps == 3 and module.empty_batches == 0


def test_setup_refuses_a_tokenizer_larger_than_the_embedding_table(make_module, tiny_tokenizer):
    from types import SimpleNamespace

    module = make_module()
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=list(range(module.policy.vocab_size + 1))))
    with pytest.raises(ValueError, match="raise `vocab_size`"):
        module.setup("fit")


def test_cosine_alignment_trains_the_head_through_the_module(make_module, fit_module, make_items):
    items = make_items(steps=2, batch_size=6)
    module = make_module(hypergradient=HypergradientOptions(lookahead_lr=0.1, alignment="cosine", norm_probes=4))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit_module(module, items)
    assert module.outer_steps == 2 and sum(module.faults.values()) == 0
    assert _moved(before, module, "weighting.") and _moved(before, module, "policy.")
    dot = make_module(hypergradient=HypergradientOptions(lookahead_lr=0.1))
    fit_module(dot, items)
    head = [n for n, _ in module.named_parameters() if n.startswith("weighting.")]
    params, dot_params = dict(module.named_parameters()), dict(dot.named_parameters())
    assert any(not torch.equal(params[n], dot_params[n]) for n in head)  # the alignment reaches the head's update
