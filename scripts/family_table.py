"""Write the README's table of Hugging Face families x memory policies from the family matrix's results.

    python scripts/family_table.py                 # run tests/hf/test_hf_families.py, then rewrite README.md
    python scripts/family_table.py --results R.json --print   # render results a test run wrote; print, no write

The table is never typed by hand: each cell is what the tests found for that family under that policy, over every
attention implementation it has (eager, SDPA):

- exact: streamed equals one plain forward of the model (DESIGN §1's equivalences: full at n_s 1, 7, 64; fifo at
  n_s 1 and 8 = a sliding window within the model's own windows; xl; none; a memory larger than the text);
- runs: streams (finite logits, bounded memory) where no equivalence defines the numbers (sink and compressive past
  their window, average, linear, tova, h2o, snapkv, keynorm); for sink and compressive a memory larger than the
  text was also exact, and tova, h2o, snapkv and keynorm evict as the native model does (tests/hf/test_hf_scored.py);
- refused: segcli refuses it with one line (the note below the table says why).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START = re.compile(r"<!-- families:start[^\n]*-->\n")
END = "<!-- families:end -->"
COLUMNS = ("full", "fifo", "xl", "none", "sink", "compressive", "average", "linear", "tova", "h2o", "snapkv", "keynorm")
PAST_WINDOW = {p: p + "+" for p in ("sink", "compressive", "average", "linear", "tova", "h2o", "snapkv", "keynorm")}


def run_matrix(out: Path) -> None:
    env = {**os.environ, "SEGCLI_FAMILY_RESULTS": str(out), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/hf/test_hf_families.py"]
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"family_table: the family matrix failed (exit {done.returncode}); the README is left as it was")


def cell(rows: list[dict], policy: str, notes: dict[str, int]) -> str:
    """One family's outcome under one policy, over its attention implementations."""
    keys = [policy] + ([PAST_WINDOW[policy]] if policy in PAST_WINDOW else [])
    mine = [r for r in rows if r["policy"] in keys]
    if not mine:
        return "-"
    good = "runs" if policy in PAST_WINDOW else "exact"
    refused = [r for r in mine if r["outcome"] == "refused"]
    if not refused:
        return good
    why = re.sub(r" \((window|best match off by) [^)]*\)", "", refused[0]["why"].split(": ", 1)[-1])
    why = re.sub(r"\w+ForCausalLM", "its model class", why)
    why = re.sub(r"--memory \w+", "the policy", why)  # one note for every policy refused the same way
    n = notes.setdefault(why, len(notes) + 1)
    bad = sorted({r["implementation"] for r in refused})
    fine = sorted({r["implementation"] for r in mine} - set(bad))
    return f"{good} ({', '.join(fine)}), refused [{n}] ({', '.join(bad)})" if fine else f"refused [{n}]"


def render(results: dict, order: list[str]) -> str:
    by_family: dict[str, list[dict]] = {}
    for r in results["results"]:
        by_family.setdefault(r["family"], []).append(r)
    notes: dict[str, int] = {}
    lines = [f"Tested by `tests/hf/test_hf_families.py` on tiny random models of each family (transformers "
             f"{results['transformers']}; written by `scripts/family_table.py`). exact: streamed = one plain forward; "
             "runs: streams where no equivalence defines the numbers; refused: one line, exit 2.", "",
             "| family | attention | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for family in [f for f in order if f in by_family] + sorted(set(by_family) - set(order)):
        rows = by_family[family]
        impls = ", ".join(sorted({r["implementation"] for r in rows}))
        lines.append(f"| {family} | {impls} | " + " | ".join(cell(rows, p, notes) for p in COLUMNS) + " |")
    if notes:
        lines.append("")
        lines += [f"[{n}] {why}" + ("  " if n < len(notes) else "") for why, n in notes.items()]
    return "\n".join(lines) + "\n"


def write_readme(block: str) -> None:
    text = README.read_text(encoding="utf-8")
    start = START.search(text)
    end = text.find(END)
    if start is None or end < start.end():
        sys.exit("family_table: README.md has no <!-- families:start ... --> / <!-- families:end --> markers")
    README.write_text(text[: start.end()] + block + text[end:], encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, help="results a test run wrote (SEGCLI_FAMILY_RESULTS); default: run it")
    ap.add_argument("--print", action="store_true", help="print the table instead of writing README.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "hf"))
    from hf_families import EXTRA_FAMILIES, FAMILIES

    path = args.results
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="segcli-families-")) / "results.json"
        run_matrix(path)
    block = render(json.loads(path.read_text(encoding="utf-8")), list(FAMILIES) + list(EXTRA_FAMILIES))
    if args.print:
        print(block, end="")
    else:
        write_readme(block)
        print(f"family_table: README.md table rewritten from {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
