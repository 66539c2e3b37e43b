"""Callbacks: weight diagnostics for TensorBoard, rollout evaluation, and the weight writer of ``predict``."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from boost_lightning import cache
from boost_lightning.data.collate import row_keys
from boost_lightning.data.sources import content_hash, read_rows
from boost_lightning.data.trajectory import IGNORE_INDEX, IMPLIED_SOURCE
from boost_lightning.evaluation import RolloutEvaluation  # noqa: F401  (re-exported: older configs name it here)
from boost_lightning.loggers import tensorboard_experiment


class WeightDiagnostics(Callback):
    """Write the weights of the training rows to TensorBoard: histograms, means per group, a box plot, the extremes.

    Weights are collected from every training batch and flushed every ``every_n_steps`` training batches as

    * ``weights/hist_real`` and ``weights/hist_synthetic``: histograms per source;
    * ``weights/<group_by>/<value>``: the mean weight per ``meta`` value (kept in :attr:`history` too, one dict per
      flush, for plots and benchmarks);
    * ``weights/distribution`` (Images tab): one box per group of the window's rows, the real rows as their own
      group ``real`` and every synthetic row in the box of its ``meta[group_by]`` value (``synthetic`` without one);
    * ``weights/extremes`` (Text tab): the ``num_extremes`` highest- and lowest-weighted rows of the window with
      their weight, source, group, reward, task id and an excerpt of the conversation (the first agent turn and the
      last observation, decoded with the data module's tokenizer), also kept in :attr:`last_extremes`.

    Figure and text are written only when a TensorBoard logger is attached; a failure to draw them is warned about
    once and never stops training. Under DDP they come from rank zero's rows.

    Everything is keyed on the module's ``inner_steps`` (policy steps taken so far), not on
    ``trainer.global_step``: under manual optimization the latter counts the optimizer steps of every level, so
    it would drift from the policy's progress with head warm-up, an outer cadence above one or skipped steps.

    Args:
        every_n_steps: Flush interval in training batches.
        group_by: ``meta`` key whose values group the synthetic pool (e.g. ``generator``); None: no groups.
        num_extremes: Rows listed at each end of ``weights/extremes``; 0 turns the text panel off.
    """

    #: Characters kept of each excerpt in ``weights/extremes``.
    EXCERPT_CHARS = 200

    def __init__(self, every_n_steps: int = 25, group_by: str | None = "generator", num_extremes: int = 3) -> None:
        if num_extremes < 0:
            raise ValueError(f"num_extremes must be >= 0, got {num_extremes}")
        self.every_n_steps, self.group_by, self.num_extremes = every_n_steps, group_by, num_extremes
        self.history: list[dict[str, float]] = []
        #: The extremes of the last flush that wrote ``weights/extremes`` (rank zero, TensorBoard attached):
        #: ``{"highest": [...], "lowest": [...]}``, one dict per row (weight, source, group, reward, task_id,
        #: first_action, last_observation), the most extreme first.
        self.last_extremes: dict[str, list[dict[str, Any]]] = {"highest": [], "lowest": []}
        self._warned: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        self._weights: dict[str, list[float]] = defaultdict(list)
        self._groups: dict[str, list[float]] = defaultdict(list)
        self._boxes: dict[str, list[float]] = defaultdict(list)
        self._highest: list[dict[str, Any]] = []
        self._lowest: list[dict[str, Any]] = []
        self._first_step: int | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "weights" not in outputs:
            return
        weights = outputs["weights"].float().cpu()
        synthetic = outputs["is_synthetic"].cpu().bool()
        self._weights["real"] += weights[~synthetic].tolist()
        self._weights["synthetic"] += weights[synthetic].tolist()
        metas = list(batch["inner"].get("meta", []))
        if self.group_by is not None:
            for w, meta in zip(weights.tolist(), metas):
                value = (meta or {}).get(self.group_by)
                if value is not None:
                    self._groups[str(value)].append(w)
        if self._first_step is None:
            self._first_step = int(pl_module.inner_steps)
        if trainer.is_global_zero and tensorboard_experiment(trainer) is not None:
            self._observe(weights, synthetic, batch["inner"], metas)
        if (batch_idx + 1) % self.every_n_steps == 0:
            self._flush(trainer, pl_module.inner_steps)

    def _group(self, synthetic: bool, meta: Any) -> str:
        if not synthetic:
            return "real"
        value = (meta or {}).get(self.group_by) if self.group_by is not None else None
        return "synthetic" if value is None else str(value)

    def _observe(self, weights: torch.Tensor, synthetic: torch.Tensor, inner: Any, metas: list[Any]) -> None:
        """Keep what the figure and the extremes of the window need: every weight by group, the candidate rows."""
        groups = [self._group(bool(s), metas[i] if i < len(metas) else None) for i, s in enumerate(synthetic.tolist())]
        for w, group in zip(weights.tolist(), groups):
            self._boxes[group].append(w)
        k = min(self.num_extremes, len(weights))
        if k == 0:
            return
        # Only this batch's own top and bottom k can enter the window's: the others are never decoded or kept.
        candidates = set(torch.topk(weights, k).indices.tolist()) | set(torch.topk(-weights, k).indices.tolist())
        rows = [self._row(inner, i, float(weights[i]), bool(synthetic[i]), groups[i]) for i in sorted(candidates)]
        self._highest = sorted(self._highest + rows, key=lambda r: -r["weight"])[: self.num_extremes]
        self._lowest = sorted(self._lowest + rows, key=lambda r: r["weight"])[: self.num_extremes]

    @staticmethod
    def _row(inner: Any, i: int, weight: float, synthetic: bool, group: str) -> dict[str, Any]:
        row: dict[str, Any] = {"weight": weight, "source": "synthetic" if synthetic else "real", "group": group}
        reward = inner.get("reward")
        row["reward"] = float(reward[i]) if reward is not None else float("nan")
        task_ids = inner.get("task_id")
        row["task_id"] = str(task_ids[i]) if task_ids is not None else ""
        # Token ids, decoded at the flush: the batch carries tokens, not messages (see data/collate.py).
        row["first_action"], row["last_observation"] = [], []
        ids, turns = inner.get("input_ids"), inner.get("turn_ids")
        if ids is None or turns is None:
            return row
        ids, turns = ids[i].cpu(), turns[i].cpu()
        labels, observed = inner.get("labels"), inner.get("obs_mask")
        for name, mask, pick in (("first_action", None if labels is None else labels[i].cpu() != IGNORE_INDEX, min),
                                 ("last_observation", None if observed is None else observed[i].cpu().bool(), max)):
            if mask is not None and bool(mask.any()):
                turn = pick(turns[mask].tolist())
                row[name] = ids[mask & (turns == turn)].tolist()
        return row

    def _flush(self, trainer: Trainer, step: int) -> None:
        record: dict[str, float] = {"step": float(step)}
        experiment = tensorboard_experiment(trainer) if trainer.is_global_zero else None
        for source, values in self._weights.items():
            if values and experiment is not None:
                experiment.add_histogram(f"weights/hist_{source}", torch.tensor(values), step)
        for value, ws in sorted(self._groups.items()):
            record[value] = sum(ws) / len(ws)
        if len(record) > 1:
            self.history.append(record)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics({f"weights/{self.group_by}/{k}": v for k, v in record.items() if k != "step"},
                                       step=step)
        if experiment is not None:
            window = (self._first_step if self._first_step is not None else step, step)
            if self._boxes:
                self._guarded("weights/distribution", self._draw_distribution, experiment, step, window)
            if self._highest:
                self._guarded("weights/extremes", self._write_extremes, experiment, step, window,
                              _tokenizer(trainer))
        self._reset()

    def _guarded(self, tag: str, write: Any, *args: Any) -> None:
        # A picture is a convenience: whatever goes wrong drawing it must not cost the run.
        try:
            write(*args)
        except Exception as err:
            if tag not in self._warned:
                self._warned.add(tag)
                rank_zero_warn(f"WeightDiagnostics: could not write {tag} to TensorBoard ({type(err).__name__}: "
                               f"{err}); training goes on without it (warned once)")

    def _draw_distribution(self, experiment: Any, step: int, window: tuple[int, int]) -> None:
        # Imported here: `fit --help` and runs without TensorBoard never need matplotlib.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = sorted(self._boxes, key=lambda name: (name != "real", name))
        figure = Figure(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6), dpi=100)
        FigureCanvasAgg(figure)  # the Agg canvas, whatever backend pyplot would pick
        axes = figure.add_subplot()
        axes.boxplot([self._boxes[name] for name in names], showmeans=True)
        axes.set_xticks(range(1, len(names) + 1),
                        [f"{name}\n(n={len(self._boxes[name])})" for name in names], fontsize=8,
                        rotation=30 if len(names) > 4 else 0)
        axes.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axes.set_ylabel("weight")
        grouping = f"meta.{self.group_by}" if self.group_by is not None else "source"
        axes.set_title(f"weights by {grouping}, inner steps {window[0]}–{window[1]}", fontsize=9)
        figure.tight_layout()
        experiment.add_figure("weights/distribution", figure, step, close=False)

    def _write_extremes(self, experiment: Any, step: int, window: tuple[int, int], tokenizer: Any) -> None:
        def decode(ids: list[int]) -> str:
            if not ids or tokenizer is None:
                return ""
            text = " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())
            return text if len(text) <= self.EXCERPT_CHARS else text[: self.EXCERPT_CHARS - 1] + "…"

        self.last_extremes = {
            end: [{**{k: v for k, v in row.items() if k not in ("first_action", "last_observation")},
                   "first_action": decode(row["first_action"]), "last_observation": decode(row["last_observation"])}
                  for row in rows]
            for end, rows in (("highest", self._highest), ("lowest", self._lowest))
        }
        group = self.group_by or "group"
        lines = [f"Rows of inner steps {window[0]}–{window[1]} by weight (rank zero's rows under DDP)."]
        if tokenizer is None:
            lines.append("No tokenizer on `trainer.datamodule`: no excerpts.")
        for end, rows in self.last_extremes.items():
            lines += ["", f"**{end.capitalize()} weights**", "",
                      f"| weight | source | {group} | reward | task | first agent turn | last observation |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {row['weight']:.3f} | {row['source']} | {_cell(row['group'])} | {row['reward']:.3g} | "
                      f"{_cell(row['task_id'])} | {_cell(row['first_action'])} | {_cell(row['last_observation'])} |"
                      for row in rows]
        experiment.add_text("weights/extremes", "\n".join(lines), step)


def _tokenizer(trainer: Trainer) -> Any:
    """The data module's tokenizer, if the run has a data module with one."""
    try:
        return getattr(trainer.datamodule, "tokenizer", None)
    except Exception:  # a tokenizer that fails to load lazily: the excerpts are optional
        return None


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


class TrajectoryWeightWriter(BasePredictionWriter):
    """Write every trajectory ``predict`` scored, with its weight, as a dataset: JSONL, Parquet or a saved HF dataset.

    One row per trajectory, in input order (split by split): every field of the input row as it was read (messages,
    reward, source, task_id, meta and any other field), then

    * ``row_id``: index of the row in its split's input (blank lines not counted);
    * ``split``: the data module's split the row came from (``real``, ``synthetic`` or ``predict``);
    * ``content_hash``: :func:`~boost_lightning.data.sources.content_hash` of its messages;
    * ``score``: the weighting's raw score (comparable across files scored with the same checkpoint);
    * ``weight``: the score normalised over the whole file to mean 1, the way the weighting normalises a batch: a
      per-trajectory loss weight as in weighted SFT, loss = Σᵢ wᵢℓᵢ / Σᵢ |wᵢ|;
    * ``features``: ``{name: value}``, the weighting's per-row inputs (the learned head's scalar features).

    With ``granularity: turn`` the weighting scores each assistant turn; a row then also carries ``turn_scores`` and
    ``turn_weights`` (one per turn, in order), its ``features`` map each name to the per-turn values, its ``score`` is
    the log-mean-exp of its turn scores, and its ``weight`` is the mean of its turn weights. The turn weights are the
    normalisation of every turn score of the file together (as a training batch of turns is normalised), all scaled
    by one constant so that the rows' weights have mean 1.

    ``source`` and ``task_id`` are filled in where the row has none; input fields named like the added ones are
    replaced. The result is itself a trajectory file (``--data.synthetic weights.parquet`` reads it, so does any
    trainer that takes a weight column), and :class:`~boost_lightning.weightings.FixedWeights` trains on its weights.
    Splits are the data module's ``predict_splits`` (``--data.predict train`` scores real and synthetic rows on one
    scale); without a :class:`~boost_lightning.data.datamodule.BoostDataModule` only the added fields are written.

    Under DDP every rank scores its shard; the rows are gathered and rank zero writes one complete file (into a
    temporary sibling, renamed into place).

    Args:
        output_path: Where to write. Default: ``weights.jsonl`` (``weights.parquet``, ``weights/``) under
            ``trainer.log_dir`` or ``default_root_dir``.
        format: ``jsonl``, ``parquet`` or ``dataset`` (a ``Dataset.save_to_disk`` directory). Default: from
            ``output_path``: ``.jsonl`` and ``.parquet`` by their suffix, any other path a dataset directory.
    """

    FORMATS = ("jsonl", "parquet", "dataset")
    DEFAULT_NAMES = {"jsonl": "weights.jsonl", "parquet": "weights.parquet", "dataset": "weights"}

    def __init__(self, output_path: str | None = None,
                 format: Literal["jsonl", "parquet", "dataset"] | None = None) -> None:
        # Rows are buffered per batch here rather than read from the loop's predictions, which strategies that
        # spawn processes (and ``return_predictions=False``) do not keep.
        super().__init__(write_interval="batch_and_epoch")
        if format is not None and format not in self.FORMATS:
            raise ValueError(f"format must be one of {', '.join(self.FORMATS)}, got {format!r}")
        self.output_path = output_path
        self.format = format
        self.written_to: Path | None = None
        self._rows: list[dict[str, Any]] = []

    def resolve_format(self, path: str | os.PathLike) -> str:
        """The format written to ``path``: ``format`` if given, else ``jsonl`` / ``parquet`` by suffix, else
        ``dataset``."""
        if self.format is not None:
            return self.format
        return {".jsonl": "jsonl", ".parquet": "parquet"}.get(Path(path).suffix, "dataset")

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self._rows.extend(prediction)

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        rows, self._rows = self._rows, []
        # `trainer.log_dir` broadcasts from rank zero: every rank must ask for it, before the others return.
        root = Path(trainer.log_dir or trainer.default_root_dir)
        path = Path(self.output_path) if self.output_path else root / self.DEFAULT_NAMES[self.format or "jsonl"]
        gathered: list[Any] = [rows]
        if trainer.world_size > 1:
            # One object gather per predict run; every rank must take part, rank zero writes.
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
        if not trainer.is_global_zero:
            return
        rows = self._with_originals([r for part in gathered for r in part], trainer.datamodule)
        if not rows:
            return
        if "turn_scores" in rows[0]:
            weights = self._turn_weights(rows, pl_module.weighting)
        else:
            weights = pl_module.weighting.normalize(torch.tensor([r["score"] for r in rows]),
                                                    torch.tensor([r["source"] == "synthetic" for r in rows]))
        for row, w in zip(rows, weights.tolist()):
            row["weight"] = w
            row["features"] = row.pop("features")  # the nested field last: easier to read in JSONL
        self._write(rows, path, self.resolve_format(path))
        self.written_to = path

    @staticmethod
    def _turn_weights(rows: list[dict[str, Any]], weighting: Any) -> torch.Tensor:
        """Each row's weight (the mean of its turn weights, mean 1 over the rows); sets each row's ``turn_weights``."""
        counts = [len(r["turn_scores"]) for r in rows]
        scores = torch.tensor([s for r in rows for s in r["turn_scores"]], dtype=torch.float64)
        synthetic = torch.tensor([r["source"] == "synthetic" for r, n in zip(rows, counts) for _ in range(n)])
        turns = weighting.normalize(scores, synthetic).double() if scores.numel() else scores
        row_weights = torch.stack([part.mean() if part.numel() else part.new_zeros(())
                                   for part in torch.split(turns, counts)])
        scale = row_weights.shape[0] / row_weights.sum().clamp(min=1e-30)
        for row, part in zip(rows, torch.split(turns * scale, counts)):
            row["turn_weights"] = part.tolist()
        return row_weights * scale

    @staticmethod
    def _with_originals(scored: list[dict[str, Any]], datamodule: Any) -> list[dict[str, Any]]:
        """The scored rows joined to their input rows, deduplicated and in input order."""
        splits = getattr(datamodule, "predict_splits", None)
        if not splits:
            return sorted({r["row_id"]: r for r in scored}.values(), key=lambda r: r["row_id"])
        # (source, row_id) alone is ambiguous under `predict=train` when the synthetic input holds real rows: the
        # content hash picks the one row it is.
        index: dict[tuple[str, int], list[tuple[str, str, dict[str, Any]]]] = defaultdict(list)
        for split in splits:
            for row_id, original in enumerate(read_rows(datamodule.specs[split], split)):
                source = original.get("source") or IMPLIED_SOURCE[split]
                index[source, row_id].append((split, content_hash(original["messages"]), original))
        joined: dict[tuple[int, int], dict[str, Any]] = {}
        for r in scored:
            matches = [m for m in index.get((r["source"], r["row_id"]), ())
                       if r.get("content_hash") in (None, m[1])]
            if not matches:
                raise RuntimeError(f"scored {r['source']} row {r['row_id']} matches no row of the inputs of "
                                   f"{', '.join(splits)}: did an input file change while predict ran?")
            split, digest, original = matches[0]
            row = dict(original)
            for name in ("source", "task_id"):
                if row.get(name) is None:
                    row[name] = r[name]
            row.update(row_id=r["row_id"], split=split, content_hash=digest, score=r["score"],
                       **{k: r[k] for k in ("turn_scores",) if k in r}, features=r["features"])
            joined[splits.index(split), r["row_id"]] = row
        return [joined[key] for key in sorted(joined)]

    @classmethod
    def _write(cls, rows: list[dict[str, Any]], path: Path, fmt: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "dataset":
            if path.is_file() or (path.is_dir() and any(path.iterdir())
                                  and not any((path / f).exists() for f in ("state.json", "dataset_dict.json"))):
                raise FileExistsError(f"{path}: exists and is not a saved dataset; not replacing it (choose another "
                                      f"output_path, or a .jsonl / .parquet one)")
            table = cls._arrow_table(rows)
            cache.write_dir_atomically(path, lambda tmp: Dataset(table).save_to_disk(str(tmp)), lambda _: False)
            return
        if fmt == "parquet":
            cache.write_file_atomically(path, lambda tmp: pq.write_table(cls._arrow_table(rows), tmp))
            return

        def write_jsonl(tmp: Path) -> None:
            with tmp.open("w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=str) + "\n")

        cache.write_file_atomically(path, write_jsonl)

    @classmethod
    def _arrow_table(cls, rows: list[dict[str, Any]]) -> pa.Table:
        """Columns in first-seen order, a field missing from a row written as null."""
        columns: dict[str, pa.Array] = {}
        for name in dict.fromkeys(k for row in rows for k in row):
            values = [row.get(name) for row in rows]
            try:
                array = pa.array(values)
                if cls._has_empty_struct(array.type):  # Parquet cannot store a struct without fields
                    raise pa.ArrowInvalid(f"{array.type}")
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                if all(v is None or v == {} for v in values):
                    array = pa.nulls(len(values))
                else:
                    rank_zero_warn(f"field {name!r} has values of mixed types: written as JSON strings")
                    array = pa.array([None if v is None else json.dumps(v, default=str) for v in values])
            columns[name] = array
        return pa.table(columns)

    @classmethod
    def _has_empty_struct(cls, kind: pa.DataType) -> bool:
        if pa.types.is_struct(kind):
            return kind.num_fields == 0 or any(cls._has_empty_struct(kind.field(i).type)
                                               for i in range(kind.num_fields))
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            return cls._has_empty_struct(kind.value_type)
        return False


class AlignmentWriter(Callback):
    """After training, scores every ``predict`` row (``--data.predict train``: real and synthetic) by the outer level's
    own signal at the trained policy and writes a weights file that
    :class:`~boost_lightning.weightings.FixedWeights` reads: select-then-retrain on the one-step alignment rather than
    on the head's weights.

    A row's ``alignment`` is ⟨P·v, ∇ℓᵢ⟩: v the gradient of the mean validation loss over the whole validation split,
    P the policy optimizer's Adam preconditioner, as in the first-order hypergradient (positive: a step on the row
    lowers the validation loss). Cost: one validation forward and backward, then two no-grad forwards of every scored
    row. Its ``score`` is the alignment and its ``weight`` its rank, 2·rank/(n + 1) (ordered as the alignment), so
    that ``top_fraction`` selects the best-aligned rows.

    Single process only: under data parallelism it warns and writes nothing.

    Args:
        output_path: Where to write (``.jsonl``, ``.parquet``, or a dataset directory). Default: ``alignment.jsonl``
            under ``trainer.log_dir`` or ``default_root_dir``.
        eps: Length of the forward-difference step along P·v.
        keep_real: Rank the synthetic rows among themselves (n = their count) and give every real row weight 2, above
            all of them, so that a selection never drops a trusted row. ``False``: every row competes on one scale.
    """

    def __init__(self, output_path: str | None = None, eps: float = 1e-2, keep_real: bool = True) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.output_path = output_path
        self.eps = eps
        self.keep_real = keep_real
        self.written_to: Path | None = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer, pl_module)

    def write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score and write now (``trainer`` must still hold the policy's optimizer, as at the end of ``fit``)."""
        from boost_lightning.bilevel.policy import row_alignment, validation_direction
        from boost_lightning.bilevel.preconditioner import adam_preconditioner

        if trainer.world_size > 1:
            rank_zero_warn("AlignmentWriter scores in a single process only; nothing written")
            return
        datamodule = trainer.datamodule
        datamodule.setup("predict")
        policy = pl_module.policy
        was_training = policy.training
        policy.eval()
        params = policy.trainable_named_parameters()
        optimizer = trainer.optimizers[0]
        precondition = adam_preconditioner(getattr(optimizer, "optimizer", optimizer), list(params.values()))

        def on_device(batch: Any) -> Any:
            return trainer.strategy.batch_to_device(batch, pl_module.device)

        direction = validation_direction(policy, params, [on_device(b) for b in datamodule.val_dataloader()],
                                         precondition)
        scored: list[dict[str, Any]] = []
        for batch in datamodule.predict_dataloader():
            batch = on_device(batch)
            values = row_alignment(policy, params, direction, [batch], self.eps).tolist()
            scored += [{**keys, "score": value, "features": {"alignment": value}}
                       for keys, value in zip(row_keys(batch), values)]
        policy.train(was_training)
        rows = TrajectoryWeightWriter._with_originals(scored, datamodule)
        weights = alignment_ranks([r["score"] for r in rows], [r["source"] == "synthetic" for r in rows],
                                  self.keep_real)
        for row, weight in zip(rows, weights):
            row["weight"] = weight
            row["features"] = row.pop("features")
        path = (Path(self.output_path) if self.output_path
                else Path(trainer.log_dir or trainer.default_root_dir) / "alignment.jsonl")
        TrajectoryWeightWriter._write(rows, path, TrajectoryWeightWriter().resolve_format(path))
        self.written_to = path


def rank_order(values: list[float]) -> list[int]:
    """Each value's rank, 1 for the lowest; ties ranked in input order."""
    ranks = [0] * len(values)
    for rank, i in enumerate(sorted(range(len(values)), key=values.__getitem__), start=1):
        ranks[i] = rank
    return ranks


def alignment_ranks(scores: list[float], synthetic: list[bool], keep_real: bool = True) -> list[float]:
    """:class:`AlignmentWriter`'s weights: 2·rank/(n + 1) by score (rank 1 the lowest); with ``keep_real`` the
    synthetic rows are ranked among themselves and every real row gets 2, above all of them."""
    ranked = [i for i in range(len(scores)) if synthetic[i] or not keep_real]
    weights = [2.0] * len(scores)
    for i, rank in zip(ranked, rank_order([scores[i] for i in ranked])):
        weights[i] = 2 * rank / (len(ranked) + 1)
    return weights
