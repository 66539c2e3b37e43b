"""LightningCLI entry point: ``python main.py fit|validate|predict --config configs/quickstart.yaml``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from boost_lightning.callbacks import TrajectoryWeightWriter, WeightDiagnostics
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.module import BoostModule


class BoostCLI(LightningCLI):
    """LightningCLI for BOOST: ``model`` is a :class:`BoostModule`, ``data`` a :class:`BoostDataModule`.

    Two optimizers are injected as ``model.policy_optimizer`` / ``model.head_optimizer`` (the automatic
    ``--optimizer`` handles one only). Weight diagnostics and the ``predict`` weight writer are always attached and
    configured under ``diagnostics.*`` and ``predict_writer.*``.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(WeightDiagnostics, "diagnostics")
        parser.add_lightning_class_args(TrajectoryWeightWriter, "predict_writer")


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
