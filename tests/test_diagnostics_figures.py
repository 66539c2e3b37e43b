"""WeightDiagnostics' pictures in TensorBoard (``weights/distribution``, ``weights/extremes``), ``--name`` for every
logger of a run, a ``fit --help`` that imports neither peft nor matplotlib from this package, and the ``envs``
exports of the environment protocol."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from boost_lightning.callbacks import WeightDiagnostics
from boost_lightning.cli import cli_main
from boost_lightning.data.collate import TrajectoryCollator
from boost_lightning.data.trajectory import TrajectoryEncoder
from boost_lightning.models import PolicyModel
from boost_lightning.module import BoostModule

ROOT = Path(__file__).resolve().parents[1]


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, TENSORS, EventAccumulator

    return EventAccumulator(str(log_dir), size_guidance={IMAGES: 0, TENSORS: 0}).Reload()


def _text(events, tag: str = "weights/extremes/text_summary") -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)}


def _batch(tokenizer, first: int, generators: list[str | None], rewards: list[float]) -> dict:
    """Rows ``first, first + 1, ...``: real where the generator is None; row i's last observation names i."""
    encoder = TrajectoryEncoder(tokenizer)
    rows = []
    for offset, (generator, reward) in enumerate(zip(generators, rewards)):
        i = first + offset
        messages = [{"role": "system", "content": "You are in a maze."},
                    {"role": "user", "content": "You are at (0, 0). Walls: north."},
                    {"role": "assistant", "content": f"move east {i}"},
                    {"role": "user", "content": f"You are at ({i}, 1). Walls: north."},
                    {"role": "assistant", "content": "move south"}]
        meta = {} if generator is None else {"generator": generator}
        rows.append({**encoder.encode(messages), "row_id": i, "reward": reward,
                     "is_synthetic": int(generator is not None), "task_id": f"maze-{i}", "meta": json.dumps(meta)})
    return TrajectoryCollator(tokenizer.pad_token_id)(rows)


def _fake_trainer(logger, tokenizer=None):
    return SimpleNamespace(is_global_zero=True, loggers=[logger], datamodule=SimpleNamespace(tokenizer=tokenizer))


def test_extremes_are_the_highest_and_lowest_weights_of_the_window_with_their_rows(tmp_path, tiny_tokenizer):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version="", default_hp_metric=False)
    trainer, module = _fake_trainer(logger, tiny_tokenizer), SimpleNamespace(inner_steps=0)
    diagnostics = WeightDiagnostics(every_n_steps=2, group_by="generator", num_extremes=3)
    windows = [  # (first row, generators, rewards, weights) per batch; a flush every two batches
        (0, [None, "expert", "noisy", "noisy"], [1.0, 0.5, 0.0, -1.0], [0.5, 2.0, 1.0, 0.1]),
        (4, ["expert", None, "noisy", "expert"], [0.9, 1.0, 0.2, 0.3], [3.0, 0.2, 1.1, 0.9]),
        (8, ["noisy", "noisy", None, "expert"], [0.0, 0.1, 1.0, 0.7], [1.5, 0.6, 0.7, 1.2]),
        (12, ["expert", "noisy", "expert", None], [0.4, 0.3, 0.2, 1.0], [0.8, 0.9, 1.4, 1.1]),
    ]
    flushed = []
    for batch_idx, (first, generators, rewards, weights) in enumerate(windows):
        inner = _batch(tiny_tokenizer, first, generators, rewards)
        module.inner_steps += 1
        diagnostics.on_train_batch_end(trainer, module, {"weights": torch.tensor(weights),
                                                         "is_synthetic": inner["is_synthetic"]},
                                       {"inner": inner}, batch_idx)
        if batch_idx % 2:
            flushed.append(diagnostics.last_extremes)
    logger.experiment.flush()

    # Window 2 (rows 8-15) must not remember window 1's rows 1 and 4 (weights 2.0 and 3.0).
    expected = [({4: 3.0, 1: 2.0, 6: 1.1}, {3: 0.1, 5: 0.2, 0: 0.5}),
                ({8: 1.5, 14: 1.4, 11: 1.2}, {9: 0.6, 10: 0.7, 12: 0.8})]
    for extremes, (highest, lowest) in zip(flushed, expected):
        for end, want in (("highest", highest), ("lowest", lowest)):
            rows = extremes[end]
            assert [row["task_id"] for row in rows] == [f"maze-{i}" for i in want], end
            assert [row["weight"] for row in rows] == pytest.approx(list(want.values())), end
            for row, i in zip(rows, want):
                window = windows[i // 4]
                generator = window[1][i % 4]
                assert row["source"] == ("real" if generator is None else "synthetic")
                assert row["group"] == ("real" if generator is None else generator)
                assert row["reward"] == pytest.approx(window[2][i % 4])
                assert row["first_action"] == f"move east {i}"
                assert row["last_observation"] == f"You are at ({i}, 1). Walls: north."

    events = _events(logger.log_dir)
    assert [e.step for e in events.Images("weights/distribution")] == [2, 4]
    texts = _text(events)
    assert sorted(texts) == [2, 4]
    assert "| 3.000 | synthetic | expert | 0.9 | maze-4 | move east 4 | You are at (4, 1). Walls: north. |" in texts[2]
    assert "maze-1 " in texts[2] and "maze-3 " in texts[2] and "maze-8 " not in texts[2]


def test_a_figure_that_cannot_be_drawn_is_warned_about_once_and_the_rest_is_written(tmp_path, tiny_tokenizer,
                                                                                     monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no canvas")

    monkeypatch.setattr(WeightDiagnostics, "_draw_distribution", broken)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version="", default_hp_metric=False)
    trainer, module = _fake_trainer(logger, tiny_tokenizer), SimpleNamespace(inner_steps=0)
    diagnostics = WeightDiagnostics(every_n_steps=1, num_extremes=1)
    inner = _batch(tiny_tokenizer, 0, [None, "expert"], [1.0, 0.0])
    with pytest.warns(UserWarning, match="weights/distribution") as caught:
        for batch_idx in range(3):
            module.inner_steps += 1
            diagnostics.on_train_batch_end(trainer, module, {"weights": torch.tensor([0.5, 1.5]),
                                                             "is_synthetic": inner["is_synthetic"]},
                                           {"inner": inner}, batch_idx)
    assert len([w for w in caught if "weights/distribution" in str(w.message)]) == 1
    logger.experiment.flush()
    assert sorted(_text(_events(logger.log_dir))) == [1, 2, 3]


def test_figure_and_extremes_reach_tensorboard_from_a_fit_at_the_inner_steps(tmp_path, tiny_llama_config,
                                                                             make_items):
    module = BoostModule(PolicyModel(config=tiny_llama_config, r=4, seed=0), weighting="learned")
    data = DataLoader(make_items(steps=4), batch_size=None)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version="", default_hp_metric=False)
    diagnostics = WeightDiagnostics(every_n_steps=2, group_by="generator", num_extremes=2)
    trainer = Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", callbacks=[diagnostics])
    trainer.fit(module, train_dataloaders=data)

    events = _events(logger.log_dir)
    images = events.Images("weights/distribution")
    assert [e.step for e in images] == [2, 4] and all(e.encoded_image_string[:4] == b"\x89PNG" for e in images)
    texts = _text(events)
    assert sorted(texts) == [2, 4] and "Highest weights" in texts[4] and "Lowest weights" in texts[4]
    assert len(diagnostics.last_extremes["highest"]) == len(diagnostics.last_extremes["lowest"]) == 2


def test_name_renames_every_logger_of_a_list(tmp_path):
    loggers = tmp_path / "loggers.yaml"
    loggers.write_text(textwrap.dedent(f"""\
        trainer:
          logger:
            - class_path: lightning.pytorch.loggers.TensorBoardLogger
              init_args: {{save_dir: {tmp_path}, name: tb}}
            - class_path: lightning.pytorch.loggers.CSVLogger
              init_args: {{save_dir: {tmp_path}, name: csv}}
        """))
    common = ["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(loggers)]
    cli = cli_main([*common, "--name", "ablation-3"], run=False)
    assert [type(logger).__name__ for logger in cli.trainer.loggers] == ["TensorBoardLogger", "CSVLogger"]
    assert [logger.name for logger in cli.trainer.loggers] == ["ablation-3", "ablation-3"]
    assert [logger.name for logger in cli_main(common, run=False).trainer.loggers] == ["tb", "csv"]


HELP_PROBE = """
import contextlib, io, json, runpy, sys, types
sys.argv = ["main.py", "fit", "--help"]
out, code = io.StringIO(), None
try:
    with contextlib.redirect_stdout(out):
        runpy.run_path("main.py", run_name="__main__")
except SystemExit as exit:
    code = exit.code
def origin(value):
    name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
    return name.split(".")[0] if isinstance(name, str) else None
held = sorted({f"{module}.{attr} -> {origin(value)}" for module, m in list(sys.modules.items())
               if module.startswith("boost_lightning") and m is not None
               for attr, value in vars(m).items() if origin(value) in ("peft", "matplotlib")})
print(json.dumps({"code": code, "help": out.getvalue(), "peft": "peft" in sys.modules, "held": held}))
"""


def test_fit_help_completes_without_importing_peft_or_holding_matplotlib():
    # Lightning imports matplotlib itself (torchmetrics' plotting, when installed): what is checked for it is that no
    # module of this package holds a matplotlib name after --help, i.e. none imports it at module level.
    done = subprocess.run([sys.executable, "-c", HELP_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["code"] in (0, None) and "--diagnostics.num_extremes" in probe["help"] and "--name" in probe["help"]
    assert probe["peft"] is False
    assert probe["held"] == []


def test_envs_exports_the_environment_protocol_and_the_factory():
    import boost_lightning.envs as envs
    from boost_lightning.envs import base, rollout

    assert envs.EnvProtocol is base.EnvProtocol and envs.env_factory is rollout.env_factory
    assert {"EnvProtocol", "env_factory"} <= set(envs.__all__) and envs._LAZY["env_factory"] == "rollout"
