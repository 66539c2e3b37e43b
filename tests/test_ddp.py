"""Data parallelism: real 2-process gloo runs on CPU equal 1-process runs on the same global batch.

Tolerances: the two runs do the same arithmetic except for the order of reductions (a sum of two per-rank partial
sums instead of one sum over the batch, batches padded to a different width), so float32 results differ in the last
bits: LoRA parameters, losses and the in-process math agree to 1e-5 absolute. The head gets 1e-4: the first-order
hypergradient divides a difference of two losses by the probe step, which magnifies their float32 rounding about
1/ε-fold, and Adam rescales every element by its own gradient magnitude. Replicas of one run are compared bit for
bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from boost_lightning import distributed as dp
from boost_lightning.bilevel.hypergradient import exact_hypergradient, first_order_hypergradient
from boost_lightning.objectives import weighted_loss
from boost_lightning.weightings import ReturnFilter

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
HEAD_ATOL = 1e-4
# With the default head, which reads the reference adapter's features (see the DDP test below for why).
REFERENCE_HEAD_ATOL, REFERENCE_POLICY_ATOL = 1e-2, 1e-4


# ---- the math, in-process: 2 gloo ranks via torch.multiprocessing (no Lightning) ---------------------------------
# The spawned workers import this file: keep Lightning-importing modules out of its top level (seconds per process).
def _toy(n_inner: int = 6, n_val: int = 4, dim: int = 5):
    g = torch.Generator().manual_seed(0)
    return {"theta": torch.randn(dim, generator=g), "x": torch.randn(n_inner, dim, generator=g),
            "c": torch.rand(n_inner, generator=g) + 0.5, "y": torch.randn(n_val, dim, generator=g),
            "w": torch.rand(n_inner, generator=g) + 0.5,
            # weighting inputs: source, reward, length, turns
            "rows": torch.stack([torch.tensor([0.0, 1, 1, 1, 1, 0]), torch.tensor([0.5, 0.9, 0.8, 0.1, 0.2, 0.3]),
                                 torch.full((n_inner,), 10.0), torch.ones(n_inner)], dim=1)}


def _inner(x, c):
    return lambda p: 0.5 * c * ((p["theta"] - x) ** 2).sum(1) + 0.1 * (p["theta"] ** 4).sum()


def _math_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        t = _toy()
        n, m = t["x"].shape[0], t["y"].shape[0]
        mine = slice(rank * n // world, (rank + 1) * n // world)
        vmine = slice(rank * m // world, (rank + 1) * m // world)
        params = {"theta": t["theta"].clone().requires_grad_(True)}
        val_term = lambda p: 0.5 * ((p["theta"] - t["y"][vmine]) ** 2).sum(1).sum() / m  # noqa: E731
        fo = first_order_hypergradient(params, _inner(t["x"][mine], t["c"][mine]), val_term, lr=0.1, eps=1e-3,
                                       central=True, batch_size=n, all_reduce=dp.all_reduce_sum)
        ex = exact_hypergradient(params, _inner(t["x"][mine], t["c"][mine]), val_term, t["w"][mine], lr=0.1,
                                 batch_size=n, all_reduce=dp.all_reduce_sum)
        # Weighted inner loss: each rank's term Σ_local wℓ / Σ_global w, gradients summed over ranks.
        theta = t["theta"].clone().requires_grad_(True)
        losses = _inner(t["x"][mine], t["c"][mine])({"theta": theta})
        total = dp.all_reduce_sum(t["w"][mine].sum())
        theta.grad = torch.ones_like(theta)  # an earlier batch of the accumulation cycle (already global)
        with dp.summed_gradients([theta]):
            weighted_loss(losses, t["w"][mine], total).backward()
        grad = theta.grad.clone() - 1
        # A batch statistic (the top half of the synthetic rows by return) taken on the gathered global batch.
        table, local = dp.all_gather_rows(t["rows"][mine])
        filtered = ReturnFilter(0.5)(table)[local]
        # Uneven shards: rank r holds r + 2 rows.
        uneven, rows = dp.all_gather_rows(torch.arange(rank + 2, dtype=torch.float32).unsqueeze(1) + 10 * rank)
        torch.save({"fo": dp.all_gather_cat(fo.grad_weights), "fo_val": fo.val_loss, "fo_v": fo.v_norm,
                    "ex": dp.all_gather_cat(ex.grad_weights), "ex_val": ex.val_loss, "grad": grad,
                    "uneven": uneven, "rows": (rows.start, rows.stop), "filtered": filtered},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_math_on_two_gloo_ranks_equals_one_process(tmp_path):
    mp.start_processes(_math_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    t = _toy()
    n, m = t["x"].shape[0], t["y"].shape[0]
    params = {"theta": t["theta"].clone().requires_grad_(True)}
    val_mean = lambda p: 0.5 * ((p["theta"] - t["y"]) ** 2).sum(1).mean()  # noqa: E731
    fo = first_order_hypergradient(params, _inner(t["x"], t["c"]), val_mean, lr=0.1, eps=1e-3, central=True)
    ex = exact_hypergradient(params, _inner(t["x"], t["c"]), val_mean, t["w"], lr=0.1)
    theta = t["theta"].clone().requires_grad_(True)
    weighted_loss(_inner(t["x"], t["c"])({"theta": theta}), t["w"]).backward()

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["fo"], fo.grad_weights, rtol=0, atol=ATOL)
        torch.testing.assert_close(r["fo_val"], fo.val_loss, rtol=0, atol=ATOL)
        torch.testing.assert_close(r["fo_v"], fo.v_norm, rtol=0, atol=ATOL)
        torch.testing.assert_close(r["ex"], ex.grad_weights, rtol=0, atol=ATOL)
        torch.testing.assert_close(r["ex_val"], ex.val_loss, rtol=0, atol=ATOL)
        torch.testing.assert_close(r["grad"], theta.grad, rtol=0, atol=ATOL)
        assert r["uneven"].squeeze(1).tolist() == [0.0, 1.0, 10.0, 11.0, 12.0]
    assert ranks[0]["rows"] == (0, 2) and ranks[1]["rows"] == (2, 5)
    # Each rank's weights are its rows of the one-process weights, not a filter of its own shard.
    assert torch.equal(torch.cat([r["filtered"] for r in ranks]), ReturnFilter(0.5)(t["rows"]))
    per_shard = torch.cat([ReturnFilter(0.5)(t["rows"][:3]), ReturnFilter(0.5)(t["rows"][3:])])
    assert not torch.equal(per_shard, ReturnFilter(0.5)(t["rows"]))  # the gather matters on this batch
    assert torch.equal(ranks[0]["fo"], ranks[1]["fo"]) and torch.equal(ranks[0]["grad"], ranks[1]["grad"])
    assert fo.grad_weights.shape == (n,) and m == 4


def test_helpers_are_identities_without_a_process_group():
    x = torch.arange(6.0).reshape(3, 2)
    assert not dp.is_distributed()
    assert dp.all_reduce_sum(x) is x and dp.all_reduce_mean(x) is x
    gathered, rows = dp.all_gather_rows(x)
    assert torch.equal(gathered, x) and rows == slice(0, 3)
    dp.all_reduce_tensors_([x], op="mean")
    assert torch.equal(x, torch.arange(6.0).reshape(3, 2))
    with pytest.raises(ValueError, match="op must be"):
        dp.all_reduce_tensors_([x], op="max")


# ---- end to end: the CLI under Lightning's `ddp` strategy, 2 gloo processes vs 1 -----------------------------------
RUNNER = '''
import sys
import torch
from boost_lightning.cli import cli_main

out, args = sys.argv[1], sys.argv[2:]
cli = cli_main(args, run=False)
trainer, model = cli.trainer, cli.model
model.configure_model()  # a reference adapter, if the head reads one, exists from here on
trainable = {n for n, p in model.named_parameters() if p.requires_grad}
start = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
         if k in trainable or k.startswith("weighting.")}
trainer.fit(model, datamodule=cli.datamodule)
val = trainer.validate(model, datamodule=cli.datamodule, verbose=False)[0]
trainer.predict(model, datamodule=cli.datamodule, return_predictions=False)
state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
         if k in trainable or k.startswith("weighting.")}
torch.save({"state": state, "start": start, "val": float(val["val/loss"]), "inner_steps": model.inner_steps,
            "outer_steps": model.outer_steps, "world": trainer.world_size}, f"{out}/rank{trainer.global_rank}.pt")
'''


@pytest.fixture()
def ddp_setup(tmp_path, make_row, write_jsonl, tiny_tokenizer, tiny_llama_config):
    real = [make_row(i, turns=1 + i % 3, source="real") for i in range(6)]
    synthetic = [make_row(100 + i, turns=1 + i % 2, reward=float(i % 5) / 4) for i in range(10)]
    validation = [make_row(200 + i, turns=1 + i % 3) for i in range(5)]  # odd: shards of 3 and 2 rows
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer_dir)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_epochs": 5, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "check_val_every_n_epoch": 100, "log_every_n_steps": 1, "default_root_dir": str(tmp_path / "root")},
        "model": {
            "policy": {"class_path": "boost_lightning.models.PolicyModel",
                       "init_args": {"config": tiny_llama_config, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}},
            # Sigmoid normalisation: under softmax the last bias is a gauge (its gradient is rounding noise, which
            # Adam turns into steps of size lr in both runs alike) and could not be compared.
            "weighting": {"class_path": "boost_lightning.weightings.Learned", "init_args": {"head": {
                "class_path": "boost_lightning.models.WeightHead",
                "init_args": {"hidden_projection": 8, "mlp_width": 16, "normalization": "sigmoid",
                              "regularizer": "ess", "regularizer_strength": 0.1}}}},
            "policy_optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            # SGD at the head: Adam would turn the near-zero, rounding-level gradients of some head directions into
            # steps of size lr, differently in each run, and the weights (hence the policy) would drift apart.
            "head_optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
            "max_inner_steps": 4,
        },
        "data": {"real": write_jsonl("real.jsonl", real), "synthetic": write_jsonl("synthetic.jsonl", synthetic),
                 "validation": write_jsonl("validation.jsonl", validation), "tokenizer": str(tokenizer_dir),
                 "max_length": 128, "num_workers": 0, "cache_dir": str(tmp_path / "cache")},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    (tmp_path / "runner.py").write_text(RUNNER)
    return tmp_path


def _run(base: Path, name: str, devices: int, batch: int, *extra: str) -> list[dict]:
    out = base / name
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(base / "runner.py"), str(out), "--config", str(base / "config.yaml"),
           "--trainer.devices", str(devices), "--data.batch_size", str(batch), "--data.validation_batch_size",
           str(batch), "--predict_writer.output_path", str(out / "weights.jsonl"), *extra]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["learned", "uniform", "learned_policy_features", "learned_resample",
                                       "learned_cosine"])
def test_two_process_ddp_run_equals_one_process_run_on_the_same_global_batch(ddp_setup, weighting):
    # The config's weighting is `learned` with a sigmoid head; a short name on the command line would replace it with
    # a default (softmax) head, whose gauge direction turns rounding noise into Adam steps. Its default features read
    # the reference adapter (a third set of tensors, trained on trusted rows); ``learned_policy_features``: the same
    # head on the policy's own features only (no reference); ``learned_cosine``: cosine alignment, whose random
    # probe directions every rank draws alike and whose norm scale is the global batch's.
    override = {"learned": (), "uniform": ("--model.weighting", weighting), "learned_policy_features": (
        "--model.weighting.init_args.head.init_args.features=[hidden,loss,surprise,reward,source,length,turns]",),
        "learned_resample": ("--model.source_sampling", "weights"),
        "learned_cosine": ("--model.hypergradient.alignment", "cosine")}[weighting]
    # Looser tolerances where the head's inputs amplify rounding: the excess loss is exactly 0 on every row at the
    # start (both adapters share their initial tensors) and then a difference of two close losses, and under
    # resampling each batch's weights are renormalised after the importance factors. Measured: up to 4e-3 on the
    # head and 3e-5 on the policy after 4 steps (the policy-feature head stays within 1e-4 and 1e-5).
    plain = weighting in ("learned_policy_features", "uniform")
    head_atol = HEAD_ATOL if plain else REFERENCE_HEAD_ATOL
    policy_atol = ATOL if plain else REFERENCE_POLICY_ATOL
    two = _run(ddp_setup, "two", 2, 2, *override)
    one = _run(ddp_setup, "one", 1, 4, *override)[0]
    assert two[0]["world"] == 2 and one["world"] == 1
    assert two[0]["inner_steps"] == one["inner_steps"] == 4
    assert two[0]["outer_steps"] == one["outer_steps"] == (0 if weighting == "uniform" else 4)
    # Replicas identical, bit for bit (LoRA, head parameters and the head's running feature statistics).
    assert two[0]["state"].keys() == two[1]["state"].keys() == one["state"].keys()
    for key, value in two[0]["state"].items():
        assert torch.equal(value, two[1]["state"][key]), f"rank replicas differ at {key}"
    # The 2-process run equals the 1-process run on the same global batch, up to reduction order.
    moved = set()
    for key, value in one["state"].items():
        atol = head_atol if key.startswith("weighting.") else policy_atol
        torch.testing.assert_close(two[0]["state"][key], value, rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
        drift = (value.double() - one["start"][key].double()).abs().max()
        if ".norm." not in key and drift > 10 * HEAD_ATOL:  # parameters, not the head's feature statistics
            moved.add(key.split(".")[0])
    # Both levels moved well beyond the tolerance, so the comparison means something.
    assert moved == ({"policy"} if weighting == "uniform" else {"policy", "weighting"} if
                     weighting == "learned_policy_features" else {"policy", "weighting", "reference"})
    assert two[0]["val"] == pytest.approx(one["val"], abs=ATOL)
    # predict under DDP: rank zero writes one complete file with every row once, equal to the 1-process file.
    rows2 = [json.loads(line) for line in (ddp_setup / "two" / "weights.jsonl").read_text().splitlines()]
    rows1 = [json.loads(line) for line in (ddp_setup / "one" / "weights.jsonl").read_text().splitlines()]
    assert [r["row_id"] for r in rows2] == [r["row_id"] for r in rows1] == list(range(10))
    for a, b in zip(rows2, rows1):
        assert a["weight"] == pytest.approx(b["weight"], abs=head_atol)
