"""LightningCLI entry point: ``python main.py fit|validate|predict --config configs/quickstart.yaml``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from boost_lightning.callbacks import TrajectoryWeightWriter, WeightDiagnostics
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.module import BoostModule
from boost_lightning.preemption import PreemptionCheckpoint, resolve_ckpt_path


class BoostCLI(LightningCLI):
    """LightningCLI for BOOST: ``model`` is a :class:`BoostModule`, ``data`` a :class:`BoostDataModule`.

    Two optimizers are injected as ``model.policy_optimizer`` / ``model.head_optimizer`` (the automatic
    ``--optimizer`` handles one only). Weight diagnostics, the ``predict`` weight writer and the preemption
    checkpoint (SIGTERM/SIGINT → checkpoint at the next step end, exit 0) are always attached and configured under
    ``diagnostics.*``, ``predict_writer.*`` and ``preemption.*`` (``--preemption.enabled false`` turns it off).

    ``--ckpt_path last`` resumes from the newest ``last*.ckpt`` of the run, whichever logger version wrote it (see
    :func:`boost_lightning.preemption.find_last_checkpoint`). Checkpoints are loaded with ``weights_only=True``
    unless ``--weights_only false`` is given.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(WeightDiagnostics, "diagnostics")
        parser.add_lightning_class_args(TrajectoryWeightWriter, "predict_writer")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def _trainer_call(self, method: str, ckpt_path: str | None = None, weights_only: bool | None = None,
                      **kwargs: Any) -> Any:
        # A checkpoint is data, not code: never unpickle arbitrary objects from it unless asked to.
        weights_only = True if weights_only is None else weights_only
        ckpt_path = resolve_ckpt_path(self.trainer, ckpt_path)
        return getattr(self.trainer, method)(ckpt_path=ckpt_path, weights_only=weights_only, **kwargs)

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


def cli_main(args: list[str] | None = None, run: bool = True) -> BoostCLI:
    """Run the CLI (``args`` as on the command line; None reads ``sys.argv``)."""
    return BoostCLI(
        BoostModule,
        BoostDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "logs", "name": "boost"}},
            # The datamodule shards its own samplers (it keeps the real fraction per inner batch under DDP).
            "use_distributed_sampler": False,
            "log_every_n_steps": 10,
        },
        args=args,
        run=run,
    )
