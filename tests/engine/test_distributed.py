"""Corpus runs sharded over processes: torchrun with 2 gloo processes writes what one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from segcli import distributed
from segcli.cli import app
from segcli.engine.run import TIMING_FIELDS

from conftest import ROOT, SAMPLE


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """7 documents: 4 files in a folder tree and 3 JSON Lines records, of different lengths."""
    text = (SAMPLE / "milton_areopagitica.txt").read_text(encoding="utf-8")
    d = tmp_path_factory.mktemp("dist")
    (d / "docs" / "deeper").mkdir(parents=True)
    cuts = [0, 400, 1100, 1500, 2300, 2700, 3600, 4000]
    for k, name in enumerate(["docs/a.txt", "docs/b.txt", "docs/deeper/c.txt", "docs/d.txt"]):
        (d / name).write_text(text[cuts[k]:cuts[k + 1]])
    (d / "recs.jsonl").write_text("".join(json.dumps({"id": f"r{k}", "text": text[cuts[k]:cuts[k + 1]]}) + "\n"
                                          for k in range(4, 7)))
    return d


def canonical(stdout: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in stdout.splitlines() if line.strip()]


def test_two_gloo_processes_equal_one_process(corpus, tiny_model_dir):
    args = ["run", str(corpus / "docs"), str(corpus / "recs.jsonl"), "--glob", "**/*.txt", "--model", str(tiny_model_dir),
            "--device", "cpu", "-s", "24", "--memory", "fifo", "--memory-size", "32", "--max-tokens", "100",
            "--per-token", "--fresh-memory-per-document", "--format", "jsonl", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",  # this checkout's segcli, whatever is installed
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "segcli", *args],
        capture_output=True, text=True, env=env, timeout=240, cwd=ROOT,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "segcli: error" not in launched.stderr
    single = CliRunner().invoke(app, args)
    assert single.exit_code == 0, single.output
    many, one = canonical(launched.stdout), canonical(single.stdout)
    assert [r["document"] for r in one if r["type"] == "document"] == [
        str(corpus / "docs" / "a.txt"), str(corpus / "docs" / "b.txt"), str(corpus / "docs" / "d.txt"),
        str(corpus / "docs" / "deeper" / "c.txt"), "r4", "r5", "r6"]
    assert len(many) == len(one) and many == one  # every record, in document order, apart from timing


class FakeCollectives:
    """A 3-rank world simulated in one process: rank 0's view of `distributed.rounds`."""

    def __init__(self, monkeypatch, work):
        self.world = distributed.World(rank=0, size=3, local_rank=0)
        self.work, self.round = work, 0
        monkeypatch.setattr(distributed, "agree", self.agree)
        monkeypatch.setattr(distributed, "gather_to_main", self.gather)

    def results(self, mine):
        start = self.round * 3
        return [mine] + [self.work(start + k) if start + k < self.n else None for k in (1, 2)]

    def agree(self, world, failure):
        self.current = self.results(None if failure else "pending")
        return distributed.first_failure([failure, *self.current[1:]])

    def gather(self, world, obj):
        self.current[0] = obj
        self.round += 1
        return [None if isinstance(r, distributed.Failure) else r for r in self.current]


def test_rounds_yield_in_document_order_and_stop_at_the_first_failure(monkeypatch):
    def work(i):
        return distributed.Failure("bad", 1, index=i) if i in (5, 7) else f"doc{i}"

    fake = FakeCollectives(monkeypatch, work)
    fake.n = 10
    got = []
    with pytest.raises(distributed.StopRound) as stop:
        for i, r in distributed.rounds(fake.world, 10, work):
            got.append((i, r))
    assert got == [(i, f"doc{i}") for i in range(5)]  # documents before the failing one, in order
    assert stop.value.failure.index == 5


def test_detect_reads_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.detect() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    w = distributed.detect()
    assert (w.rank, w.size, w.local_rank, w.is_main) == (2, 4, 0, False)
    assert list(w.shard(11)) == [2, 6, 10]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.detect() is None


@pytest.mark.parametrize("rank", [0, 1])
def test_an_option_error_is_one_line_from_rank_0(rank, monkeypatch):
    """Every rank finds the same bad option; before, each printed it (two `segcli: error:` lines under torchrun)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    waited = []
    monkeypatch.setattr(distributed, "let_main_fail_first", lambda: waited.append(1))
    res = CliRunner().invoke(app, ["run", "x.txt", "--memory", "lru"])
    assert res.exit_code == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    if rank == 0:
        assert len(lines) == 1 and "unknown memory policy 'lru'" in lines[0] and not waited
    else:
        assert lines == [] and waited == [1]  # it waits for rank 0 to fail first, then says nothing
