"""LightningCLI entry point: ``python main.py fit|validate|predict --config configs/quickstart.yaml``."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from boost_lightning.callbacks import TrajectoryWeightWriter, WeightDiagnostics
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.module import BoostModule
from boost_lightning.preemption import PreemptionCheckpoint, resolve_ckpt_path

#: In a logger's ``save_dir``: replaced by ``--trainer.default_root_dir`` (the current directory without one).
ROOT_DIR = "{default_root_dir}"


class BoostCLI(LightningCLI):
    """LightningCLI for BOOST: ``model`` is a :class:`BoostModule`, ``data`` a :class:`BoostDataModule`.

    Two optimizers are injected as ``model.policy_optimizer`` / ``model.head_optimizer`` (the automatic
    ``--optimizer`` handles one only). Weight diagnostics, the ``predict`` weight writer and the preemption
    checkpoint (SIGTERM/SIGINT → checkpoint at the next step end, exit 0) are always attached and configured under
    ``diagnostics.*``, ``predict_writer.*`` and ``preemption.*`` (``--preemption.enabled false`` turns it off).

    ``--ckpt_path last`` resumes from the newest ``last*.ckpt`` of the run, whichever logger version wrote it (see
    :func:`boost_lightning.preemption.find_last_checkpoint`). Checkpoints are loaded with ``weights_only=True``
    unless ``--weights_only false`` is given.

    The default logger is a ``TensorBoardLogger`` writing to ``{default_root_dir}/logs/boost``: ``{default_root_dir}``
    in any logger's ``save_dir`` stands for ``--trainer.default_root_dir`` (the current directory without one), so
    logs and checkpoints follow the run's root directory unless a ``save_dir`` without it is given. Without a
    subcommand (``run=False``) the parser also accepts the arguments of the subcommands (``ckpt_path``,
    ``weights_only``, ...), so that the ``config.yaml`` a run saves next to its logs loads again; they end up in
    ``cli.config`` and are not used otherwise. ``--name`` sets the ``name`` of every configured logger at once.
    """

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            # The saved config of a subcommand holds that subcommand's method arguments too.
            for name, kind, default, what in _SUBCOMMAND_ARGUMENTS:
                self.parser.add_argument(f"--{name}", type=kind, default=default,
                                         help=f"{what} (accepted from a saved config; unused without a subcommand)")

    def before_instantiate_classes(self) -> None:
        """Put ``--trainer.default_root_dir`` in place of ``{default_root_dir}`` in the loggers' ``save_dir``, and
        ``--name`` in place of the ``name`` of every logger that takes one."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        trainer = config["trainer"]
        root = trainer.get("default_root_dir") or "."
        name = config.get("name")
        configured = trainer.get("logger")
        for logger in configured if isinstance(configured, list) else [configured]:
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is None:
                continue
            save_dir = init_args.get("save_dir")
            if isinstance(save_dir, str) and ROOT_DIR in save_dir:
                init_args["save_dir"] = str(Path(save_dir.replace(ROOT_DIR, str(root))))
            if name is not None and ("name" in init_args or _takes_name(logger.get("class_path"))):
                init_args["name"] = name

    def instantiate_classes(self) -> None:
        """As LightningCLI's, except that ``fit --data.report_only true`` builds the data module alone: the report
        needs no model, trainer or logger, so it costs no model download or initialisation and writes nothing."""
        data = self._get(self.config, "data")
        if self.subcommand != "fit" or data is None or not data.get("report_only"):
            super().instantiate_classes()
            return
        self.config_init = self.config
        self.datamodule = BoostDataModule(**data.as_dict())
        self.model = self.trainer = None

    def add_arguments_to_parser(self, parser) -> None:
        # An argument of its own: `--trainer.logger.init_args.name` reaches only the last logger of a list.
        parser.add_argument(
            "--name", type=str | None, default=None,
            help="Run name for every configured logger that takes a ``name`` (TensorBoard, CSV, W&B, ...): replaces "
                 "each one's ``init_args.name``, so that all loggers of a list write under one run name "
                 "(``--trainer.logger.init_args.name`` reaches only the last logger of a list). Default: each "
                 "logger's own name.")
        parser.add_lightning_class_args(WeightDiagnostics, "diagnostics")
        parser.add_lightning_class_args(TrajectoryWeightWriter, "predict_writer")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def _trainer_call(self, method: str, ckpt_path: str | None = None, weights_only: bool | None = None,
                      **kwargs: Any) -> Any:
        # A checkpoint is data, not code: never unpickle arbitrary objects from it unless asked to.
        weights_only = True if weights_only is None else weights_only
        ckpt_path = resolve_ckpt_path(self.trainer, ckpt_path)
        return getattr(self.trainer, method)(ckpt_path=ckpt_path, weights_only=weights_only, **kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        if self.trainer is None:  # ``fit --data.report_only true``: only the data module was built
            print(self.datamodule.report(), flush=True)
            return
        super()._run_subcommand(subcommand)

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit`` with ``ckpt_path="last"`` resolved across logger versions and ``weights_only=True``."""
        self._trainer_call("fit", **kwargs)

    def validate(self, **kwargs: Any) -> Any:
        """``trainer.validate`` with the same checkpoint handling as ``fit``."""
        return self._trainer_call("validate", **kwargs)

    def test(self, **kwargs: Any) -> Any:
        """``trainer.test`` with the same checkpoint handling as ``fit``."""
        return self._trainer_call("test", **kwargs)

    def predict(self, **kwargs: Any) -> Any:
        """``trainer.predict`` with the same checkpoint handling as ``fit``."""
        return self._trainer_call("predict", **kwargs)


def _takes_name(class_path: Any) -> bool:
    """Whether the logger class at ``class_path`` has a ``name`` argument."""
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, attr = class_path.rpartition(".")
    try:
        return "name" in inspect.signature(getattr(importlib.import_module(module), attr)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


_SUBCOMMAND_ARGUMENTS: tuple[tuple[str, Any, Any, str], ...] = (
    ("ckpt_path", str | None, None, "Checkpoint of fit/validate/test/predict"),
    ("weights_only", bool | None, None, "Load checkpoints with weights_only"),
    ("verbose", bool, True, "Print validate/test results"),
    ("return_predictions", bool | None, None, "Keep predict outputs"),
)

# Console output of every run that tells the user nothing about theirs: matched by message, silenced for the CLI only.
_KNOWN_NOISE = (
    # `--ckpt_path last` resumes across logger versions (or into a run without a logger): a new dirpath is the point.
    r"The dirpath has changed from",
    # PEFT reads a deprecated transformers property when it wraps the model.
    r"`is_gradient_checkpointing` is deprecated",
    # Lightning's own use of a deprecated torch pytree class.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Checkpoints are written after the whole bilevel step (both levels stepped): the state an exact resume needs.
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


@contextlib.contextmanager
def _quiet_console() -> Iterator[None]:
    # Scoped to the call, so that a library user importing boost_lightning keeps Lightning's output untouched.
    tips = _DropTips()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for message in _KNOWN_NOISE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        rank_zero.removeFilter(tips)


def cli_main(args: list[str] | None = None, run: bool = True) -> BoostCLI:
    """Run the CLI (``args`` as on the command line; None reads ``sys.argv``).

    Lightning's advertising tips and a few known, harmless warnings are silenced while it runs.
    """
    with _quiet_console():
        return BoostCLI(
            BoostModule,
            BoostDataModule,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": f"{ROOT_DIR}/logs", "name": "boost"}},
                # The datamodule shards its own samplers (it keeps the real fraction per inner batch under DDP).
                "use_distributed_sampler": False,
                "log_every_n_steps": 10,
            },
            args=args,
            run=run,
        )
