"""Sweep transformers releases through segcli's transformers-dependent tests (issue 28, point 4).

    python scripts/transformers_sweep.py 5.24.0                          # one release, print the results
    python scripts/transformers_sweep.py 5.17.0 5.18.0 5.19.0 5.20.2 5.21.1 5.22.2 5.23.0 5.24.0 5.25.0 \
        --write docs/TRANSFORMERS.md                                     # the tested range, rewrite the docs table

Run it before widening the `transformers` bound in pyproject.toml. It is not part of the test suite: each release
takes minutes (8-15 on one loaded core of the 2-core development machine).

For each release given, one after the other:

1. installs that release into a throwaway directory DIR (`pip install --no-deps --target DIR transformers==V`),
   next to the packages of the running Python's environment (torch, tokenizers, huggingface_hub, kernels, ...);
2. checks that it imports and loads a tiny model with DIR on PYTHONPATH. If that fails, it adds the pins an old
   release needs beside a newer huggingface_hub (OLD_HUB_PINS: 5.17.0 requires huggingface_hub<2 and imports
   httpx, which hub 2 no longer brings) into DIR and checks again: a try-then-pin fallback. On the first sweep
   (2 CPU cores, huggingface_hub 2.5.0 in the venv) only 5.17.0 needed the pins; 5.18.0 to 5.25.0 load with hub 2.
   A release whose own requirements name `kernels` unconditionally (5.25.0 does) gets it installed into DIR too,
   unless the environment already has it;
3. checks that `import transformers` prints V and that `import segcli` comes from the tested checkout, not from an
   editable install: PYTHONPATH is CHECKOUT:DIR, the checkout first;
4. runs exactly what .ci/run runs under its older release, with HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1:
   `pytest -q -p no:cacheprovider --basetemp DIR/tmp -m transformers_api tests/hf tests/recurrent -rfEs`
   (the recurrent matrix, the HF backend's modules and the issue-17 family matrix on one family per code path);
5. keeps pytest's log as experiments/transformers-sweep/V.log and appends one JSON line to
   experiments/transformers-sweep/results.jsonl: version, segcli commit, counts, failing test ids, skip reasons,
   the families the release lacks, seconds, machine.

By default (--worktree) the tests run from a `git worktree` of --commit (default HEAD) in a temporary directory, so
that edits made in the working tree while the sweep runs do not leak into it; the worktree is removed at the end.

With --write FILE, the results go into a markdown table between `<!-- sweep:begin -->` and `<!-- sweep:end -->` in
FILE, with the command, commit, machine and date; nothing else in FILE is touched (FILE is created with a title and
an explanation if it does not exist). The exit status is 0 if every release passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "experiments" / "transformers-sweep"
RESULTS = OUT_DIR / "results.jsonl"
BEGIN = "<!-- sweep:begin -->"
END = "<!-- sweep:end -->"

# What .ci/run installs beside transformers 5.17.0: the huggingface_hub it accepts (<2) and the HTTP stack that hub
# version imports, which the venv's hub 2 does not bring.
OLD_HUB_PINS = ["huggingface_hub==1.33.0", "httpx==0.28.1", "httpcore==1.0.9", "h11==0.16.0", "anyio==4.16.0",
                "idna==3.20", "certifi==2026.10.19.post1"]

# The tests' arguments, as in .ci/run (the --basetemp argument is added per release).
PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-m", "transformers_api", "tests/hf", "tests/recurrent", "-rfEs"]
TEST_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Imports the release and saves and loads a tiny llama through it: what fails when a release and the environment's
# huggingface_hub do not fit together.
PROBE = """
import sys, tempfile
import torch, transformers
from transformers import AutoModelForCausalLM, LlamaConfig
assert transformers.__version__ == sys.argv[1], transformers.__version__
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
with tempfile.TemporaryDirectory() as d:
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
import huggingface_hub
print("probe ok: transformers", transformers.__version__, "huggingface_hub", huggingface_hub.__version__)
"""

# The skip reasons of tests/hf and tests/recurrent that mean "this release has no such model family".
MISSING_FAMILY = [re.compile(r"^this transformers has no (\S+)$"),
                  re.compile(r"^(\S+): not in (?:this )?transformers(?: \S+)?$")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="+", metavar="VERSION", help="transformers releases, e.g. 5.17.0 5.25.0")
    parser.add_argument("--commit", default="HEAD", help="the segcli commit to test (default HEAD)")
    parser.add_argument("--worktree", action=argparse.BooleanOptionalAction, default=True,
                        help="run the tests from a git worktree of --commit in a temporary directory (default); "
                             "--no-worktree runs them from this checkout as it is, uncommitted edits included")
    parser.add_argument("--write", metavar="FILE", type=Path,
                        help="write the markdown table between the sweep markers in FILE")
    parser.add_argument("--timeout-minutes", type=float, default=60.0,
                        help="stop a release's test run after this long and count it as failed (default 60)")
    parser.add_argument("--from-results", action="store_true",
                        help="run nothing: write the table of the releases results.jsonl holds for --commit")
    parser.add_argument("--keep", action="store_true",
                        help="keep the installed releases (printed at the end), e.g. to diff their code")
    return parser.parse_args(argv)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capturing its output as text."""
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def git(*args: str) -> str:
    """Run git in this repository and return its stripped output; fail loudly if git does."""
    done = run(["git", "-C", str(ROOT), *args])
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def machine() -> dict:
    """The machine the tests run on: CPU model, cores, load, Python, torch and the environment's huggingface_hub."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}
    for package in ("torch", "huggingface_hub", "kernels"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        info["load_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def describe_machine(info: dict) -> str:
    """One line for a machine() dict."""
    return (f"{info['cpu']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
            f"huggingface_hub {info['huggingface_hub']}, kernels {info['kernels']} in the environment")


def make_worktree(commit: str, parent: Path) -> Path:
    """Check `commit` out as a detached git worktree under `parent` and return its path."""
    path = parent / f"segcli-{commit[:12]}"
    git("worktree", "add", "--detach", str(path), commit)
    return path


def remove_worktree(path: Path) -> None:
    """Remove a worktree made by make_worktree (its files and git's record of it)."""
    done = run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)])
    if done.returncode != 0:
        print(f"warning: git worktree remove {path}: {done.stderr.strip()}", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
        run(["git", "-C", str(ROOT), "worktree", "prune"])


def pip_install(target: Path, requirements: list[str]) -> None:
    """Install requirements (without their dependencies) into the target directory."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *requirements]
    done = run(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stdout}{done.stderr}")


def release_requirements(target: Path, version: str) -> list[str]:
    """The release's unconditional requirements (Requires-Dist lines without an environment marker)."""
    metadata = target / f"transformers-{version}.dist-info" / "METADATA"
    requirements = []
    for line in metadata.read_text(encoding="utf-8").splitlines():
        if line.startswith("Requires-Dist:") and ";" not in line:
            requirements.append(line.split(":", 1)[1].strip())
    return requirements


def probe(target: Path, version: str) -> subprocess.CompletedProcess:
    """Import the release from `target` and save and load a tiny model with it (see PROBE)."""
    env = {**os.environ, **TEST_ENV, "PYTHONPATH": str(target)}
    return run([sys.executable, "-c", PROBE, version], env=env, cwd=target)


def install_release(version: str, target: Path) -> dict:
    """Install transformers==version into target, with the pins and kernels it needs; return what was installed.

    The pins are added only when the release fails to import or load a tiny model without them (try, then pin).
    """
    pip_install(target, [f"transformers=={version}"])
    requirements = release_requirements(target, version)
    setup = {"pins": [], "hub_requirement": next((r for r in requirements if r.startswith("huggingface")), None),
             "kernels_installed": None}
    kernels = [r for r in requirements if re.match(r"kernels\b", r)]
    if kernels and importlib.util.find_spec("kernels") is None:
        pip_install(target, kernels)
        setup["kernels_installed"] = kernels[0]
    first = probe(target, version)
    if first.returncode != 0:
        print(f"  {version} does not load with the environment's huggingface_hub "
              f"({last_line(first.stderr)}); adding {' '.join(OLD_HUB_PINS)}")
        pip_install(target, OLD_HUB_PINS)
        setup["pins"] = OLD_HUB_PINS
        second = probe(target, version)
        if second.returncode != 0:
            raise RuntimeError(f"transformers {version} does not load, with or without the pins:\n{second.stderr}")
        first = second
    setup["probe"] = first.stdout.strip()
    return setup


def last_line(text: str) -> str:
    """The last non-empty line of text (an exception's message, usually)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def check_imports(env: dict, checkout: Path, target: Path, version: str) -> dict:
    """Check that `transformers` is the release under `target` and `segcli` comes from `checkout`."""
    code = "import segcli, transformers; print(transformers.__version__); print(transformers.__file__); " \
           "print(segcli.__file__)"
    done = run([sys.executable, "-c", code], env=env, cwd=checkout)
    if done.returncode != 0:
        raise RuntimeError(f"importing segcli and transformers failed:\n{done.stderr}")
    got_version, transformers_file, segcli_file = done.stdout.split()[-3:]
    if got_version != version:
        raise RuntimeError(f"transformers.__version__ is {got_version}, not {version}")
    if not Path(transformers_file).resolve().is_relative_to(target.resolve()):
        raise RuntimeError(f"transformers comes from {transformers_file}, not from {target}")
    if not Path(segcli_file).resolve().is_relative_to(checkout.resolve()):
        raise RuntimeError(f"segcli comes from {segcli_file}, not from {checkout}")
    return {"transformers_file": transformers_file, "segcli_file": segcli_file}


def run_tests(env: dict, checkout: Path, target: Path, log: Path, timeout_s: float) -> tuple[int, float]:
    """Run the transformers_api tests, pytest's output going to `log`; return (exit status, seconds)."""
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS[:3], "--basetemp", str(target / "tmp"), *PYTEST_ARGS[3:]]
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            out.write(f"\n[transformers_sweep: stopped after {timeout_s:.0f} s]\n")
            returncode = -9
    return returncode, time.monotonic() - start


def parse_log(text: str) -> dict:
    """Counts, failing test ids, skip reasons and missing families from a `pytest -q -rfEs` log."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0, "xfailed": 0, "xpassed": 0}
    summary = None
    for line in text.splitlines():
        if re.search(r"\bin [\d.]+s\b", line) and re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line):
            summary = line.strip("= \n")
    if summary:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", summary):
            counts["errors" if word.startswith("error") else word] = int(number)
    failing, skips, missing = [], {}, []
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            failing.append(line.split(" ", 1)[1].split(" - ", 1)[0].strip())
        match = re.match(r"SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", line)
        if match:
            reason = match.group(2).strip()
            skips[reason] = skips.get(reason, 0) + int(match.group(1))
            for pattern in MISSING_FAMILY:
                family = pattern.match(reason)
                if family and family.group(1) not in missing:
                    missing.append(family.group(1))
    return {"summary": summary, "counts": counts, "failing": failing, "skip_reasons": skips,
            "missing_families": sorted(missing)}


def short_id(test_id: str) -> str:
    """tests/hf/test_hf_families.py::test_x[a] -> test_hf_families::test_x[a]."""
    path, _, rest = test_id.partition("::")
    name = Path(path).name.removesuffix(".py")
    return f"{name}::{rest}" if rest else name


def sweep_release(version: str, base: Path, checkout: Path, commit: str, info: dict, timeout_s: float) -> dict:
    """Install, check and test one release; write its log and return its record (also on failure to install)."""
    target = base / f"transformers-{version}"
    log = OUT_DIR / f"{version}.log"
    record = {"version": version, "commit": commit, "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "ok": False, "returncode": None, "counts": {}, "failing": [], "missing_families": [],
        "skip_reasons": {}, "seconds": None, "log": str(log.relative_to(ROOT)), "setup": {}, "problem": None,
        "machine": {**info, "load_at_start": machine().get("load_at_start")}}
    env = {**os.environ, **TEST_ENV, "PYTHONPATH": f"{checkout}{os.pathsep}{target}"}
    try:
        print(f"[{version}] installing into {target}", flush=True)
        record["setup"] = install_release(version, target)
        record["setup"].update(check_imports(env, checkout, target, version))
        print(f"[{version}] {record['setup']['probe']}; segcli from {record['setup']['segcli_file']}", flush=True)
    except (RuntimeError, OSError) as error:
        record["problem"] = str(error)
        print(f"[{version}] could not be set up: {error}", flush=True)
        return record
    print(f"[{version}] testing, log in {log}", flush=True)
    returncode, seconds = run_tests(env, checkout, target, log, timeout_s)
    parsed = parse_log(log.read_text(encoding="utf-8", errors="replace"))
    record.update(returncode=returncode, seconds=round(seconds, 1), counts=parsed["counts"],
                  failing=parsed["failing"], missing_families=parsed["missing_families"],
                  skip_reasons=parsed["skip_reasons"], summary=parsed["summary"])
    record["ok"] = returncode == 0 and not parsed["failing"] and parsed["counts"]["passed"] > 0
    if returncode == -9:
        record["problem"] = f"timed out after {timeout_s:.0f} s"
    elif not record["ok"] and not parsed["failing"]:
        record["problem"] = f"pytest exited {returncode}: {parsed['summary'] or last_line(log.read_text())}"
    print(f"[{version}] {'passed' if record['ok'] else 'FAILED'}: {parsed['summary']}", flush=True)
    return record


def failing_cell(record: dict, limit: int = 8) -> str:
    """The markdown table's failing-tests cell: short ids (at most `limit`), the problem, or 'none'."""
    if record["problem"] and not record["failing"]:
        return record["problem"].splitlines()[0]
    if not record["failing"]:
        return "none"
    ids = [f"`{short_id(t)}`" for t in record["failing"][:limit]]
    if len(record["failing"]) > limit:
        ids.append(f"and {len(record['failing']) - limit} more (results.jsonl)")
    return ", ".join(ids)


def minutes(record: dict) -> str:
    """A record's test time in minutes, one decimal."""
    return "-" if record["seconds"] is None else f"{record['seconds'] / 60:.1f}"


def markdown_table(records: list[dict]) -> str:
    """One row per release: release, passed, failed, skipped, missing families, failing tests, minutes."""
    rows = ["| release | passed | failed | skipped | missing families | failing tests | minutes |",
            "|---|---:|---:|---:|---|---|---:|"]
    for r in records:
        c = r["counts"]
        failed = str(c.get("failed", "-"))
        if c.get("errors"):
            failed += f" (+{c['errors']} errors)"
        missing = ", ".join(r["missing_families"]) or "none"
        pins = " (hub pins)" if r["setup"].get("pins") else ""
        rows.append(f"| {r['version']}{pins} | {c.get('passed', '-')} | {failed} | {c.get('skipped', '-')} | "
                    f"{missing} | {failing_cell(r)} | {minutes(r)} |")
    return "\n".join(rows)


def text_table(records: list[dict]) -> str:
    """The plain-text table printed at the end."""
    header = ("release", "result", "passed", "failed", "errors", "skipped", "missing families", "minutes")
    rows = [header]
    for r in records:
        c = r["counts"]
        rows.append((r["version"], "ok" if r["ok"] else "FAILED", str(c.get("passed", "-")), str(c.get("failed", "-")),
                     str(c.get("errors", "-")), str(c.get("skipped", "-")), ", ".join(r["missing_families"]) or "none",
                     minutes(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for r in records:
        for test_id in r["failing"]:
            lines.append(f"{r['version']} failing: {test_id}")
        if r["problem"]:
            lines.append(f"{r['version']} problem: {r['problem'].splitlines()[0]}")
    return "\n".join(lines)


def method_lines(command: str, commit: str, subject: str, info: dict, worktree: bool) -> list[str]:
    """How the results were produced: command, commit, machine."""
    where = "a git worktree of that commit" if worktree else "the working tree as it was (--no-worktree)"
    return [f"Command: `{command}`",
            f"Per release: `PYTHONPATH=CHECKOUT:DIR HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m pytest "
            f"{' '.join(PYTEST_ARGS[:3])} --basetemp DIR/tmp {' '.join(PYTEST_ARGS[3:])}`, DIR holding "
            f"`pip install --no-deps --target DIR transformers==V` (CHECKOUT: {where})",
            f"segcli commit: `{commit}` ({subject})",
            f"Machine: {describe_machine(info)}"]


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in version.split("."))


def with_earlier(records: list[dict], commit: str) -> list[dict]:
    """This run's records plus, for releases it did not run, the latest record of the same segcli commit in
    results.jsonl (so that sweeps of parts of the range, run side by side, make one table), in release order."""
    by_version = {}
    if RESULTS.exists():
        for line in RESULTS.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and r.get("commit") == commit and "version" in r:
                by_version[r["version"]] = r
    by_version.update({r["version"]: r for r in records})
    return sorted(by_version.values(), key=lambda r: _version_key(r["version"]))


def markdown_block(records: list[dict], method: list[str], started: str, finished: str) -> str:
    """The text between the sweep markers: the method, the table, and notes on pins."""
    lines = [f"- {line}" for line in method] + [f"- Date: {started} to {finished}", "", markdown_table(records)]
    pinned = [r["version"] for r in records if r["setup"].get("pins")]
    if pinned:
        lines += ["", f"(hub pins): {', '.join(pinned)} failed to load a tiny model beside the environment's "
                  f"huggingface_hub, so the sweep added `{' '.join(OLD_HUB_PINS)}` (as .ci/run does)."]
    return "\n".join(lines)


NEW_DOC = """# segcli under transformers releases

The table below is written by `scripts/transformers_sweep.py` (never by hand). For each transformers release it
installs that release alone into a throwaway directory beside the rest of the environment and runs the tests that
depend on transformers' API, the ones `.ci/run` also runs under an older release: `-m transformers_api` over
`tests/hf` and `tests/recurrent` (the HF and recurrent backends, segcli.hf's cache layers, attention hooks, masks and
rotary rules, the scored policies, memory files, every recurrent and hybrid family, and the issue-17 family matrix
on one family per code path). Run it over the releases in the dependency bound before widening it.

"Missing families" are families the release does not have (their tests skip). Failing tests are given by file and
test name; the full ids, logs and skip reasons are in `experiments/transformers-sweep/`.

"""


def write_doc(path: Path, block: str) -> None:
    """Replace what lies between the sweep markers in `path` with `block`, touching nothing else.

    A missing file is created with a title and an explanation; a file without the markers gets them appended.
    """
    section = f"{BEGIN}\n{block}\n{END}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(NEW_DOC + section + "\n", encoding="utf-8")
        return
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start == -1 or end == -1 or end < start:
        if start != -1 or end != -1:
            raise SystemExit(f"{path}: the sweep markers are incomplete or out of order; fix them by hand")
        path.write_text(text + ("" if text.endswith("\n") else "\n") + "\n" + section + "\n", encoding="utf-8")
        return
    path.write_text(text[:start] + section + text[end + len(END):], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Sweep the given releases; return 0 if every one passed, 1 otherwise."""
    args = parse_args(argv)
    # A SIGTERM (e.g. `kill`) unwinds like Ctrl-C, so the worktree and the installs are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    commit = git("rev-parse", "--verify", f"{args.commit}^{{commit}}")
    subject = git("log", "-1", "--format=%s", commit)
    if len(subject) > 100:
        subject = subject[:97] + "..."
    info = machine()
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    method = method_lines(command, commit, subject, info, args.worktree)
    print("\n".join(method), flush=True)
    if args.from_results:  # no run: the table of what results.jsonl holds for this commit (sweeps run side by side)
        records = [r for r in with_earlier([], commit) if r["version"] in args.versions]
        if args.write:
            write_doc(args.write, markdown_block(records, method, "see results.jsonl", "see results.jsonl"))
            print(f"wrote the table of {len(records)} recorded releases into {args.write}")
        print(text_table(records))
        return 0 if records and all(r["ok"] for r in records) else 1
    if not args.worktree and git("status", "--porcelain", "--untracked-files=no"):
        print("note: --no-worktree with uncommitted changes: the tests see them, the commit above does not",
              flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="transformers-sweep-"))
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    total = time.monotonic()
    records, checkout = [], ROOT
    try:
        if args.worktree:
            checkout = make_worktree(commit, base)
            print(f"worktree: {checkout}", flush=True)
        for version in args.versions:
            record = sweep_release(version, base, checkout, commit, info, args.timeout_minutes * 60)
            record["worktree"] = args.worktree
            records.append(record)
            with RESULTS.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record, sort_keys=True) + "\n")
    finally:
        if args.worktree and checkout != ROOT:
            remove_worktree(checkout)
        if args.keep:
            print(f"kept the installed releases under {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    finished = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if args.write:
        write_doc(args.write, markdown_block(with_earlier(records, commit), method, started, finished))
        print(f"wrote the table into {args.write}")
    print()
    print(text_table(records))
    print(f"\n{len(records)} releases in {(time.monotonic() - total) / 60:.1f} minutes; results in "
          f"{RESULTS.relative_to(ROOT)}")
    return 0 if records and all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
