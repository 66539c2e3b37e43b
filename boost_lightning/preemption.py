"""Preemption-safe training: a checkpoint at the next safe point on SIGTERM / SIGINT, ``--ckpt_path last``, RNG state.

A preempted job (a cluster scheduler's SIGTERM, a Ctrl-C) finishes the training step it is in, saves a checkpoint and
exits with status 0. ``fit --ckpt_path last`` then resumes exactly: the checkpoint holds the LoRA and head tensors,
both optimizers and schedulers, the inner/outer step counters, the RNG states (``rng_state``) and the position in
the epoch (``BoostDataModule.state_dict``), so the resumed run continues with the batch the interrupted one would
have trained on next.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import threading
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGINT during ``fit``: finish the current step, save a checkpoint, exit cleanly (status 0).

    The safe point is the end of the training batch, after both optimizer steps (policy and head) of a BOOST step.
    The signal only sets a flag; at the next batch end the checkpoint is saved (``trainer.save_checkpoint``, all ranks
    agree under DDP) and training stops with Lightning's ``SIGTERMException`` (a ``SystemExit`` with status 0). It
    does not go through ``trainer.should_stop``, which would first run a validation pass and the epoch-end hooks,
    whose checkpoints describe a finished epoch and would resume past the batches not yet seen. Resume with
    ``python main.py fit --config ... --ckpt_path last``.

    Args:
        enabled: Handle SIGTERM / SIGINT during training (``false``: signals keep Lightning's default behaviour:
            SIGTERM stops without a checkpoint, SIGINT interrupts with status 1).
        dirpath: Directory of the checkpoint. Default: the directory of the trainer's ``ModelCheckpoint``
            (``<save_dir>/<name>/version_<n>/checkpoints`` of the logger), or ``<default_root_dir>/checkpoints``.
        filename: File name of the checkpoint (a ``last*.ckpt`` name is what ``--ckpt_path last`` looks for).
    """

    def __init__(self, enabled: bool = True, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.enabled = enabled
        self.dirpath = dirpath
        self.filename = filename
        self.received: int | None = None
        self.saved_path: str | None = None
        self._previous: dict[int, Any] = {}

    # -- signals --------------------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        # Only a flag: a signal arrives at any bytecode, e.g. halfway through an optimizer step.
        self.received = signum

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Act as if ``signum`` had been received (the checkpoint is written at the next batch end)."""
        self.received = signum

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Installed here, after the Trainer registered its own SIGTERM handler (it does so right before the run).
        self.received, self.saved_path = None, None
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle and previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handlers()

    # -- the safe point ---------------------------------------------------------------------------------------------
    def checkpoint_path(self, trainer: Trainer) -> str:
        """Where the checkpoint goes (see ``dirpath``)."""
        dirpath = self.dirpath
        if dirpath is None:
            callback = trainer.checkpoint_callback
            dirpath = getattr(callback, "dirpath", None) or _default_checkpoint_dir(trainer)
        return os.path.join(str(dirpath), self.filename)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        requested = self.received is not None
        if trainer.world_size > 1:
            # One flag for all ranks (a tiny all-reduce per step): saving is collective and a rank that did not get
            # the signal must stop too.
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        name = signal.Signals(self.received).name if self.received is not None else "a stop request"
        rank_zero_info(
            f"Received {name}: saved {path} after inner step {getattr(pl_module, 'inner_steps', '?')}. "
            "Resume with `fit --ckpt_path last` (or `--ckpt_path <that file>`)."
        )
        for logger in trainer.loggers:
            logger.save()
        self._restore_handlers()
        trainer.should_stop = True
        raise SIGTERMException()


def _default_checkpoint_dir(trainer: Trainer) -> str:
    """The directory ``ModelCheckpoint`` would use without a ``dirpath`` (logger version dir, else root dir)."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def find_last_checkpoint(trainer: Trainer) -> str | None:
    """The newest ``last*.ckpt`` of this run's configuration, whatever logger version wrote it.

    Looked for in the ``dirpath`` of every ``PreemptionCheckpoint`` and ``ModelCheckpoint`` that sets one, in
    ``<save_dir>/<name>/*/checkpoints`` of the first logger (every version: a resumed run logs to a new version) and
    in ``<default_root_dir>/checkpoints``. Lightning's own ``ckpt_path="last"`` only looks in the directory of the
    current logger version, which a restarted process has not written yet.
    """
    dirs: set[str] = set()
    for callback in trainer.callbacks:
        if isinstance(callback, (PreemptionCheckpoint, ModelCheckpoint)) and callback.dirpath:
            dirs.add(str(callback.dirpath))
    if trainer.loggers and trainer.loggers[0].save_dir is not None:
        logger = trainer.loggers[0]
        dirs.update(glob.glob(os.path.join(glob.escape(str(logger.save_dir)), glob.escape(str(logger.name)), "*",
                                           "checkpoints")))
    dirs.add(os.path.join(str(trainer.default_root_dir), "checkpoints"))
    found = [
        path
        for d in dirs
        for path in glob.glob(os.path.join(glob.escape(d), "last*.ckpt"))
        if os.path.isfile(path)
    ]
    return max(found, key=os.path.getmtime) if found else None


def resolve_ckpt_path(trainer: Trainer, ckpt_path: str | None) -> str | None:
    """``"last"`` → :func:`find_last_checkpoint` (kept as ``"last"`` when there is none: Lightning then warns and
    starts fresh); anything else unchanged."""
    if ckpt_path == "last":
        return find_last_checkpoint(trainer) or ckpt_path
    return ckpt_path


# -- RNG states (checkpointed by BoostModule) --------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python RNG states, as tensors and plain lists.

    Plain types only, so that a checkpoint holding them loads with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "python": [version, list(internal), python_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
