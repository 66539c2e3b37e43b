"""Turn-level weights (``granularity="turn"``): turns found from the labels, per-turn losses and features, the inner
loss and hypergradient over turns, the training step, unsupported weightings, predict and the command line.

Batches are drawn from layout strings, one character per token: ``A`` agent (trained on), ``o`` observation, ``.``
template glue, ``p`` padding. The expected values are computed here from the model's logits and the layouts, without
the package's turn finder.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from test_ddp import ddp_setup  # noqa: F401  (the fixture of the 2-process run, reused below)

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel.hypergradient import HypergradientOptions
from boost_lightning.bilevel.policy import policy_hypergradient
from boost_lightning.models import WeightHead
from boost_lightning.models.features import unit_columns
from boost_lightning.weightings import WEIGHTINGS, Learned

#: Rows with 2, 1, 3 and 2 turns of uneven lengths; row 1 has nothing after its turn, row 3 is padded.
LAYOUTS = [
    ".oooAA..ooAAAA.",
    ".ooAAAAAAA.oooo",
    ".oAA.oA..oAAA..",
    ".oooAAA.oAppppp",
]


def layout_batch(vocab: int, layouts: list[str] = LAYOUTS, seed: int = 0, rewards: list[float] | None = None) -> dict:
    """A collated batch in the data contract's shape whose masks follow ``layouts``."""
    g = torch.Generator().manual_seed(seed)
    size, width = len(layouts), len(layouts[0])
    ids = torch.randint(4, vocab, (size, width), generator=g)
    grid = [list(layout) for layout in layouts]
    agent = torch.tensor([[c == "A" for c in row] for row in grid])
    attention = torch.tensor([[c != "p" for c in row] for row in grid]).long()
    ids[attention == 0] = 0
    turns = [len(manual_turns(layout)[0]) for layout in layouts]
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": torch.where(agent, ids, torch.full_like(ids, -100)),
        "turn_ids": torch.zeros_like(ids),
        "obs_mask": torch.tensor([[c == "o" for c in row] for row in grid]),
        "num_agent_tokens": agent.sum(1),
        "num_turns": torch.tensor(turns),
        "length": attention.sum(1),
        "reward": torch.tensor(rewards if rewards is not None else [float(i) for i in range(size)]),
        "is_synthetic": torch.tensor([float(i % 2) for i in range(size)]),
        "row_id": torch.arange(size),
        "task_id": [f"t{i}" for i in range(size)],
        "meta": [{"generator": "expert" if i % 2 == 0 else "noisy", "helpful": i % 3 == 0} for i in range(size)],
    }


def manual_turns(layout: str) -> tuple[list[list[int]], list[list[int]]]:
    """(agent positions, observation positions) of each turn of one layout: runs of ``A``; an ``o`` goes to the last
    turn started before it, or to the first turn."""
    agent: list[list[int]] = []
    for p, c in enumerate(layout):
        if c == "A":
            if p == 0 or layout[p - 1] != "A":
                agent.append([])
            agent[-1].append(p)
    observed: list[list[int]] = [[] for _ in agent]
    for p, c in enumerate(layout):
        if c == "o" and p > 0:  # position 0 is never predicted
            started = [k for k, turn in enumerate(agent) if turn[0] <= p]
            observed[started[-1] if started else 0].append(p)
    return agent, observed


def token_nll(policy, batch: dict, params=None) -> torch.Tensor:
    """[B, T] NLL of each token given the ones before it (column 0 unused), from the whole model's logits."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if params is None:
        logits = policy.model(**kwargs).logits
    else:
        logits = torch.func.functional_call(policy.model, dict(params), (), kwargs, strict=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:],
                                            reduction="none")
    return torch.nn.functional.pad(nll, (1, 0))


def manual_turn_losses(policy, batch: dict, layouts: list[str] = LAYOUTS, params=None) -> torch.Tensor:
    nll = token_nll(policy, batch, params)
    return torch.stack([nll[i, turn].mean() for i, layout in enumerate(layouts) for turn in manual_turns(layout)[0]])


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class Outputs(Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: v.detach().clone() for k, v in outputs.items() if isinstance(v, torch.Tensor)})


# ---- 1. per-turn quantities by hand ----------------------------------------------------------------------------------
def test_turn_forward_matches_a_per_token_computation_from_the_logits(tiny_policy):
    policy = tiny_policy.eval()
    batch = layout_batch(policy.vocab_size)
    with torch.no_grad():
        out = policy.trajectory_forward(batch, granularity="turn")
        nll = token_nll(policy, batch)
        outputs = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True)
        hidden, logits = outputs.hidden_states[-1], outputs.logits
    expected = {"row": [], "position": [], "loss": [], "surprise": [], "tokens": [], "correct": [], "pooled": []}
    for i, layout in enumerate(LAYOUTS):
        agent, observed = manual_turns(layout)
        for k, (turn, obs) in enumerate(zip(agent, observed)):
            expected["row"].append(i)
            expected["position"].append(k)
            expected["loss"].append(nll[i, turn].mean())
            expected["surprise"].append(nll[i, obs].mean() if obs else torch.tensor(0.0))
            expected["tokens"].append(len(turn))
            hits = logits[i, [p - 1 for p in turn]].argmax(-1) == batch["input_ids"][i, turn]
            expected["correct"].append(float(hits.sum()))
            expected["pooled"].append(hidden[i, turn].mean(0))
    assert out.unit_row.tolist() == expected["row"] == [0, 0, 1, 2, 2, 2, 3, 3]
    assert out.position.tolist() == expected["position"] == [0, 1, 0, 0, 1, 2, 0, 1]
    assert out.tokens.tolist() == expected["tokens"]
    torch.testing.assert_close(out.loss, torch.stack(expected["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.surprise, torch.stack(expected["surprise"]), rtol=1e-5, atol=1e-6)
    assert out.correct.tolist() == expected["correct"]
    torch.testing.assert_close(out.pooled, torch.stack(expected["pooled"]).float(), rtol=1e-5, atol=1e-6)
    assert out.surprise[2] > 0 and out.surprise[1] == 0  # row 1's observations follow its only turn; turn 0-1: none

    # What a weighting reads: the row's columns once per turn, the turn's own length and position.
    columns = unit_columns(batch, out)
    assert columns["reward"].tolist() == [0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0]
    assert columns["length"].tolist() == expected["tokens"] and columns["position"].tolist() == expected["position"]
    assert columns["num_turns"].tolist() == [2, 2, 1, 3, 3, 3, 2, 2]
    assert columns["task_id"] == ["t0", "t0", "t1", "t2", "t2", "t2", "t3", "t3"]
    assert "input_ids" not in columns

    # The per-row default is untouched: one unit per row, no turn fields.
    rows = policy.trajectory_forward(batch)
    assert rows.loss.shape == (4,) and rows.unit_row is None
    with pytest.raises(ValueError, match="granularity"):
        policy.trajectory_forward(batch, granularity="token")


def test_each_turn_takes_its_rows_objective_multiplier(make_module):
    # top_return_bc keeps the top half of the *rows* by return (rows 0 and 1); a cut over the turns' returns
    # [3, 3, 2, 0, 0, 0, 1, 1] would keep row 3 too.
    module = make_module("uniform", objective="top_return_bc", granularity="turn")
    batch = layout_batch(module.policy.vocab_size, rewards=[3.0, 2.0, 0.0, 1.0])
    with torch.no_grad():
        out = module.policy.trajectory_forward(batch, granularity="turn")
    rows = module._gather_rows(out, batch)
    assert rows.multiplier.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert rows.synthetic.tolist() == [False, False, True, False, False, False, True, True]


# ---- 2. one turn per row: turn granularity is the trajectory run -----------------------------------------------------
def test_rows_of_one_turn_train_exactly_as_at_trajectory_granularity(make_module, fit_module, make_items):
    items = make_items(steps=2, batch_size=4)  # random_batch rows: one run of agent tokens each
    for item in items:
        agent = (item["inner"]["labels"][:, 1:] != -100).int()
        assert ((agent.diff(dim=1) == 1).sum(1) + agent[:, 0]).tolist() == [1] * 4
    runs = {}
    for granularity in ("trajectory", "turn"):
        # Features that mean the same for a row and its only turn (not its pooled state or length).
        head = WeightHead(features=("loss", "surprise", "reward", "source", "turns"), seed=0)
        module = make_module(Learned(head), granularity=granularity,
                             hypergradient=HypergradientOptions(normalize=False, lookahead_lr=0.1))
        record = Outputs()
        trainer = fit_module(module, items, callbacks=[record])
        runs[granularity] = (module, record.outputs, float(trainer.logged_metrics["inner/loss"]))
    (row_module, row_out, row_loss), (turn_module, turn_out, turn_loss) = runs["trajectory"], runs["turn"]
    assert turn_loss == pytest.approx(row_loss, rel=1e-6)
    for a, b in zip(row_out, turn_out):
        torch.testing.assert_close(b["turn_weights"], a["weights"], rtol=0, atol=1e-6)
        torch.testing.assert_close(b["weights"], a["weights"], rtol=0, atol=1e-6)
        torch.testing.assert_close(b["hypergradient"], a["hypergradient"], rtol=1e-5, atol=1e-9)
    assert (row_out[1]["weights"] - 1).abs().max() > 1e-4  # the head moved: the second step's weights are not uniform
    for (name, a), (_, b) in zip(row_module.named_parameters(), turn_module.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---- 3. uniform turn weights are SFT where every turn counts once ----------------------------------------------------
def test_uniform_turn_weights_are_sft_with_every_turn_counting_once(make_module, fit_module):
    lr = 0.1
    module = make_module("uniform", granularity="turn", policy_grad_clip=None)
    batch = layout_batch(module.policy.vocab_size)
    reference = make_module("uniform").policy  # the same initial policy
    params = reference.trainable_named_parameters()
    turn_losses = manual_turn_losses(reference, batch)
    expected = turn_losses.mean()
    grads = torch.autograd.grad(expected, list(params.values()))
    trajectory_sft = reference.trajectory_forward(batch).loss.mean()
    assert abs(float(trajectory_sft - expected)) > 1e-3  # the two objectives differ on this batch

    trainer = fit_module(module, [{"inner": batch, "outer": random_batch(module.policy.vocab_size, 4, seed=1)}])
    assert float(trainer.logged_metrics["inner/loss"]) == pytest.approx(float(expected), rel=1e-5)
    trained = module.policy.trainable_named_parameters()
    moved = 0.0
    for (name, before), grad in zip(params.items(), grads):
        torch.testing.assert_close(trained[name], before - lr * grad, rtol=0, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
        moved = max(moved, float(grad.abs().max()))
    assert moved > 1e-3


# ---- 4. per-turn hypergradient ---------------------------------------------------------------------------------------
def test_per_turn_hypergradient_first_order_and_exact_agree_with_the_hand_derived_value(tiny_policy):
    policy = tiny_policy.eval()
    inner, outer = layout_batch(policy.vocab_size), random_batch(policy.vocab_size, 4, seed=1)
    params = policy.trainable_named_parameters()
    optimizer = torch.optim.SGD(params.values(), lr=1e-2)
    lr, units = 1e-2, 8
    ones = torch.ones(units)

    def hypergradient(method: str, **kwargs):
        options = HypergradientOptions(method=method, preconditioner="none", **kwargs)
        return policy_hypergradient(policy, inner, outer, options, optimizer, ones, granularity="turn").grad_weights

    exact, first_order, central = hypergradient("exact"), hypergradient("first_order"), hypergradient(
        "first_order", fd_central=True)
    assert exact.shape == first_order.shape == (units,)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(first_order, exact, dim=0) > 0.95 and cosine(central, exact, dim=0) > 0.99

    # By hand: θ' = θ − α/U·Σ_u ∇ℓ_u(θ) over the turns, ∂L_val(θ')/∂w_u = −α/U·⟨∇L_val(θ'), ∇ℓ_u(θ)⟩.
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    losses = manual_turn_losses(policy, inner, params=theta)
    per_turn = [torch.autograd.grad(loss, list(theta.values()), retain_graph=True) for loss in losses]
    stepped = {n: (p - lr / units * sum(g[j] for g in per_turn)).detach().requires_grad_(True)
               for j, (n, p) in enumerate(theta.items())}
    val = policy.functional_losses(outer, stepped).mean()
    v = torch.autograd.grad(val, list(stepped.values()))
    by_hand = torch.stack([-lr / units * sum((a * b).sum() for a, b in zip(v, g)) for g in per_turn])
    torch.testing.assert_close(exact, by_hand, rtol=1e-3, atol=1e-3 * float(by_hand.abs().max()))
    # Rows would give 4 values; the turns of one row get different ones.
    assert float((by_hand[3:6] - by_hand[3]).abs().max()) > 1e-3 * float(by_hand.abs().max())


# ---- 5. the training step with BOOST's learned head ------------------------------------------------------------------
def test_learned_turn_weights_train_both_levels_with_one_weight_per_turn(make_module, fit_module, tiny_llama_config):
    vocab = tiny_llama_config["vocab_size"]
    items = [{"inner": layout_batch(vocab, seed=s), "outer": random_batch(vocab, 4, seed=100 + s)} for s in range(3)]
    head = WeightHead(features=("hidden", "loss", "surprise", "reward", "source", "length", "turns", "position"),
                      seed=0)
    module = make_module(Learned(head), granularity="turn")
    before, record = snapshot(module), Outputs()
    fit_module(module, items, callbacks=[record])
    moved = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any(n.startswith("weighting.head.") for n in moved) and any("lora_" in n for n in moved)
    frozen = [n for n in before if n.startswith("policy.") and "lora_" not in n]
    assert frozen and not (set(frozen) & moved)
    assert module.inner_steps == 3 and module.outer_steps == 3
    for out in record.outputs:
        assert out["turn_weights"].shape == (8,) and out["hypergradient"].shape == (8,)
        assert out["unit_row"].tolist() == [0, 0, 1, 2, 2, 2, 3, 3] and out["weights"].shape == (4,)
        torch.testing.assert_close(out["turn_weights"].mean(), torch.tensor(1.0))
        turn_weights = out["turn_weights"]
        row_means = torch.stack([turn_weights[:2].mean(), turn_weights[2], turn_weights[3:6].mean(),
                                 turn_weights[6:].mean()])
        torch.testing.assert_close(out["weights"], row_means)
    last = record.outputs[-1]["turn_weights"]
    assert float((last[3:6] - last[3]).abs().max()) > 1e-5  # turns of one row weighed apart


def test_micro_batches_give_the_same_turn_run(make_module, fit_module, tiny_llama_config, assert_same_runs):
    vocab = tiny_llama_config["vocab_size"]
    items = [{"inner": layout_batch(vocab, seed=s), "outer": random_batch(vocab, 4, seed=100 + s)} for s in range(2)]
    runs = []
    for micro in (None, 3):  # chunks of 3 rows and 1 row: 6 turns, then 2
        module = make_module(granularity="turn", micro_batch_size=micro,
                             hypergradient=HypergradientOptions(normalize=False))
        fit_module(module, items)
        runs.append(module)
    assert_same_runs(runs)


@pytest.mark.parametrize("weighting", sorted(name for name, cls in WEIGHTINGS.items()
                                             if "turn" in cls.granularities and name != "learned"))
def test_every_weighting_that_takes_turns_trains_on_them(weighting, make_module, fit_module):
    module = make_module(weighting, granularity="turn")
    vocab = module.policy.vocab_size
    before, record = snapshot(module), Outputs()
    fit_module(module, [{"inner": layout_batch(vocab), "outer": random_batch(vocab, 4, seed=1)}], callbacks=[record])
    assert module.inner_steps + module.empty_batches == 1 and sum(module.faults.values()) == 0
    if module.inner_steps:
        assert record.outputs[0]["turn_weights"].shape == (8,)
        assert any(not torch.equal(before[n], p.detach()) for n, p in module.named_parameters() if "lora_" in n)


# ---- 6. weightings that cannot weigh turns say so before training ----------------------------------------------------
def test_a_weighting_without_turn_support_is_refused_at_construction(make_module):
    with pytest.raises(ValueError, match=r"granularity='turn' is not supported for the AdvantageSoftmax weighting"):
        make_module("advantage_softmax", granularity="turn")
    make_module("advantage_softmax")  # the per-trajectory default is fine
    with pytest.raises(ValueError, match="granularity must be"):
        make_module("uniform", granularity="token")


# ---- 7. predict and the command line ---------------------------------------------------------------------------------
def test_predict_writes_one_record_per_row_with_its_turn_weights(tmp_path, make_row, write_jsonl, tiny_tokenizer,
                                                                  make_module):
    from boost_lightning.callbacks import TrajectoryWeightWriter
    from boost_lightning.data.datamodule import BoostDataModule

    turns = [1, 2, 3, 2, 1, 3]
    dm = BoostDataModule(real=write_jsonl("real.jsonl", [make_row(0, source="real")]),
                         synthetic=write_jsonl("synthetic.jsonl", [make_row(100 + i, turns=n)
                                                                   for i, n in enumerate(turns)]),
                         validation=write_jsonl("validation.jsonl", [make_row(200, source="real")]),
                         tokenizer=tiny_tokenizer, batch_size=4, validation_batch_size=4, max_length=256,
                         cache_dir=str(tmp_path / "cache"))
    module = make_module(Learned(WeightHead(seed=0)), granularity="turn")
    with torch.no_grad():  # off the zero-initialised (uniform) start
        g = torch.Generator().manual_seed(0)
        for p in module.weighting.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    writer = TrajectoryWeightWriter(str(tmp_path / "weights.jsonl"))
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[writer]).predict(module, datamodule=dm, return_predictions=False)
    rows = [json.loads(line) for line in (tmp_path / "weights.jsonl").read_text().splitlines()]
    assert [len(r["turn_scores"]) for r in rows] == [len(r["turn_weights"]) for r in rows] == turns
    assert [len(r["features"]["loss"]) for r in rows] == turns and "position" not in rows[0]["features"]
    assert sum(r["weight"] for r in rows) / len(rows) == pytest.approx(1.0)
    ratios = []
    for r in rows:
        assert r["weight"] == pytest.approx(sum(r["turn_weights"]) / len(r["turn_weights"]))
        lme = math.log(sum(math.exp(s) for s in r["turn_scores"]) / len(r["turn_scores"]))
        assert r["score"] == pytest.approx(lme)
        ratios += [w / math.exp(s) for w, s in zip(r["turn_weights"], r["turn_scores"])]
    # The default head normalises a batch by softmax: every turn of the file is ∝ exp(its score), one constant.
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-6)
    assert len({round(w, 9) for r in rows for w in r["turn_weights"]}) == sum(turns)


def test_command_line_granularity_turn_fits(tmp_path, make_row, write_jsonl, tiny_cli_config, capsys):
    from boost_lightning.cli import cli_main

    config = tiny_cli_config(
        data={"real": write_jsonl("real.jsonl", [make_row(i, turns=1 + i % 3, source="real") for i in range(4)]),
              "synthetic": write_jsonl("synthetic.jsonl", [make_row(100 + i, turns=1 + i % 3) for i in range(8)]),
              "validation": write_jsonl("validation.jsonl", [make_row(200 + i) for i in range(4)])},
        trainer={"max_steps": 10, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                 "enable_model_summary": False},
        model={"max_inner_steps": 2})
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    cli = cli_main(["fit", "--config", "config.yaml", "--model.granularity", "turn"])
    assert cli.model.granularity == "turn" and cli.model.hparams.granularity == "turn"
    assert cli.model.inner_steps == 2 and cli.model.outer_steps == 2
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    assert "--model.granularity" in capsys.readouterr().out


# ---- DDP: ranks hold different numbers of turns ----------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_ddp_turn_run_equals_one_process_run_on_the_same_global_batch(ddp_setup):  # noqa: F811
    from test_ddp import REFERENCE_HEAD_ATOL, REFERENCE_POLICY_ATOL, _run

    # Rows of 1 to 3 turns: the two ranks hold different numbers of units in most batches.
    two = _run(ddp_setup, "two", 2, 2, "--model.granularity", "turn")
    one = _run(ddp_setup, "one", 1, 4, "--model.granularity", "turn")[0]
    assert two[0]["inner_steps"] == one["inner_steps"] == 4 and two[0]["outer_steps"] == one["outer_steps"] == 4
    for key, value in two[0]["state"].items():
        assert torch.equal(value, two[1]["state"][key]), f"rank replicas differ at {key}"
    for key, value in one["state"].items():
        atol = REFERENCE_HEAD_ATOL if key.startswith("weighting.") else REFERENCE_POLICY_ATOL  # the default head
        torch.testing.assert_close(two[0]["state"][key], value, rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    assert any(not torch.equal(v, one["start"][k]) for k, v in one["state"].items() if k.startswith("weighting.head"))
    rows2 = [json.loads(line) for line in (ddp_setup / "two" / "weights.jsonl").read_text().splitlines()]
    rows1 = [json.loads(line) for line in (ddp_setup / "one" / "weights.jsonl").read_text().splitlines()]
    assert [len(r["turn_weights"]) for r in rows2] == [len(r["turn_weights"]) for r in rows1] == [1, 2] * 5
    for a, b in zip(rows2, rows1):
        assert a["turn_weights"] == pytest.approx(b["turn_weights"], abs=REFERENCE_HEAD_ATOL)
