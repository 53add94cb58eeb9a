"""Probe prompts: exact lengths, needles where the depth says, the same prompt for the same seed, and which
positions each policy still holds (`held`)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from conftest import BUNDLED_TOKENIZER, SAMPLE
from segcli.config import RunConfig
from segcli.errors import UsageError
from segcli.probe import FILLER, TASK_NAMES, Haystack, make_prompt
from segcli.probe.score import held
from segcli.probe.haystack import starts_word


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(BUNDLED_TOKENIZER))


@pytest.fixture(scope="module")
def filler(tok):
    return Haystack.from_ids("filler", tok.encode(FILLER.read_text(encoding="utf-8")).ids, tok)


def text(tok, ids) -> str:
    return tok.decode(ids)


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("depth", [0, 37.5, 100])
def test_prompt_has_the_length_asked_and_its_needle_at_the_depth(tok, filler, task, depth):
    p = make_prompt(task, tok, filler, 600, depth, 0, seed=0)
    assert len(p.ids) == 600 and p.length == 600 and p.answer_ids
    assert p.question_start < len(p.ids) and p.distance == p.question_start - p.needle_start > 0
    for a, b in p.needle:  # every needle span holds a sentence the answer needs, its value or names in it
        assert 0 <= a < b <= p.question_start
    needle = text(tok, p.ids[p.needle[0][0] : p.needle[0][1]])
    answer = p.answer.strip()
    if task == "vt":
        names = answer.split()
        assert len(names) == 5 and f"VAR {names[0]} = " in needle
        chain = [text(tok, p.ids[a:b]) for a, b in p.needle]
        assert [f"VAR {b} = VAR {a}." in c for a, b, c in zip(names, names[1:], chain[1:])] == [True] * 4
    else:
        assert answer in needle and answer.isdigit()
    if task in ("passkey", "niah"):  # one insert: the needle sits `depth` percent into the haystack (snapped to a word)
        n_hay = 600 - sum(b - a for a, b in p.needle) - (len(p.ids) - p.question_start)
        assert abs(p.needle_start - depth / 100 * n_hay) <= 32
    question = text(tok, p.ids[p.question_start :])
    assert question.startswith("\n") and ("pass key" in question or "magic number" in question or "variables" in question)


def test_same_seed_same_prompt_other_seed_or_sample_other_prompt(tok, filler):
    a = make_prompt("niah", tok, filler, 500, 50, 1, seed=3)
    b = make_prompt("niah", tok, filler, 500, 50, 1, seed=3)
    assert (a.ids, a.answer_ids, a.needle) == (b.ids, b.answer_ids, b.needle)
    assert make_prompt("niah", tok, filler, 500, 50, 2, seed=3).ids != a.ids
    assert make_prompt("niah", tok, filler, 500, 50, 1, seed=4).ids != a.ids


def test_multikey_puts_a_distractor_between_the_needle_and_the_question(tok, filler):
    for sample in range(8):
        for depth in (0, 60, 100):
            p = make_prompt("multikey", tok, filler, 700, depth, sample, seed=0)
            after = text(tok, p.ids[p.needle[0][1] : p.question_start])
            assert after.count("special magic numbers for") >= 1
            whole = text(tok, p.ids)
            assert whole.count("special magic numbers for") == 4 and whole.count(p.answer.strip()) == 1


def test_haystack_from_a_file_is_cut_at_token_boundaries(tok):
    ids = tok.encode((SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:20000]).ids
    hay = Haystack.from_ids("hamlet", ids, tok)
    p = make_prompt("passkey", tok, hay, 800, 50, 0, seed=0)
    before, after = p.ids[: p.needle[0][0]], p.ids[p.needle[0][1] : p.question_start]
    joined = "," + ",".join(map(str, ids + ids)) + ","  # wraps round when the offset is late
    assert f",{','.join(map(str, before))}," in joined and f",{','.join(map(str, after))}," in joined
    assert starts_word(tok.id_to_token(before[0])) and (not after or starts_word(tok.id_to_token(after[0])))


def test_take_wraps_round_a_short_haystack(tok):
    hay = Haystack.from_ids("short", tok.encode(" one two three four").ids, tok)
    out = hay.take(11, random.Random(0))
    assert len(out) == 11 and set(out) <= set(hay.ids)


def test_a_length_too_short_for_the_task_is_a_usage_error(tok, filler):
    with pytest.raises(UsageError, match="a vt prompt needs at least"):
        make_prompt("vt", tok, filler, 40, 50, 0, seed=0)


def cfg(memory, **kw) -> RunConfig:
    return RunConfig(memory=memory, **kw)


@pytest.mark.parametrize("memory, kw, positions, query, want", [
    ("full", {}, range(0, 5), 1000, True),
    ("none", {"segment_size": 100}, range(0, 5), 1000, False),
    ("none", {"segment_size": 100}, range(1001, 1005), 1010, True),  # the question's own segment
    ("fifo", {"segment_size": 100, "memory_size": 200}, range(801, 805), 1050, True),  # segment starts at 1000
    ("fifo", {"segment_size": 100, "memory_size": 200}, range(799, 805), 1050, False),
    ("fifo", {"segment_size": 1, "memory_size": 200}, range(850, 855), 1050, True),
    ("fifo", {"segment_size": 1, "memory_size": 200}, range(849, 855), 1050, False),
    ("xl", {"segment_size": 100}, range(900, 905), 1050, True),
    ("xl", {"segment_size": 100}, range(899, 905), 1050, False),
    ("sink", {"segment_size": 100, "memory_size": 200, "sink_tokens": 4}, range(0, 4), 1050, True),
    ("sink", {"segment_size": 100, "memory_size": 200, "sink_tokens": 4}, range(2, 6), 1050, False),
    ("sink", {"segment_size": 100, "memory_size": 200, "sink_tokens": 4}, range(800, 810), 1050, True),
    ("compressive", {"segment_size": 100, "memory_size": 200}, range(800, 810), 1050, True),
    ("compressive", {"segment_size": 100, "memory_size": 200}, range(300, 310), 1050, None),  # pooled: 512 back
    ("compressive", {"segment_size": 100, "memory_size": 200}, range(10, 20), 1050, False),  # beyond 200 + 128 x 4
    ("average", {"segment_size": 100}, range(10, 20), 1050, None),
    ("linear", {"segment_size": 100}, range(10, 20), 1050, None),
    ("linear", {"segment_size": 100}, range(1010, 1020), 1050, True),
])
def test_held_knows_what_each_policy_keeps(memory, kw, positions, query, want):
    assert held(cfg(memory, **kw), positions, query) is want
