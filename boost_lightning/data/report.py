"""The data report: rows, turns, token lengths and truncation per split, per source and per generator.

Built from the per-row statistics that tokenization gathers (:data:`~boost_lightning.data.sources.ROW_STATS`):
either those of a loaded split (``LoadedSplit.row_stats``) or :func:`~boost_lightning.data.sources.split_row_stats`,
which tokenizes in memory and writes nothing. Token lengths are measured before truncation, so a p99 above
``max_length`` shows how much of a source gets cut. Plain Python: no lightning import.

``python main.py fit --config ... --data.report_only true`` prints the report and stops; a normal ``fit`` writes it
to TensorBoard as text (``data/report``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SPLIT_ORDER = ("real", "synthetic", "validation", "test", "predict")
#: Explains the columns under the table.
LEGEND = (
    "Token lengths are counted before truncation (nearest-rank percentiles). truncated: rows longer than max_length, "
    "which lose their earliest exchanges (system messages kept). emptied: truncated rows left without an agent "
    "token (an error, or dropped with --data.drop_truncated true). agent tokens lost: agent tokens cut by "
    "truncation, emptied rows' included, with their share of the group's agent tokens."
)


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value with at least ``q`` % of ``values`` at or below it.

    Args:
        values: Non-empty numbers.
        q: Percent, in (0, 100].
    """
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class GroupStats:
    """One line of the report: the rows of one split, one source and, optionally, one ``meta.generator``.

    Attributes:
        split: ``real``, ``synthetic``, ``validation`` or ``predict``.
        source: ``real``, ``synthetic`` or ``all`` (a split holding both).
        generator: The ``meta.generator`` value; ``None`` for the whole source, ``"(none)"`` for rows without one.
        rows: Rows in the group.
        turns: Assistant turns, summed over the rows.
        max_turns: Most assistant turns in one row.
        length_p50: Median row length in tokens, before truncation.
        length_p90: 90th percentile.
        length_p99: 99th percentile.
        length_max: Longest row.
        truncated: Rows longer than ``max_length``.
        emptied: Truncated rows left without an agent token.
        agent_tokens: Agent tokens before truncation.
        agent_tokens_lost: Agent tokens cut by truncation.
    """

    split: str
    source: str
    generator: str | None
    rows: int
    turns: int
    max_turns: int
    length_p50: int
    length_p90: int
    length_p99: int
    length_max: int
    truncated: int
    emptied: int
    agent_tokens: int
    agent_tokens_lost: int

    @classmethod
    def of(cls, split: str, source: str, generator: str | None, stats: Mapping[str, Sequence],
           rows: Sequence[int], max_length: int) -> GroupStats:
        """Aggregate the rows ``rows`` (indices into the columns of ``stats``)."""
        lengths = [stats["length"][i] for i in rows]
        turns = [stats["turns"][i] for i in rows]
        agent = [stats["agent_tokens"][i] for i in rows]
        lost = [stats["agent_tokens_lost"][i] for i in rows]
        return cls(
            split=split, source=source, generator=generator, rows=len(rows), turns=sum(turns), max_turns=max(turns),
            length_p50=percentile(lengths, 50), length_p90=percentile(lengths, 90),
            length_p99=percentile(lengths, 99), length_max=max(lengths),
            truncated=sum(n > max_length for n in lengths), emptied=sum(a > 0 and a == x for a, x in zip(agent, lost)),
            agent_tokens=sum(agent), agent_tokens_lost=sum(lost),
        )  # fmt: skip


@dataclass(frozen=True)
class DataReport:
    """The report of several splits: one :class:`GroupStats` per split, source and generator.

    Attributes:
        max_length: The truncation length the rows were measured against.
        groups: In split order (real, synthetic, validation, test, predict); within a split, an ``all`` line when it
            holds both sources, then each source followed by its generators (sorted; only when some row names one).
    """

    max_length: int
    groups: tuple[GroupStats, ...]

    @classmethod
    def from_row_stats(cls, stats: Mapping[str, Mapping[str, Sequence]], max_length: int) -> DataReport:
        """Build the report from each split's :data:`~boost_lightning.data.sources.ROW_STATS`.

        Args:
            stats: Split name to its per-row statistics.
            max_length: The truncation length used to gather them.
        """
        groups: list[GroupStats] = []
        for split in sorted(stats, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER)):
            columns = stats[split]
            indices = range(len(columns["length"]))
            by_source = {name: [i for i in indices if bool(columns["synthetic"][i]) == (name == "synthetic")]
                         for name in ("real", "synthetic")}
            by_source = {name: rows for name, rows in by_source.items() if rows}
            if len(by_source) > 1:
                groups.append(GroupStats.of(split, "all", None, columns, list(indices), max_length))
            for source, rows in by_source.items():
                groups.append(GroupStats.of(split, source, None, columns, rows, max_length))
                names = [columns["generator"][i] for i in rows]
                if any(name is not None for name in names):
                    for name in sorted({"(none)" if n is None else n for n in names}):
                        members = [i for i, n in zip(rows, names) if ("(none)" if n is None else n) == name]
                        groups.append(GroupStats.of(split, source, name, columns, members, max_length))
        return cls(max_length, tuple(groups))

    def group(self, split: str, source: str, generator: str | None = None) -> GroupStats:
        """The line of ``split`` / ``source`` (``all`` for a split with both) / ``generator``.

        Raises:
            KeyError: no such line.
        """
        for g in self.groups:
            if (g.split, g.source, g.generator) == (split, source, generator):
                return g
        raise KeyError((split, source, generator))

    def to_markdown(self) -> str:
        """The report as a title, a markdown table (columns aligned, readable as plain text too) and a legend."""
        header = ["split", "source", "generator", "rows", "turns (mean / max)", "tokens p50", "p90", "p99", "max",
                  "truncated", "emptied", "agent tokens lost"]
        lines = [[g.split, g.source, g.generator or "", f"{g.rows:,}", f"{g.turns / g.rows:.1f} / {g.max_turns}",
                  f"{g.length_p50:,}", f"{g.length_p90:,}", f"{g.length_p99:,}", f"{g.length_max:,}",
                  f"{g.truncated:,} ({g.truncated / g.rows:.0%})", f"{g.emptied:,}",
                  f"{g.agent_tokens_lost:,} ({g.agent_tokens_lost / max(g.agent_tokens, 1):.1%})"]
                 for g in self.groups]
        widths = [max(len(row[k]) for row in [header, *lines]) for k in range(len(header))]
        left = 3  # text columns; the numbers are right-aligned

        def render(cells: list[str]) -> str:
            padded = [c.ljust(w) if k < left else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths))]
            return "| " + " | ".join(padded) + " |"

        rule = "|" + "|".join("-" * (w + 1) + (":" if k >= left else "-") for k, w in enumerate(widths)) + "|"
        table = "\n".join([render(header), rule, *(render(line) for line in lines)])
        return f"Data report (max_length={self.max_length} tokens)\n\n{table}\n\n{textwrap.fill(LEGEND, 120)}\n"

    def __str__(self) -> str:
        return self.to_markdown()
