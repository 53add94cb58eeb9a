"""Synthetic retrieval prompts, generated offline from a seed: one registry entry per task.

    prompt = make_prompt("passkey", tokenizer, haystack, length=2048, depth=50, sample=0, seed=0)
    prompt.ids, prompt.answer_ids, prompt.needle, prompt.distance

A prompt is haystack tokens with the task's sentences inserted at their depths, then the question; its answer
follows the question directly (scored by teacher forcing, `score.py`). Every piece is tokenized on its own and
the pieces are joined as token lists, so a prompt has exactly `length` tokens; insertion points move (at most
SNAP_TOKENS) to the nearest word start of the haystack. The random choices (values, keys, the haystack offset)
come from a generator seeded by (seed, task, length, depth, sample) alone: the same prompt under every policy
and segment size, and whatever else the grid holds.

- `passkey` (Landmark Attention, LongLoRA): "The pass key is N. Remember it. N is the pass key." in the filler,
  then "What is the pass key? The pass key is" -> " N" (5 digits).
- `niah` (RULER's single needle): "One of the special magic numbers for {key} is: {value}." asked by key
  (7-digit values, keys such as "quiet-harbor").
- `multikey` (RULER's multi-key needle): the same needle among three distractor needles with other keys and
  values; one distractor always sits between the needle and the question, so copying the most recent magic
  number is wrong (what a recency window alone would do).
- `vt` (RULER's variable tracking): "VAR A = 12345." at the depth, then "VAR B = VAR A." ... (four hops) at
  random later places; asked for every name bound to the value, answered in chain order.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UsageError
from .haystack import Haystack


@dataclass
class Insert:
    """A sentence put into the haystack at `at` (0..1 of the way through it)."""

    text: str
    at: float
    needle: bool = True  # part of what the answer needs (False: a distractor); needles keep their order
    after_first: bool = False  # never before the first insert (the asked needle)


@dataclass
class TaskText:
    inserts: list[Insert]
    question: str
    answer: str  # what follows the question, leading space included


@dataclass
class Prompt:
    task: str
    length: int  # prompt tokens asked for (= len(ids))
    depth: float  # percent of the haystack before the needle
    sample: int
    ids: list[int]  # the prompt's tokens, question last (no BOS)
    answer_ids: list[int]  # the answer's tokens (scored after the prompt)
    answer: str
    needle: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token spans the answer needs
    question_start: int = 0  # index of the question's first token

    @property
    def needle_start(self) -> int:
        return self.needle[0][0]

    @property
    def distance(self) -> int:
        """Tokens from the (first) needle's first token to the question's first token."""
        return self.question_start - self.needle_start


ADJECTIVES = ("quiet", "amber", "brave", "silver", "hollow", "gentle", "crimson", "distant", "frozen", "golden",
              "hidden", "lucky", "narrow", "patient", "rapid", "shy", "steady", "velvet", "wild", "woven",
              "bitter", "calm", "dusty", "eager", "faint", "green", "humble", "ivory", "jolly", "keen")
NOUNS = ("harbor", "lantern", "meadow", "orchard", "pebble", "quarry", "river", "saddle", "thimble", "valley",
         "willow", "anchor", "barrel", "candle", "desk", "engine", "falcon", "garden", "hammer", "island",
         "kettle", "ladder", "mirror", "needle", "otter", "pillow", "ribbon", "spoon", "tower", "wagon")

VT_HOPS = 4  # "VAR B = VAR A." statements after the first
MULTIKEY_DISTRACTORS = 3


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def passkey(rng: random.Random, depth: float) -> TaskText:
    n = rng.randint(10000, 99999)
    return TaskText([Insert(f" The pass key is {n}. Remember it. {n} is the pass key.", depth)],
                    "\nWhat is the pass key? The pass key is", f" {n}")


def _magic(key: str, value: int) -> str:
    return f" One of the special magic numbers for {key} is: {value}."


def _magic_question(key: str) -> str:
    return (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            f"The special magic number for {key} mentioned in the provided text is")


def niah(rng: random.Random, depth: float) -> TaskText:
    key, value = _key(rng, set()), rng.randint(1000000, 9999999)
    return TaskText([Insert(_magic(key, value), depth)], _magic_question(key), f" {value}")


def multikey(rng: random.Random, depth: float) -> TaskText:
    taken: set[str] = set()
    keys = [_key(rng, taken) for _ in range(MULTIKEY_DISTRACTORS + 1)]
    values = rng.sample(range(1000000, 10000000), len(keys))
    inserts = [Insert(_magic(keys[0], values[0]), depth)]
    inserts.append(Insert(_magic(keys[1], values[1]), rng.uniform(depth, 1.0), needle=False,
                          after_first=True))
    inserts += [Insert(_magic(k, v), rng.random(), needle=False) for k, v in zip(keys[2:], values[2:])]
    return TaskText(inserts, _magic_question(keys[0]), f" {values[0]}")


def vt(rng: random.Random, depth: float) -> TaskText:
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = rng.randint(10000, 99999)
    later = sorted(rng.uniform(depth, 1.0) for _ in range(VT_HOPS))
    inserts = [Insert(f" VAR {names[0]} = {value}.", depth)]
    inserts += [Insert(f" VAR {b} = VAR {a}.", at) for a, b, at in zip(names, names[1:], later)]
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain(s) of variable assignment in the text above, {len(names)} variables are "
                f"assigned the value {value}, they are:")
    return TaskText(inserts, question, " " + " ".join(names))


TASKS: dict[str, Callable[[random.Random, float], TaskText]] = {
    "passkey": passkey, "niah": niah, "multikey": multikey, "vt": vt,
}
TASK_NAMES = tuple(TASKS)


def prompt_seed(seed: int, task: str, length: int, depth: float, sample: int) -> int:
    """The generator seed of one prompt: a function of these five alone."""
    key = f"{seed}|{task}|{length}|{depth:g}|{sample}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def min_length(task: str, tokenizer, seed: int = 0) -> int:
    """About the fewest prompt tokens a task's sentences and question take (values vary a little)."""
    text = TASKS[task](random.Random(seed), 0.5)
    return sum(len(encode(tokenizer, i.text)) for i in text.inserts) + len(encode(tokenizer, text.question))


def make_prompt(task: str, tokenizer, haystack: Haystack, length: int, depth: float, sample: int,
                seed: int) -> Prompt:
    """One prompt of exactly `length` tokens with its needle `depth` percent of the way into the haystack."""
    rng = random.Random(prompt_seed(seed, task, length, depth, sample))
    text = TASKS[task](rng, depth / 100.0)
    pieces = [encode(tokenizer, i.text) for i in text.inserts]
    question, answer = encode(tokenizer, text.question), encode(tokenizer, text.answer)
    n_hay = length - sum(map(len, pieces)) - len(question)
    if n_hay < 0:
        raise UsageError(f"--lengths {length}: a {task} prompt needs at least {length - n_hay} tokens with this "
                         "tokenizer; give longer lengths")
    hay = haystack.take(n_hay, rng)
    marks = haystack.marks()
    points = [haystack.snap(hay, round(i.at * n_hay), marks) for i in text.inserts]
    last = 0
    for j, ins in enumerate(text.inserts):  # snapping must not reorder the chain or pull a distractor forward
        if ins.needle:
            points[j] = last = max(points[j], last)
        elif ins.after_first:
            points[j] = max(points[j], points[0])
    order = sorted(range(len(pieces)), key=lambda j: (points[j], j))
    ids: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    cut = 0
    for j in order:
        ids.extend(hay[cut : points[j]])
        cut = points[j]
        spans[j] = (len(ids), len(ids) + len(pieces[j]))
        ids.extend(pieces[j])
    ids.extend(hay[cut:])
    question_start = len(ids)
    ids.extend(question)
    needle = [spans[j] for j, ins in enumerate(text.inserts) if ins.needle]  # the first: the asked needle
    return Prompt(task, length, depth, sample, ids, answer, text.answer, needle, question_start)
