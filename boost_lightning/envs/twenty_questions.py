"""Twenty questions: find the secret object of a 64 x 26 table by yes/no attribute questions, then name it.

Actions are ``ask: is it an animal?`` (any wording that mentions exactly one attribute's keyword) and ``answer: cat``.
The oracle answers ``Yes.`` / ``No.`` from the table. The expert asks the question that splits the objects still
consistent with the answers most evenly (ties: attribute order) and names the object once one is left: about 6
questions. An instance is the secret object; every split draws from all 64 objects (an object never seen in training
cannot be named). Rewards: ``-0.05`` per question, ``-0.2`` per wrong answer, ``-0.1`` when unparseable, ``+1`` when
right.

The conflicting variant plays the same game against a different world: the same objects and questions, with a fifth
of the table's answers flipped, so its trajectories read fine but pair answers with the wrong objects. The benign
variant is the real game with the expert's turns worded in other ways (``question: is it an animal?``, ``my answer:
cat``): the same correct decisions in another surface form.
"""

from __future__ import annotations

import random
from functools import cache
from typing import Any

from boost_lightning.envs.base import Env, HallucinationMixin, TaskSpec, words

# attribute -> (question, words that mean it)
ATTRIBUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "alive": ("is it alive?", ("alive", "living")),
    "animal": ("is it an animal?", ("animal", "animals")),
    "mammal": ("is it a mammal?", ("mammal", "mammals")),
    "big": ("is it big?", ("big", "bigger", "large", "larger", "huge")),
    "eat": ("can you eat it?", ("eat", "edible", "food")),
    "hold": ("can you hold it?", ("hold",)),
    "outside": ("is it found outside?", ("outside", "outdoors")),
    "legs": ("does it have legs?", ("legs", "leg")),
    "noise": ("does it make noise?", ("noise", "noisy", "sound", "loud")),
    "wild": ("is it wild?", ("wild",)),
    "water": ("is it found in water?", ("water",)),
    "metal": ("is it made of metal?", ("metal", "metallic")),
    "soft": ("is it soft?", ("soft",)),
    "fly": ("can it fly?", ("fly", "flies", "flying")),
    "wood": ("is it made of wood?", ("wood", "wooden")),
    "electric": ("does it use electricity?", ("electricity", "electric", "electronic")),
    "green": ("is it green?", ("green",)),
    "kitchen": ("is it in a kitchen?", ("kitchen",)),
    "sharp": ("is it sharp?", ("sharp",)),
    "pet": ("is it a pet?", ("pet", "pets")),
    "round": ("is it round?", ("round",)),
    "sweet": ("is it sweet?", ("sweet",)),
    "toy": ("is it a toy?", ("toy", "toys")),
    "fruit": ("is it a fruit?", ("fruit", "fruits")),
    "wheels": ("does it have wheels?", ("wheels", "wheel")),
    "wear": ("can you wear it?", ("wear",)),
}
_OBJECTS = """
cat: alive animal mammal legs pet soft hold noise
dog: alive animal mammal legs pet soft outside noise
horse: alive animal mammal legs big outside noise
cow: alive animal mammal legs big outside eat noise
elephant: alive animal mammal legs big outside wild noise
lion: alive animal mammal legs big outside wild noise soft
mouse: alive animal mammal legs hold wild soft
rabbit: alive animal mammal legs hold pet soft outside
sheep: alive animal mammal legs outside eat soft noise
monkey: alive animal mammal legs outside wild noise
bat: alive animal mammal legs fly wild outside
whale: alive animal mammal water big wild noise
dolphin: alive animal mammal water wild noise
shark: alive animal water big wild sharp
goldfish: alive animal water pet hold
octopus: alive animal water wild soft
frog: alive animal water legs green wild hold noise outside
turtle: alive animal water legs pet hold
snake: alive animal wild outside
crocodile: alive animal water legs big wild green outside sharp
eagle: alive animal fly legs wild outside noise sharp
parrot: alive animal fly legs pet green noise
penguin: alive animal water legs wild
duck: alive animal fly water legs outside eat noise
bee: alive animal fly legs wild outside hold noise
spider: alive animal legs wild hold
tree: alive big outside green wood
grass: alive outside green soft
rose: alive outside hold sharp
cactus: alive green hold sharp
apple: eat hold sweet fruit round green
banana: eat hold sweet fruit
carrot: eat hold
bread: eat soft kitchen
cake: eat sweet soft kitchen
cheese: eat hold kitchen
egg: eat hold round kitchen
car: big metal wheels outside noise
train: big metal wheels outside noise electric
bicycle: metal wheels outside
airplane: big metal fly wheels outside noise
helicopter: big metal fly outside noise
boat: big water outside wood
drone: fly electric hold outside noise toy
kite: fly outside hold toy
phone: electric hold noise
laptop: electric metal
fridge: big electric kitchen metal
spoon: metal hold kitchen
knife: metal hold kitchen sharp
hammer: metal hold wood
chair: wood legs
table: wood legs kitchen
bed: wood legs soft big
book: hold
pencil: hold wood sharp
guitar: wood noise
piano: wood big noise
clock: round noise
ball: round toy hold outside
shoe: wear
robot: metal electric legs noise toy
house: big wood outside
coin: metal hold round
"""


class Table:
    """Objects x attributes as bitmasks, with the expert's question choice cached per candidate set."""

    def __init__(self, facts: dict[str, frozenset[str]]) -> None:
        self.names = list(facts)
        self.name_set = frozenset(self.names)
        self.attributes = list(ATTRIBUTES)
        self.facts = facts
        self.index = {name: i for i, name in enumerate(self.names)}
        self.masks = {a: sum(1 << i for i, n in enumerate(self.names) if a in facts[n]) for a in self.attributes}
        self.all = (1 << len(self.names)) - 1
        self._best: dict[int, str | None] = {}

    def has(self, name: str, attribute: str) -> bool:
        return attribute in self.facts[name]

    def consistent(self, answers: dict[str, bool], excluded: frozenset[str] | set[str] = frozenset()) -> int:
        """Bitmask of objects agreeing with every answer and not yet ruled out by a wrong guess."""
        cand = self.all
        for attribute, yes in answers.items():
            cand &= self.masks[attribute] if yes else ~self.masks[attribute]
        for name in excluded:
            if name in self.index:
                cand &= ~(1 << self.index[name])
        return cand

    def closest(self, answers: dict[str, bool], excluded: frozenset[str] | set[str] = frozenset()) -> str:
        """The object contradicting the fewest answers (first in table order on ties): a fallback when none fits."""
        names = [n for n in self.names if n not in excluded] or self.names
        return min(names, key=lambda n: sum(self.has(n, a) != yes for a, yes in answers.items()))

    def best_question(self, cand: int) -> str | None:
        """The attribute splitting ``cand`` most evenly, or ``None`` if none splits it."""
        if cand not in self._best:
            n = cand.bit_count()
            best, best_score = None, n
            for attribute in self.attributes:
                yes = (cand & self.masks[attribute]).bit_count()
                score = max(yes, n - yes)
                if 0 < yes < n and score < best_score:
                    best, best_score = attribute, score
            self._best[cand] = best
        return self._best[cand]

    def first(self, cand: int) -> str:
        return self.names[(cand & -cand).bit_length() - 1]


def _parse_table(text: str) -> dict[str, frozenset[str]]:
    facts = {}
    for line in text.strip().splitlines():
        name, attrs = line.split(":")
        facts[name.strip()] = frozenset(attrs.split())
    return facts


@cache
def real_table() -> Table:
    """The real task's table."""
    return Table(_parse_table(_OBJECTS))


@cache
def shifted_table(flip: float = 0.2) -> Table:
    """Another world: the real table with a fraction ``flip`` of its cells flipped (still one signature per object)."""
    rng = random.Random(f"twenty_questions/shifted/{flip}")
    base = _parse_table(_OBJECTS)
    while True:
        facts = {n: frozenset(a for a in ATTRIBUTES if (a in attrs) != (rng.random() < flip))
                 for n, attrs in base.items()}
        if len(set(facts.values())) == len(facts):
            return Table(facts)


def parse_turn(text: str, names: frozenset[str] | set[str]) -> tuple[tuple[str, str] | None, str]:
    """Read ``("ask", attribute)`` or ``("answer", name)`` out of free text.

    A turn is an answer if it says "answer" or "guess" (or names an object without mentioning an attribute),
    otherwise a question if it mentions exactly one attribute keyword.

    Returns:
        ``(action, "")`` or ``(None, explanation)``.
    """
    tokens = words(text)
    asked = {a for a, (_, keys) in ATTRIBUTES.items() if any(t in keys for t in tokens)}
    named = list(dict.fromkeys(t for t in tokens if t in names))
    if "answer" in tokens or "guess" in tokens or (named and not asked):
        if len(named) == 1:
            return ("answer", named[0]), ""
        if len(named) > 1:
            return None, "Name one object. Reply: answer: NAME."
        rest = [t for t in tokens if t not in ("answer", "guess", "it", "is", "a", "an", "the", "my", "i")]
        if rest:
            return ("answer", " ".join(rest[:3])), ""
        return None, "Invalid. Reply: ask: QUESTION or answer: NAME."
    if len(asked) == 1:
        return ("ask", asked.pop()), ""
    if asked:
        return None, "Ask about one thing at a time."
    return None, "Invalid. Reply: ask: QUESTION or answer: NAME."


class TwentyQuestionsEnv(Env):
    """Identify the secret object with yes/no questions.

    Args:
        table: The world the oracle answers from; default: the real table.
        max_turns: Agent turns before the episode ends unsolved (default 16).
    """

    task = "twenty_questions"
    default_max_turns = 16
    wrong_answer_penalty = 0.2

    def __init__(self, table: Table | None = None, max_turns: int | None = None) -> None:
        super().__init__(max_turns)
        self.table = table or real_table()
        self.secret = self.table.names[0]
        self.answers: dict[str, bool] = {}  # what the agent has been told: the expert's belief
        self.excluded: set[str] = set()

    @property
    def system_prompt(self) -> str:
        return "Guess my object. Ask yes/no questions like: ask: is it an animal? Then reply: answer: NAME."

    @property
    def instance(self) -> dict[str, Any]:
        return {"secret": self.secret, "shifted_table": self.table is not real_table()}

    def _setup(self, seed: int) -> None:
        # Keyed by task, not class or table, so every variant gets the same secret for a seed.
        self.secret = random.Random(f"twenty_questions/{seed}").choice(self.table.names)
        self.answers, self.excluded = {}, set()

    def _first_observation(self) -> str:
        return "Ask your first question."

    def _parse(self, text: str) -> tuple[tuple[str, str] | None, str]:
        return parse_turn(text, self.table.name_set)

    def _apply(self, action: tuple[str, str]) -> tuple[str, float, bool]:
        kind, what = action
        if kind == "answer":
            if what == self.secret:
                self.success = True
                return "Correct!", self.success_reward, True
            self.excluded.add(what)
            return f"No, it is not {what}.", -self.wrong_answer_penalty, True
        yes = self.table.has(self.secret, what)
        self.answers[what] = yes
        return ("Yes." if yes else "No."), -self.step_cost, True

    def expert_action(self) -> str:
        cand = self.table.consistent(self.answers, self.excluded)
        if cand == 0:
            return f"answer: {self.table.closest(self.answers, self.excluded)}"
        question = None if cand.bit_count() == 1 else self.table.best_question(cand)
        if question is None:
            return f"answer: {self.table.first(cand)}"
        return f"ask: {ATTRIBUTES[question][0]}"

    def random_action(self, rng: random.Random) -> str:
        if rng.random() < 0.2:
            return f"answer: {rng.choice(self.table.names)}"
        return f"ask: {ATTRIBUTES[rng.choice(self.table.attributes)][0]}"

    def optimal_turns(self) -> int:
        return _expert_turns(self.table, self.secret)


def _expert_turns(table: Table, secret: str) -> int:
    answers: dict[str, bool] = {}
    turns = 1
    while True:
        cand = table.consistent(answers)
        question = None if cand.bit_count() <= 1 else table.best_question(cand)
        if question is None:
            return turns
        answers[question] = table.has(secret, question)
        turns += 1


class HallucinatingTwentyQuestionsEnv(HallucinationMixin, TwentyQuestionsEnv):
    """An oracle that sometimes answers a question wrongly, the way an LLM playing the environment does.

    After a wrong answer it quietly switches to an object consistent with everything it has said (or the closest one),
    so the expert, which trusts the answers, ends up naming that object and hears ``Correct!``. One question the
    expert would ask is always answered wrongly.

    Args:
        rate: Probability that any other question is answered wrongly too.
        max_turns: Agent turns before the episode ends unsolved.
    """



    def _apply(self, action: tuple[str, str]) -> tuple[str, float, bool]:
        kind, what = action
        if kind != "ask" or not (self.turns - 1 == self._forced or self._rng.random() < self.rate):
            return super()._apply(action)
        self.corrupted_turns.append(self.turns - 1)
        yes = not self.table.has(self.secret, what)
        self.answers[what] = yes
        cand = self.table.consistent(self.answers, self.excluded)
        if cand:
            options = [n for i, n in enumerate(self.table.names) if cand >> i & 1]
            self.secret = self._rng.choice(options)
        else:
            self.secret = self.table.closest(self.answers, self.excluded)
        return ("Yes." if yes else "No."), -self.step_cost, True


_ASK = ("ask: {q}", "question: {q}", "let me ask: {q}")
_ANSWER = ("answer: {name}", "my answer: {name}", "answer: it is the {name}")


class ParaphrasedTwentyQuestionsEnv(TwentyQuestionsEnv):
    """The real game; its expert words each question and answer in one of several ways (the same decisions)."""

    def expert_action(self) -> str:
        kind, _, what = super().expert_action().partition(": ")
        rng = random.Random(f"paraphrase/{self.seed}/{self.turns}")
        return rng.choice(_ASK).format(q=what) if kind == "ask" else rng.choice(_ANSWER).format(name=what)


SPEC = TaskSpec(
    name="twenty_questions",
    env=TwentyQuestionsEnv,
    conflicting={"table-flipped": lambda: TwentyQuestionsEnv(shifted_table())},
    benign={"paraphrased": ParaphrasedTwentyQuestionsEnv},
    hallucinating=HallucinatingTwentyQuestionsEnv,
    disjoint_instances=False,
)
