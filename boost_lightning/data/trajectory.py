"""Trajectories: the row schema, its validation, and tokenization with agent-turn masks.

Row format (one JSON object per line, the HF/OpenAI chat "messages" convention)::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...],
     "reward": 1.0,                 # trajectory return; may be omitted when "rewards" is given (then its sum)
     "rewards": [0.0, 1.0],         # optional, one per assistant turn
     "source": "synthetic",         # optional, implied by the split; synthetic rows may not sit in real/validation
     "task_id": "maze-17",          # optional, default ""
     "meta": {"generator": "x"}}    # optional, carried through untouched

Rendering. With a chat template (``tokenizer.chat_template``) the conversation is rendered by the template. Without
one, by the plain role-tagged format: ``bos`` (if the tokenizer has one) then, for every message,
``f"{role}:\\n{content}{eos}\\n"``; ``eos`` is the end-of-turn token of every message.

Token ownership. The rendered text is tokenized once with character offsets. A token belongs to the message whose
content holds the token's first non-whitespace character (its first character when it is all whitespace), so
``" Hello"`` straddling a ``"assistant:"`` header and the content ``"Hello"`` belongs to the content. Tokens anchored
in template glue (role headers, separators) belong to no message.

Masks.
    * agent (``labels``): every token of every assistant content, plus its end-of-turn token, which is the first
      special token after the content (whitespace-only tokens skipped): ``<|im_end|>`` in ChatML, ``<|eot_id|>`` in
      Llama 3, ``eos`` in the plain format. Nothing else: not ``<|im_start|>assistant\\n``, not the newline after
      ``<|im_end|>``. No ``{% generation %}`` tags needed.
    * observation (``obs_mask``): tokens of user and tool contents, what the environment said.

Truncation to ``max_length`` tokens (explicit, in this order):
    1. Drop whole exchanges from the start, earliest first, until the row fits; leading system messages stay. An
       exchange is a run of user/tool messages together with the assistant messages answering them. At least the
       last exchange is kept.
    2. If it still does not fit, cut the tail.
    A row left with no agent token has nothing to train on: ``encode_batch`` returns ``None`` for it and the loader
    raises (or drops it with ``drop_truncated=True``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from numbers import Real
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
SOURCES = ("real", "synthetic")
# The source a row gets when it has none; also the split's allowed sources (real, validation and test: real only).
IMPLIED_SOURCE = {"real": "real", "validation": "real", "test": "real", "synthetic": "synthetic",
                  "predict": "synthetic"}
OBSERVATION_ROLES = ("user", "tool")
IGNORE_INDEX = -100


class TrajectoryFormatError(ValueError):
    """Input that breaks the data contract; the message names the file, the line (or row) and the field."""


def _fail(where: str, field_name: str, problem: str) -> None:
    raise TrajectoryFormatError(f"{where}: field '{field_name}': {problem}")


def _finite(where: str, field_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        _fail(where, field_name, f"expected a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        _fail(where, field_name, f"not a finite number: {_short(value)}")
    return number


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_text(where: str, field_name: str, value: str) -> None:
    # JSON may spell lone UTF-16 surrogates (\ud800): valid in a python str, but not UTF-8, which tokenizers and
    # arrow need.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        _fail(where, field_name, f"not valid unicode text ({error.reason} at character {error.start})")


@dataclass(frozen=True)
class Trajectory:
    """One validated row of the data contract (see the module docstring)."""

    messages: list[dict[str, str]]
    reward: float
    source: str
    rewards: list[float] | None = None
    task_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        """Number of assistant turns."""
        return sum(m["role"] == "assistant" for m in self.messages)

    @classmethod
    def from_dict(cls, row: Any, *, where: str, split: str) -> Trajectory:
        """Validate a decoded row.

        Args:
            row: The decoded JSON object (or HF dataset row).
            where: ``"file:line"`` (or ``"name (row i)"``), the prefix of every error message.
            split: ``real``, ``synthetic``, ``validation`` or ``predict``; gives the implied source and the
                allowed ones.

        Raises:
            TrajectoryFormatError: naming ``where`` and the offending field.
        """
        if not isinstance(row, dict):
            raise TrajectoryFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
        messages = row.get("messages")
        if messages is None:
            _fail(where, "messages", "missing")
        if not isinstance(messages, list) or not messages:
            _fail(where, "messages", "expected a non-empty list of {'role', 'content'} objects")
        clean = []
        for i, message in enumerate(messages):
            name = f"messages[{i}]"
            if not isinstance(message, dict):
                _fail(where, name, f"expected an object with 'role' and 'content', got {type(message).__name__}")
            role, content = message.get("role"), message.get("content")
            if role is None:
                _fail(where, f"{name}.role", "missing")
            if role not in ROLES:
                _fail(where, f"{name}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
            if content is None:
                _fail(where, f"{name}.content", "missing")
            if not isinstance(content, str):
                _fail(where, f"{name}.content", f"expected a string, got {type(content).__name__}")
            if not content.strip():
                _fail(where, f"{name}.content", "empty content")
            _check_text(where, f"{name}.content", content)
            clean.append({"role": role, "content": content})
        num_turns = sum(m["role"] == "assistant" for m in clean)
        if num_turns == 0:
            _fail(where, "messages", "no assistant turn (assistant turns are the only tokens trained on)")

        rewards = row.get("rewards")
        if rewards is not None:
            if not isinstance(rewards, list):
                _fail(where, "rewards", f"expected a list of numbers, got {type(rewards).__name__}")
            if len(rewards) != num_turns:
                _fail(where, "rewards", f"{len(rewards)} values for {num_turns} assistant turns")
            rewards = [_finite(where, f"rewards[{i}]", r) for i, r in enumerate(rewards)]
        reward = row.get("reward")
        if reward is None:
            if rewards is None:
                _fail(where, "reward", "missing")
            reward = sum(rewards)
        reward = _finite(where, "reward", reward)

        implied = IMPLIED_SOURCE[split]
        source = row.get("source")
        if source is None:
            source = implied
        elif source not in SOURCES:
            _fail(where, "source", f"unknown source {source!r} (expected one of {', '.join(SOURCES)})")
        elif source == "synthetic" and implied == "real":
            _fail(where, "source", f"a synthetic row in the {split} split (it must hold real rows only)")

        task_id = row.get("task_id")
        if task_id is None:
            task_id = ""
        elif isinstance(task_id, int) and not isinstance(task_id, bool):
            task_id = str(task_id)
        elif not isinstance(task_id, str):
            _fail(where, "task_id", f"expected a string, got {type(task_id).__name__}")
        _check_text(where, "task_id", task_id)
        meta = row.get("meta")
        if meta is None:
            meta = {}
        elif not isinstance(meta, dict):
            _fail(where, "meta", f"expected an object, got {type(meta).__name__}")
        return cls(clean, reward, source, rewards, task_id, meta)


@dataclass
class EncodedTrajectory:
    """Token ids and per-token masks of one rendered conversation (numpy arrays of equal length)."""

    input_ids: np.ndarray
    turn_ids: np.ndarray
    agent_mask: np.ndarray
    obs_mask: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_turns(self) -> int:
        """Assistant turns with at least one agent token."""
        return len(np.unique(self.turn_ids[self.agent_mask]))

    def cut(self, length: int) -> EncodedTrajectory:
        """The first ``length`` tokens."""
        return EncodedTrajectory(
            self.input_ids[:length], self.turn_ids[:length], self.agent_mask[:length], self.obs_mask[:length], True
        )

    def to_row(self) -> dict[str, Any]:
        """The per-row fields of the batch contract (python lists and ints, ready for arrow)."""
        agent = self.agent_mask
        return {
            "input_ids": self.input_ids.tolist(),
            "attention_mask": [1] * len(self.input_ids),
            "labels": np.where(agent, self.input_ids, IGNORE_INDEX).tolist(),
            "turn_ids": self.turn_ids.tolist(),
            "obs_mask": self.obs_mask.tolist(),
            "num_agent_tokens": int(agent.sum()),
            "num_turns": self.num_turns,
            "length": len(self.input_ids),
        }


# Private-use code points: no tokenizer template trims, escapes or matches them.
_PROBE = "\ue000{}\ue001"
_PROBE_RE = re.compile("\ue000(\\d+)\ue001")
_WHITESPACE = np.zeros(0x3001, dtype=bool)
_WHITESPACE[[c for c in range(0x3001) if chr(c).isspace()]] = True
_ROLE_CODE = {role: i for i, role in enumerate(ROLES)}
_ASSISTANT = _ROLE_CODE["assistant"]
# Indexed by role code + 1 (code -1: template glue).
_IS_OBSERVATION = np.array([False] + [role in OBSERVATION_ROLES for role in ROLES])


def _next_non_space(text: str) -> np.ndarray:
    """``out[i]`` = index of the first non-whitespace character at or after ``i`` (``len(text)`` if none)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n = len(codes)
    space = _WHITESPACE[np.minimum(codes, len(_WHITESPACE) - 1)] & (codes < len(_WHITESPACE))
    index = np.where(space, n, np.arange(n))
    out = np.empty(n + 1, dtype=np.int64)
    out[:n] = np.minimum.accumulate(index[::-1])[::-1]
    out[n] = n
    return out


class TrajectoryEncoder:
    """Renders and tokenizes conversations with agent/observation masks and truncation (see the module docstring).

    Args:
        tokenizer: A fast HF tokenizer (token offsets map tokens to messages).
        max_length: Longest encoded row in tokens; ``None`` = never truncate.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: token offsets are needed for masks")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_template = bool(getattr(tokenizer, "chat_template", None))
        if not self.use_template and tokenizer.eos_token is None:
            raise ValueError("a tokenizer without chat template needs an eos token to end turns (plain format)")
        from tokenizers import Tokenizer

        # A private copy with padding/truncation off: the loaded tokenizer may carry them in its state.
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        special = set(tokenizer.all_special_ids)
        special |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
        self._is_special = np.zeros(max([self._backend.get_vocab_size(), *special]) + 1, dtype=bool)
        self._is_special[sorted(special)] = True
        self._probe_cache: dict[tuple[str, ...], str] = {}

    def encode(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """Encode one conversation into the per-row fields of the batch contract.

        Raises:
            ValueError: every agent token was truncated away.
        """
        (encoded,) = self.encode_batch([messages])
        if encoded is None:
            raise ValueError(f"every agent token is truncated away at max_length={self.max_length}")
        return encoded.to_row()

    def encode_batch(
        self, conversations: Sequence[list[dict[str, str]]], where: Sequence[str] | None = None
    ) -> list[EncodedTrajectory | None]:
        """Encode validated conversations; ``None`` for a row whose agent tokens were all truncated away.

        Args:
            conversations: Lists of ``{"role", "content"}`` messages, already validated.
            where: Row labels for error messages (``file:line``).
        """
        where = list(where) if where is not None else [f"row {i}" for i in range(len(conversations))]
        keep = [list(range(len(c))) for c in conversations]
        out: list[EncodedTrajectory | None] = list(self._encode(list(conversations), keep, where))
        if self.max_length is not None:
            rows = [i for i, encoded in enumerate(out) if len(encoded) > self.max_length]
            cut = self._truncate([conversations[i] for i in rows], [out[i] for i in rows], [where[i] for i in rows])
            for i, encoded in zip(rows, cut):
                out[i] = encoded
        return out

    def _truncate(
        self, conversations: list[list[dict[str, str]]], full: list[EncodedTrajectory], where: list[str]
    ) -> list[EncodedTrajectory | None]:
        """Apply the truncation policy to rows longer than ``max_length`` (encoded in full as ``full``)."""
        plans = []  # per row: indices of the leading system messages, first message of each exchange, exchanges to drop
        for messages, encoded in zip(conversations, full):
            system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
            starts = [
                i
                for i in range(system, len(messages))
                if i == system or (messages[i]["role"] != "assistant" and messages[i - 1]["role"] == "assistant")
            ]
            # Guess how many exchanges to drop from where each one's first token sits in the full encoding; exact
            # when the template renders message by message, and checked by re-encoding either way.
            first = [int(np.argmax(encoded.turn_ids == s)) for s in starts]
            excess = len(encoded) - self.max_length
            drop = next((k for k in range(1, len(starts)) if first[k] - first[0] >= excess), len(starts) - 1)
            plans.append([system, starts, drop])
        out: list[EncodedTrajectory | None] = list(full)
        pending = [i for i, (_, starts, _) in enumerate(plans) if len(starts) > 1]
        while pending:
            keeps = []
            for i in pending:
                system, starts, drop = plans[i]
                keeps.append(list(range(system)) + list(range(starts[drop], len(conversations[i]))))
            candidates = self._encode(
                [[conversations[i][m] for m in keep] for i, keep in zip(pending, keeps)],
                keeps,
                [where[i] for i in pending],
            )
            still = []
            for i, candidate in zip(pending, candidates):
                out[i] = candidate
                if len(candidate) > self.max_length and plans[i][2] < len(plans[i][1]) - 1:
                    plans[i][2] += 1
                    still.append(i)
            pending = still
        for i, encoded in enumerate(out):
            if len(encoded) > self.max_length:
                encoded = encoded.cut(self.max_length)
            encoded.truncated = True
            out[i] = encoded if encoded.agent_mask.any() else None
        return out

    def _render(self, conversations: list[list[dict[str, str]]], where: list[str]) -> list[tuple[str, list]]:
        """Rendered text and the character span of every message's content."""
        if not self.use_template:
            return [self._render_plain(c) for c in conversations]
        try:
            texts = self._apply_template(conversations)
            probe_texts = self._probe_texts(conversations)
        except Exception:
            for i, conversation in enumerate(conversations):
                try:
                    self._apply_template([conversation])
                except Exception as error:
                    raise TrajectoryFormatError(f"{where[i]}: the chat template rejects this row: {error}") from error
            raise
        return [
            (text, self._locate(text, probe, c, w))
            for text, probe, c, w in zip(texts, probe_texts, conversations, where)
        ]

    def _probe_texts(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        # The placeholder rendering depends on the role sequence only: render each sequence once.
        keys = [tuple(m["role"] for m in c) for c in conversations]
        missing = list(dict.fromkeys(k for k in keys if k not in self._probe_cache))
        probes = [[{"role": role, "content": _PROBE.format(i)} for i, role in enumerate(k)] for k in missing]
        if len(self._probe_cache) > 100_000:
            self._probe_cache.clear()
        self._probe_cache.update(zip(missing, self._apply_template(probes) if probes else []))
        return [self._probe_cache[k] for k in keys]

    def _apply_template(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        return self.tokenizer.apply_chat_template(conversations, tokenize=False)

    def _render_plain(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        parts = [self.tokenizer.bos_token or ""]
        position, spans = len(parts[0]), []
        for m in messages:
            header = f"{m['role']}:\n"
            start = position + len(header)
            spans.append((start, start + len(m["content"])))
            parts += [header, m["content"], self.tokenizer.eos_token + "\n"]
            position = spans[-1][1] + len(parts[-1])
        return "".join(parts), spans

    @staticmethod
    def _locate(text: str, probe: str, messages: list[dict[str, str]], where: str) -> list[tuple[int, int]]:
        # The template rendered with placeholder contents gives the glue around each content exactly; when pasting
        # the real contents into it reproduces the real rendering, the spans are known without any searching.
        marks = list(_PROBE_RE.finditer(probe))
        glue: list[str] = []
        if [int(m.group(1)) for m in marks] == list(range(len(messages))):
            position, length, spans, pieces = 0, 0, [], []
            for mark, message in zip(marks, messages):
                glue.append(probe[position : mark.start()])
                pieces += [glue[-1], message["content"]]
                spans.append((length + len(glue[-1]), length + len(glue[-1]) + len(message["content"])))
                length = spans[-1][1]
                position = mark.end()
            if "".join(pieces) + probe[position:] == text:
                return spans
        # The template rewrites contents (strips them, say): find each one in order after its glue.
        cursor, spans = 0, []
        for i, message in enumerate(messages):
            if i < len(glue) and text.startswith(glue[i], cursor):
                cursor += len(glue[i])
            for content in (message["content"], message["content"].strip()):
                start = text.find(content, cursor)
                if start >= 0:
                    break
            else:
                _fail(where, f"messages[{i}].content", "the chat template does not render this content verbatim")
            spans.append((start, start + len(content)))
            cursor = start + len(content)
        return spans

    def _encode(
        self, conversations: list[list[dict[str, str]]], keep: list[list[int]], where: list[str]
    ) -> list[EncodedTrajectory]:
        """``keep[i][k]``: index in the original row of message ``k`` of ``conversations[i]`` (for turn ids)."""
        rendered = self._render(conversations, where)
        encodings = self._backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        out = []
        for (text, spans), encoding, messages, turn_index in zip(rendered, encodings, conversations, keep):
            n = len(encoding.ids)
            ids = np.array(encoding.ids, dtype=np.int64)
            offsets = np.fromiter(chain.from_iterable(encoding.offsets), dtype=np.int64, count=2 * n).reshape(n, 2)
            start, end = offsets[:, 0], offsets[:, 1]
            first = _next_non_space(text)[start]
            anchor = np.where(first < end, first, start)
            owner_of_char = np.full(len(text) + 1, -1, dtype=np.int64)
            for k, (lo, hi) in enumerate(spans):
                owner_of_char[lo:hi] = k
            owner = np.where(end > start, owner_of_char[anchor], -1)
            roles = np.array([_ROLE_CODE[m["role"]] for m in messages] + [-1])
            turns = np.array(turn_index + [-1])
            role = roles[owner]  # owner -1 picks the trailing -1
            turn_ids = turns[owner]
            agent = role == _ASSISTANT
            obs = _IS_OBSERVATION[role + 1]
            # End-of-turn token: the first special token after the content, past whitespace-only glue tokens.
            # Owners rise along the text, so the last token of message k is found by binary search.
            owned = np.flatnonzero(owner >= 0)
            assistants = np.flatnonzero(roles[:-1] == _ASSISTANT) if len(owned) else np.zeros(0, dtype=np.int64)
            last = owned[np.searchsorted(owner[owned], assistants, side="right") - 1]
            special = self._is_special[ids]
            blank = first >= end
            for k, j in zip(assistants, last + 1):
                if owner[j - 1] != k:
                    continue
                while j < n and owner[j] == -1 and blank[j] and not special[j]:
                    j += 1
                if j < n and owner[j] == -1 and special[j]:
                    agent[j] = True
                    turn_ids[j] = turns[k]
            out.append(EncodedTrajectory(ids, turn_ids, agent, obs))
        return out
