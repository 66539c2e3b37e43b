"""Maze: walk a fixed 5x5 text maze from a start cell to a goal cell, seeing only the walls around you.

Cells are named like a chess board: columns ``a..e`` from west to east, rows ``1..5`` from south to north (``a1`` is
the south-west corner); internally a cell is ``(row, col)`` with row 0 the northern row. Every observation gives the
position, the goal and the blocked directions (border or wall cell). An
instance is a (start, goal) pair of open cells at least two moves apart; the real layout's pairs are split into
disjoint train / validation / eval pools. Rewards: ``-0.05`` per move, ``-0.1`` for a bump or an unparseable move,
``+1`` on reaching the goal.
"""

from __future__ import annotations

import random
from collections import deque
from functools import cache
from typing import Any

from boost_lightning.envs.base import Env, HallucinationMixin, TaskSpec, pool_index, seed_split, split_instances, words

Cell = tuple[int, int]

REAL_LAYOUT = (
    "...#.",
    ".#...",
    ".#.#.",
    "...#.",
    "#....",
)
# Other mazes, same size and wording: benign diversity, since the moves are still chosen from the walls the agent is
# told about, the skill the real task needs.
OTHER_LAYOUTS = {
    "mirror": tuple(row[::-1] for row in REAL_LAYOUT),
    "rooms": (
        "..#..",
        ".....",
        ".#.#.",
        ".#...",
        "...#.",
    ),
}
DIRECTIONS: dict[str, Cell] = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
_SYNONYMS = {"north": "north", "up": "north", "south": "south", "down": "south", "east": "east", "right": "east",
             "west": "west", "left": "west"}
_LETTERS = {"n": "north", "s": "south", "e": "east", "w": "west", "u": "north", "d": "south", "r": "east",
            "l": "west"}
_INVALID = "Invalid move. Reply: move north, south, east or west."


def fmt(cell: Cell, rows: int = 5) -> str:
    """A cell as the observations name it: ``(0, 0)`` of a 5-row maze is ``a5``."""
    return f"{'abcdefghij'[cell[1]]}{rows - cell[0]}"


class Layout:
    """An immutable grid with precomputed shortest-path distances to every goal."""

    def __init__(self, rows: tuple[str, ...]) -> None:
        self.rows = rows
        self.size = (len(rows), len(rows[0]))
        self.open = [(r, c) for r in range(self.size[0]) for c in range(self.size[1]) if rows[r][c] == "."]
        self._open = set(self.open)
        self.dist = {goal: self._bfs(goal) for goal in self.open}
        self.pairs = [(s, g) for g in self.open for s in self.open if self.dist[g].get(s, 0) >= 2]

    def is_open(self, cell: Cell) -> bool:
        return cell in self._open

    def neighbour(self, cell: Cell, direction: str) -> Cell:
        dr, dc = DIRECTIONS[direction]
        return cell[0] + dr, cell[1] + dc

    def blocked(self, cell: Cell) -> list[str]:
        return [d for d in DIRECTIONS if not self.is_open(self.neighbour(cell, d))]

    def _bfs(self, goal: Cell) -> dict[Cell, int]:
        dist = {goal: 0}
        queue = deque([goal])
        while queue:
            cell = queue.popleft()
            for d in DIRECTIONS:
                nxt = self.neighbour(cell, d)
                if self.is_open(nxt) and nxt not in dist:
                    dist[nxt] = dist[cell] + 1
                    queue.append(nxt)
        return dist


@cache
def get_layout(rows: tuple[str, ...]) -> Layout:
    """The (cached) :class:`Layout` of ``rows``."""
    return Layout(rows)


@cache
def _real_pools() -> dict[str, list[int]]:
    return split_instances(len(get_layout(REAL_LAYOUT).pairs), "maze")


def parse_move(text: str) -> tuple[str | None, str]:
    """Read one direction out of free text: ``"Move North!"``, ``"go up"``, ``"w"``.

    Returns:
        ``(direction, "")`` or ``(None, explanation)`` when there is no direction or more than one.
    """
    tokens = words(text)
    found = {_SYNONYMS[t] for t in tokens if t in _SYNONYMS}
    # Single letters only count when they are the whole move, since "it's" or "don't" also yield one-letter words.
    if not found and tokens and tokens[-1] in _LETTERS and all(t in ("move", "go", "walk") for t in tokens[:-1]):
        found = {_LETTERS[tokens[-1]]}
    if len(found) == 1:
        return found.pop(), ""
    if found:
        return None, "One move per turn. Reply: move north, south, east or west."
    return None, _INVALID


class MazeEnv(Env):
    """Navigate a 5x5 maze with partial observation.

    Args:
        layout: Rows of ``.`` (open) and ``#`` (wall); default: the real layout.
        max_turns: Agent turns before the episode ends unsolved (default 12).
    """

    task = "maze"
    default_max_turns = 12

    def __init__(self, layout: tuple[str, ...] | list[str] = REAL_LAYOUT, max_turns: int | None = None) -> None:
        super().__init__(max_turns)
        self.layout = get_layout(tuple(layout))
        # Only the real layout is split into pools; other layouts only ever feed the synthetic pool.
        self._pools = _real_pools() if self.layout.rows == REAL_LAYOUT else None
        self.pos: Cell = (0, 0)
        self.start: Cell = (0, 0)
        self.goal: Cell = (0, 0)

    @property
    def system_prompt(self) -> str:
        rows, cols = self.layout.size
        corner = fmt((0, cols - 1), rows)
        return (f"A {rows}x{cols} maze, cells a1 (south-west) to {corner} (north-east). Reach the goal. "
                "Reply: move north, south, east or west.")

    @property
    def instance(self) -> dict[str, Any]:
        rows = self.layout.size[0]
        return {"start": fmt(self.start, rows), "goal": fmt(self.goal, rows), "layout": list(self.layout.rows)}

    def _setup(self, seed: int) -> None:
        if self._pools is not None:
            pool = self._pools[seed_split(seed)]
            index = pool[pool_index(seed, len(pool))]
        else:
            index = random.Random(f"maze-instance/{seed}").randrange(len(self.layout.pairs))
        self.start, self.goal = self.layout.pairs[index]
        self.pos = self.start

    def _where(self, walls: list[str] | None = None) -> str:
        # The goal is restated every turn, as agent environments restate the task: the policy's move depends on what
        # it sees now, not on recalling the first message across the episode.
        walls = self.layout.blocked(self.pos) if walls is None else walls
        rows = self.layout.size[0]
        return f"At {fmt(self.pos, rows)}. Goal {fmt(self.goal, rows)}. Walls: {', '.join(walls) if walls else 'none'}."

    def _first_observation(self) -> str:
        return self._where()

    def _parse(self, text: str) -> tuple[str | None, str]:
        direction, error = parse_move(text)
        return direction, (f"{error} {self._where()}" if direction is None else "")

    def _apply(self, action: str) -> tuple[str, float, bool]:
        nxt = self.layout.neighbour(self.pos, action)
        if not self.layout.is_open(nxt):
            return f"Blocked. {self._where()}", -self.invalid_penalty, False
        self.pos = nxt
        if self.pos == self.goal:
            self.success = True
            return "You reached the goal!", self.success_reward, True
        return self._where(), -self.step_cost, True

    def expert_action(self) -> str:
        dist = self.layout.dist[self.goal]
        best = None
        for d in DIRECTIONS:
            nxt = self.layout.neighbour(self.pos, d)
            if nxt in dist and (best is None or dist[nxt] < dist[self.layout.neighbour(self.pos, best)]):
                best = d
        return f"move {best or 'north'}"

    def random_action(self, rng: random.Random) -> str:
        return f"move {rng.choice(list(DIRECTIONS))}"

    def optimal_turns(self) -> int:
        return self.layout.dist[self.goal][self.start]


_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


class SwappedMovesMazeEnv(MazeEnv):
    """The real maze where every move word means its opposite (``move north`` goes south), same rules text.

    A conflicting task shift: its expert succeeds, with honest rewards, by saying the opposite of what the real task
    needs, and its observations read exactly like the real ones.
    """

    def _parse(self, text: str) -> tuple[str | None, str]:
        direction, error = super()._parse(text)
        return (_OPPOSITE[direction], error) if direction is not None else (None, error)

    def expert_action(self) -> str:
        return f"move {_OPPOSITE[super().expert_action().split()[-1]]}"


class HallucinatingMazeEnv(HallucinationMixin, MazeEnv):
    """A maze simulator that sometimes makes things up, the way an LLM playing the environment does.

    On a corrupted turn it teleports the agent to another cell, announces the goal early, or lists the wrong walls;
    afterwards it stays consistent with what it said (its position follows its own reply). One turn before the
    expert would finish is always corrupted, so every trajectory disagrees with the true maze somewhere.

    Args:
        rate: Probability that any other turn is corrupted too.
        max_turns: Agent turns before the episode ends unsolved.
    """

    def _forced_turns(self) -> int:
        return self.optimal_turns()

    def _apply(self, action: str) -> tuple[str, float, bool]:
        if not (self.turns - 1 == self._forced or self._rng.random() < self.rate):
            return super()._apply(action)
        true_next = self.layout.neighbour(self.pos, action)
        if not self.layout.is_open(true_next):
            true_next = self.pos
        kinds = ["teleport"] if true_next == self.goal else ["teleport", "teleport", "false_goal", "walls"]
        kind = self._rng.choice(kinds)
        self.corrupted_turns.append(self.turns - 1)
        if kind == "false_goal":
            self.pos = true_next
            self.success = True
            return "You reached the goal!", self.success_reward, True
        if kind == "walls":
            self.pos = true_next
            true_walls = self.layout.blocked(self.pos)
            flip = self._rng.choice(list(DIRECTIONS))
            walls = [d for d in DIRECTIONS if (d in true_walls) != (d == flip)]
            return self._where(walls), -self.step_cost, True
        self.pos = self._rng.choice([c for c in self.layout.open if c not in (true_next, self.goal)])
        return self._where(), -self.step_cost, True


SPEC = TaskSpec(
    name="maze",
    env=MazeEnv,
    conflicting={"swapped-moves": SwappedMovesMazeEnv},
    benign={f"layout-{name}": (lambda rows=rows: MazeEnv(rows)) for name, rows in OTHER_LAYOUTS.items()},
    hallucinating=HallucinatingMazeEnv,
    disjoint_instances=True,
)
