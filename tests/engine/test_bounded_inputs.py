"""Inputs are read as they are tokenized: --max-tokens bounds the memory whatever the input's size or kind,
and read-once inputs (pipes, process substitution, FIFOs) are read exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import SAMPLE

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def segcli(*args, stdin=None, shell=False, timeout=300):
    cmd = args[0] if shell else [sys.executable, "-m", "segcli", *map(str, args)]
    return subprocess.run(cmd, stdin=stdin, capture_output=True, env=ENV, timeout=timeout, shell=shell,
                          executable="/bin/bash" if shell else None)


def records(p) -> list[dict]:
    assert p.returncode == 0, p.stderr.decode()
    return [json.loads(x) for x in p.stdout.decode().splitlines()]


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    d = tmp_path_factory.mktemp("sizes")
    text = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")
    small, big = d / "small.txt", d / "big.txt"
    small.write_text(text[:100_000], encoding="utf-8")
    with open(big, "w", encoding="utf-8") as f:
        while f.tell() < 30 << 20:
            f.write(text)
    return small, big


def peak(p) -> int:
    return records(p)[-1]["peak_rss_bytes"]


def test_max_tokens_bounds_memory_for_any_file_size_and_stdin(sizes):
    """The same peak RSS (within 10%) for a 100 KB and a 30 MB file, and for the 30 MB file on stdin."""
    small, big = sizes
    args = ("--max-tokens", 200, "--device", "cpu", "-q", "--format", "jsonl")
    rss_small = peak(segcli("run", small, *args))
    big_run = segcli("run", big, *args)
    rss_big = peak(big_run)
    with open(big, "rb") as f:
        rss_stdin = peak(segcli("run", "-", *args, stdin=f))
    assert records(big_run)[-1]["tokens"] == 200
    assert abs(rss_big / rss_small - 1) <= 0.10, (rss_small, rss_big)
    assert abs(rss_stdin / rss_big - 1) <= 0.10, (rss_big, rss_stdin)


def test_process_substitution_is_read_once(sizes):
    """`segcli run <(cat doc)`: a pipe is read once (it used to be read twice and look empty), and gives the
    numbers of the file itself."""
    small, _ = sizes
    args = "--max-tokens 300 --segment-size 64 --device cpu -q --format jsonl"
    piped = segcli(f"{sys.executable} -m segcli run <(cat {small}) {args}", shell=True)
    direct = segcli("run", small, *args.split())
    a, b = records(piped), records(direct)
    assert [r["nll"] for r in a if r["type"] == "segment"] == [r["nll"] for r in b if r["type"] == "segment"]
    assert a[-1]["bits_per_byte"] == b[-1]["bits_per_byte"] and a[-1]["tokens"] == 300


def test_named_pipe_with_a_late_writer(tmp_path, sizes):
    """A FIFO whose writer starts after segcli opened it: segcli waits for it, reads it once, and finishes."""
    small, _ = sizes
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write_late():
        time.sleep(2)
        with open(fifo, "wb") as f:
            f.write(small.read_bytes()[:5000])

    writer = threading.Thread(target=write_late)
    writer.start()
    p = segcli("run", fifo, "--segment-size", 32, "--device", "cpu", "-q", "--format", "jsonl", timeout=120)
    writer.join()
    recs = records(p)
    assert recs[-1]["type"] == "summary" and recs[-1]["tokens"] > 500


def test_a_memory_that_could_not_fit_is_refused_before_the_run(sizes):
    """A stream of unknown length (stdin) under --memory-size 2^24 could fill ~0.8 TB: exit 2 at once, naming the
    bytes; the same size on a file of known length holds only what it reads and runs."""
    small, _ = sizes
    with open(small, "rb") as f:
        p = segcli("run", "-", "--memory-size", 1 << 24, "--device", "cpu", "-q", stdin=f)
    lines = p.stderr.decode().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "the memory can reach" in lines[0] and "bytes" in lines[0], lines
    assert p.stdout == b""
    ok = records(segcli("run", small, "--memory-size", 1 << 24, "--max-tokens", 300, "--device", "cpu", "-q",
                        "--format", "jsonl"))
    assert ok[-1]["tokens"] == 300 and ok[-1]["max_memory_bytes"] < 50 << 20
