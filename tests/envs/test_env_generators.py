"""Generated rows: the data contract, truthful ground-truth labels, pool composition, the synthesize CLI."""

from __future__ import annotations

import json
import math

import pytest

from boost_lightning.envs.base import (
    EVAL_SEED_START,
    SYNTHETIC_SEED_START,
    TASKS,
    TEST_SEED_START,
    VALIDATION_SEED_START,
    task_spec,
)
from boost_lightning.envs.generators import (
    benign_row,
    conflicting_row,
    hacked_row,
    hallucinated_row,
    noisy_expert_row,
    pool_counts,
    replay,
    synthetic_pool,
)
from boost_lightning.envs.synthesize import main, read_jsonl

META_KEYS = {"generator": str, "quality": float, "success": bool, "optimal_turns": int, "shifted": bool,
             "hallucinated": bool, "failure": str, "helpful": bool}
FAMILIES = {"none", "weak", "reward_hacked", "conflicting_shift", "benign_shift", "hallucination"}


def assert_contract(row, source=None):
    assert set(row) == {"messages", "reward", "rewards", "source", "task_id", "meta"}
    messages = row["messages"]
    assert messages[0]["role"] == "system"
    assert all(set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant") for m in messages)
    assert all(isinstance(m["content"], str) for m in messages)
    roles = [m["role"] for m in messages[1:]]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], "observation / action alternation"
    n_agent = roles.count("assistant")
    assert n_agent >= 1 and len(row["rewards"]) == n_agent
    assert math.isfinite(row["reward"]) and row["reward"] == pytest.approx(sum(row["rewards"]), abs=1e-6)
    assert row["source"] in ("real", "synthetic") and (source is None or row["source"] == source)
    assert isinstance(row["task_id"], str) and row["task_id"]
    for key, kind in META_KEYS.items():
        assert isinstance(row["meta"][key], kind), key
    assert 0.0 <= row["meta"]["quality"] <= 1.0
    assert row["meta"]["turns"] == n_agent and row["meta"]["failure"] in FAMILIES
    json.dumps(row)


@pytest.fixture(scope="module", params=TASKS)
def splits(request, embedded_data):
    """The splits the embedded specs serve (default settings: 64 real, 64 validation, 64 test, 2000 synthetic)."""
    files = embedded_data(request.param)
    return request.param, {name: read_jsonl(files[name]) for name in ("real", "validation", "test", "synthetic")}


def test_rows_satisfy_the_contract(splits):
    task, data = splits
    for name, rows in data.items():
        for row in rows:
            assert_contract(row, "synthetic" if name == "synthetic" else "real")


def test_real_validation_and_test_are_expert_and_disjoint(splits):
    task, data = splits
    for name in ("real", "validation", "test"):
        assert all(r["meta"]["generator"] == "expert" and r["meta"]["quality"] == 1.0 for r in data[name])
    seeds = {name: {r["meta"]["seed"] for r in rows} for name, rows in data.items()}
    assert seeds["real"] == set(range(64))
    assert seeds["validation"] == set(range(VALIDATION_SEED_START, VALIDATION_SEED_START + 64))
    assert seeds["test"] == set(range(TEST_SEED_START, TEST_SEED_START + 64))
    assert min(seeds["synthetic"]) >= SYNTHETIC_SEED_START
    assert not any(EVAL_SEED_START <= s < SYNTHETIC_SEED_START for s in set().union(*seeds.values()))
    if task_spec(task).disjoint_instances:
        instances = {name: {json.dumps(r["meta"]["instance"], sort_keys=True) for r in rows}
                     for name, rows in data.items()}
        assert not instances["real"] & instances["validation"]
        assert not instances["test"] & (instances["real"] | instances["validation"])


def test_task_ids_do_not_reveal_the_generator(splits):
    task, data = splits
    assert all(r["task_id"] == f"{task}-{r['meta']['seed']}" for rows in data.values() for r in rows)


def test_pool_composition(splits):
    task, data = splits
    counts = {}
    for row in data["synthetic"]:
        counts[row["meta"]["generator"]] = counts.get(row["meta"]["generator"], 0) + 1
    assert sum(counts.values()) == 2000
    assert sum(v for g, v in counts.items() if g.startswith("conflict-")) == 500
    assert sum(v for g, v in counts.items() if g.startswith("benign-")) == 300
    assert counts["hallucinated-sim"] == 300 and counts["hacked-sim"] == 300
    assert {g for g in counts if g.startswith("noisy-expert-")} == {"noisy-expert-0.1", "noisy-expert-0.3",
                                                                    "noisy-expert-0.6"}


def test_reward_alone_does_not_separate_helpful_from_harmful_rows(splits):
    """Filtered BC must not be an oracle in disguise: among the top half of the pool by reward, many rows are
    harmful (reward-hacked, conflicting, hallucinated), and the reward-hacked rows claim the highest returns."""
    task, data = splits
    rows = sorted(data["synthetic"], key=lambda r: -r["reward"])
    top = rows[: len(rows) // 2]
    assert sum(not r["meta"]["helpful"] for r in top) >= 0.3 * len(top), task
    mean = {f: [r["reward"] for r in rows if r["meta"]["failure"] == f] for f in ("reward_hacked", "weak")}
    assert sum(mean["reward_hacked"]) / len(mean["reward_hacked"]) > sum(mean["weak"]) / len(mean["weak"])


def test_pool_counts_sum_exactly():
    counts = pool_counts(1001, (0.1, 0.2, 0.7), ["a", "b"], ["c"], 0.33, 0.1, 0.05, 0.11)
    assert sum(counts.values()) == 1001
    assert counts[("conflicting", "a")] + counts[("conflicting", "b")] == 330
    assert counts[("benign", "c")] == 100 and counts[("hacked", None)] == 50 and counts[("hallucinated", None)] == 110
    with pytest.raises(ValueError):
        pool_counts(10, (0.1,), ["a"], [], 0.8, 0.0, 0.0, 0.5)


@pytest.mark.parametrize("task", TASKS)
def test_more_noise_means_lower_quality(task):
    seeds = range(SYNTHETIC_SEED_START, SYNTHETIC_SEED_START + 150)
    means = []
    for noise in (0.0, 0.1, 0.3, 0.6):
        rows = [noisy_expert_row(task, s, noise) for s in seeds]
        for row in rows:
            meta = row["meta"]
            expected = float(meta["success"]) * min(1.0, meta["optimal_turns"] / meta["turns"])
            assert meta["quality"] == pytest.approx(expected, abs=1e-6) and meta["noise"] == noise
            assert meta["success"] == meta["claimed_success"] and not meta["shifted"] and not meta["hallucinated"]
            assert meta["success"] == replay(task, meta["seed"], [m["content"] for m in row["messages"]
                                                                  if m["role"] == "assistant"]).success
        means.append(sum(r["meta"]["quality"] for r in rows) / len(rows))
    assert means[0] == 1.0
    assert means == sorted(means, reverse=True) and means[1] > means[2] > means[3], means


@pytest.mark.parametrize("task", TASKS)
def test_conflicting_rows_are_flagged_and_teach_other_moves(task):
    for variant in task_spec(task).conflicting:
        rows = [conflicting_row(task, s, variant) for s in range(SYNTHETIC_SEED_START, SYNTHETIC_SEED_START + 60)]
        assert all(r["meta"]["shifted"] and r["meta"]["quality"] == 0.0 and r["meta"]["variant"] == variant
                   and not r["meta"]["helpful"] and r["meta"]["failure"] == "conflicting_shift" for r in rows)
        assert all(r["meta"]["generator"] == f"conflict-{variant}" and r["meta"]["success"] for r in rows)
        # Played in the real task, the same actions go wrong: replies differ somewhere in most rows.
        differs = 0
        for r in rows:
            actions = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
            observations = [m["content"] for m in r["messages"][3::2]]
            real = replay(task, r["meta"]["seed"], actions)
            differs += real.observations != observations[: len(real.observations)] or not real.success
        assert differs >= 0.5 * len(rows), (variant, differs)


@pytest.mark.parametrize("task", TASKS)
def test_benign_rows_solve_their_instances_with_moves_that_are_right_for_the_real_task(task):
    for variant in task_spec(task).benign:
        rows = [benign_row(task, s, variant) for s in range(SYNTHETIC_SEED_START, SYNTHETIC_SEED_START + 60)]
        assert all(r["meta"]["failure"] == "benign_shift" and r["meta"]["generator"] == f"benign-{variant}"
                   and r["meta"]["helpful"] == (r["meta"]["success"] and r["meta"]["quality"] == 1.0) for r in rows)
        assert sum(r["meta"]["success"] for r in rows) >= 0.9 * len(rows), (task, variant)
        if task != "maze":  # the other tasks' benign variants play the real instances: replaying them agrees
            for r in rows:
                actions = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
                assert replay(task, r["meta"]["seed"], actions).success == r["meta"]["success"]


@pytest.mark.parametrize("task", TASKS)
def test_reward_hacked_rows_claim_a_success_the_real_task_denies(task):
    rows = [hacked_row(task, s) for s in range(SYNTHETIC_SEED_START, SYNTHETIC_SEED_START + 100)]
    win = max(r["rewards"][-1] for r in rows)
    for r in rows:
        meta = r["meta"]
        actions = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert meta["claimed_success"] and r["rewards"][-1] == win and r["messages"][-1]["content"] in (
            "Correct!", "You reached the goal!")
        assert meta["success"] == replay(task, meta["seed"], actions).success
        assert meta["helpful"] == (meta["success"] and meta["quality"] == 1.0)
    assert sum(not r["meta"]["success"] for r in rows) >= 90, task


@pytest.mark.parametrize("task", TASKS)
def test_hallucinated_replies_disagree_with_the_true_simulator(task):
    for seed in range(SYNTHETIC_SEED_START, SYNTHETIC_SEED_START + 150):
        row = hallucinated_row(task, seed, rate=0.2)
        meta = row["meta"]
        assert meta["hallucinated"] and meta["quality"] == 0.0 and meta["hallucinated_turns"]
        actions = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        claimed = [m["content"] for m in row["messages"][3::2]]
        real = replay(task, seed, actions)
        first = meta["hallucinated_turns"][0]
        # Up to the first made-up reply the simulator told the truth; that reply is where they part.
        assert real.observations[:first] == claimed[:first]
        assert len(real.observations) > first and real.observations[first] != claimed[first], (task, seed)
        assert meta["success"] == real.success and meta["claimed_success"] == (claimed[-1] in (
            "Correct!", "You reached the goal!"))


def test_hallucinated_claims_exceed_real_success():
    for task in TASKS:
        rows = [hallucinated_row(task, s) for s in range(SYNTHETIC_SEED_START, SYNTHETIC_SEED_START + 100)]
        claimed = sum(r["meta"]["claimed_success"] for r in rows)
        real = sum(r["meta"]["success"] for r in rows)
        assert claimed > real + 20, (task, claimed, real)


def test_pool_is_deterministic_and_seeded():
    a = synthetic_pool("guess_number", 120, seed=0)
    assert a == synthetic_pool("guess_number", 120, seed=0)
    assert a != synthetic_pool("guess_number", 120, seed=1)


def test_cli_writes_files_and_summary(tmp_path, capsys):
    summary = main(["--task", "maze", "--out", str(tmp_path), "--num-real", "8", "--num-validation", "6",
                    "--num-test", "5", "--num-synthetic", "50", "--conflicting-fraction", "0.1",
                    "--benign-fraction", "0.2", "--hacked-fraction", "0.1", "--hallucinated-fraction", "0.2",
                    "--noise-levels", "0.2,0.5", "--seed", "3", "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.jsonl", "summary.json", "synthetic.jsonl",
                                                          "test.jsonl", "validation.jsonl"]
    assert [len(read_jsonl(tmp_path / f"{s}.jsonl")) for s in ("real", "validation", "test", "synthetic")] == [
        8, 6, 5, 50]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    printed = capsys.readouterr().out
    assert json.loads(printed) == summary
    assert set(summary["generators"]) == {"noisy-expert-0.2", "noisy-expert-0.5", "conflict-swapped-moves",
                                          "benign-layout-mirror", "benign-layout-rooms", "hacked-sim",
                                          "hallucinated-sim"}
    assert summary["generators"]["noisy-expert-0.2"]["count"] == 10
    assert summary["generators"]["hallucinated-sim"]["mean_quality"] == 0.0
    assert summary["splits"]["real"]["success_rate"] == 1.0 and summary["settings"]["seed"] == 3
    for row in read_jsonl(tmp_path / "synthetic.jsonl"):
        assert_contract(row, "synthetic")
