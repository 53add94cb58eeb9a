"""Data tasks (segcli/train/tasks/): what each one does to the rows, and the registry that mixes them."""

import random

import numpy as np
import pytest

from segcli.train import TrainConfig
from segcli.train.data import TextSource
from segcli.train.tasks import TASKS, Plan, draw, row_batch
from segcli.train.tasks.copy import CopyTask, insert_copies
from segcli.train.tasks.jump import JumpTask
from segcli.train.tasks.repeat import RepeatTask


def test_registry_is_keyed_by_the_public_names_one_module_each():
    assert list(TASKS) == ["copy", "repeat", "jump"]
    for name, task in TASKS.items():
        assert task.name == name and task.__module__ == f"segcli.train.tasks.{name}"


def test_insert_copies_repeats_passages_verbatim_within_bounds():
    rng = np.random.default_rng(0)
    x = np.arange(4 * 600).reshape(4, 600)  # distinct tokens: a copy is identifiable by its values
    orig = x.copy()
    mask = insert_copies(x, rng, passages=3, length=(10, 30), gap=(5, 100))
    assert mask.any(axis=1).all(), "every row got at least one passage"
    for b in range(4):
        runs = np.flatnonzero(np.diff(np.concatenate([[0], mask[b].astype(int), [0]])))
        for lo, hi in zip(runs[::2], runs[1::2]):
            assert 10 <= hi - lo <= 30, "one run per passage (a gap of >= 5 separates copies)"
            src = int(x[b, lo] - orig[b, 0])  # where the copied values came from
            assert np.array_equal(x[b, lo:hi], orig[b, src : src + hi - lo]), "copies are verbatim"
            assert src + (hi - lo) <= lo, "the source precedes its copy"
        assert np.array_equal(x[b][~mask[b]], orig[b][~mask[b]]), "nothing else changes"


@pytest.mark.parametrize("ids", ["unigram", "uniform"])
def test_repeat_rows_are_periodic_and_their_first_string_unscored(ids):
    text = TextSource(1000 + np.arange(20_000) % 5000, np.array([0, 8192]), 8192)
    task = RepeatTask(prob=1.0, length=[5, 40], ids=ids)
    x, copied, scored = row_batch([task], text, 300, 6, np.random.default_rng(0), vocab=300)
    for b in range(6):
        m = int((~scored[b]).sum()) - 1  # positions 0..m unscored
        assert 5 <= m <= 40 and not scored[b, : m + 1].any() and scored[b, m + 1 :].all()
        assert np.array_equal(x[b, m:], x[b, :-m]), "the row repeats with period m"
        lo, hi = (1000, 6000) if ids == "unigram" else (1, 300)  # corpus ids, or any id but 0 of the vocabulary
        assert len(set(x[b, :m])) > m // 2 and x[b].min() >= lo and x[b].max() < hi
        assert np.array_equal(copied[b], scored[b])


def test_row_tasks_share_the_rows_by_prob_and_leave_the_rest_natural_text():
    text = TextSource(1 + np.arange(50_000) % 7919, np.arange(0, 40_000, 4096), 4096)
    tasks = [CopyTask(prob=0.5, passages=2, length=[4, 8], gap=[2, 20]), RepeatTask(prob=0.25, length=[3, 6])]
    x, copied, scored = row_batch(tasks, text, 200, 400, np.random.default_rng(0), vocab=8000)
    repeat = ~scored.all(axis=1)  # only repeated rows have unscored targets
    copy = copied.any(axis=1) & ~repeat
    plain = ~copy & ~repeat
    assert abs(repeat.mean() - 0.25) < 0.06 and abs(copy.mean() - 0.5) < 0.06 and abs(plain.mean() - 0.25) < 0.06
    diffs = np.diff(x[plain], axis=1) % 7919  # the corpus counts up by one: untouched rows still do
    assert ((diffs == 1) | (x[plain][:, 1:] == 1)).all()


def test_jump_steps_copy_first_half_passages_into_the_second_and_skip_positions():
    cfg = TrainConfig(seq_len=256, batch_size=6, memory_sizes=[64, 200])
    text = TextSource(np.random.default_rng(1).integers(1, 8000, size=4096), np.array([0, 1000, 2000]), 1024)
    task = JumpTask(prob=1.0, skip=[300, 300], passages=3, length=[8, 24])
    batch = task.batch(text, cfg, Plan("linear", 32, 64), random.Random(0), np.random.default_rng(0))
    x, scored, copied = batch.x, batch.scored, batch.copied
    assert batch.plan == Plan("fifo", 128, 200, skips={128: 300}), "two halves through fifo, the first held in memory"
    assert batch.record == {"jump": 300}
    assert x.shape == scored.shape == (6, 257)
    assert not scored[:, 128].any() and scored.sum() == 6 * 256, "only the first target after the jump is unscored"
    assert not copied[:, :129].any() and copied.any(dim=1).all()
    found = 0
    for row in x.numpy():
        first, second = row[1:128].tolist(), row[129:].tolist()
        # every 8-token run that the copies put in the second half occurs in the first half
        runs = {tuple(first[i : i + 8]) for i in range(len(first) - 7)}
        found += sum(tuple(second[i : i + 8]) in runs for i in range(len(second) - 7))
    assert found >= 6 * 3, found
    tight = JumpTask(prob=1.0, passages=8, length=[8, 40])  # passages fill the second half: no overrun
    for seed in range(50):
        tight.batch(text, cfg, Plan("fifo", 32, 64), random.Random(seed), np.random.default_rng(seed))


def test_draw_gives_a_step_task_its_share_of_steps_and_the_plan_it_asks_for():
    cfg = TrainConfig(seq_len=64, batch_size=2, memory_sizes=[16])
    text = TextSource(1 + np.arange(10_000) % 5000, np.array([0, 4096]), 4096)
    tasks = {"jump": JumpTask(prob=0.3, skip=[10, 20], length=[4, 8]), "copy": CopyTask(prob=1.0, length=[4, 8], gap=[1, 8])}
    py_rng, rng = random.Random(0), np.random.default_rng(0)
    plans = [draw(tasks, text, cfg, Plan("none", 16, 16), py_rng, rng, 5000).plan for _ in range(300)]
    jumps = [p for p in plans if p.skips]
    assert abs(len(jumps) / 300 - 0.3) < 0.07
    assert all(p.policy == "fifo" and p.segment_size == 32 and 10 <= p.skips[32] <= 20 for p in jumps)
    assert all(p == Plan("none", 16, 16) for p in plans if not p.skips), "other steps keep the drawn setting"
