"""Every memory policy at one memory budget, in one markdown table: loss and bits per byte on sample documents
(`segcli compare`) and passkey retrieval (`segcli probe`). The table is produced by the commands, never typed.

    python scripts/policy_table.py                       # run the commands, print the markdown
    python scripts/policy_table.py --write               # ... and rewrite its section of docs/MODEL_CARD.md
    python scripts/policy_table.py --raw DIR             # keep the commands' JSON Lines in DIR
    python scripts/policy_table.py --from DIR --print    # render what an earlier --raw run kept; run nothing

Each command runs as a `segcli` subprocess on one torch thread (OMP_NUM_THREADS=1), CPU, float32, seed 0, the
bundled model, every policy at the same segment size and the same n_c (--memory-size; sink keeps its 4 sinks on
top, compressive its 128 pooled slots, as their defaults). The markdown starts with the exact commands and the
machine, so the section it writes says how to get it again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = ROOT / "docs" / "MODEL_CARD.md"
START = re.compile(r"<!-- policy-table:start[^\n]*-->\n")
END = "<!-- policy-table:end -->"
POLICIES = ("full", "none", "fifo", "xl", "sink", "average", "compressive", "linear",
            "tova", "h2o", "snapkv", "keynorm")
DOCS = ("hamlet", "python_docs")


def commands(args) -> dict[str, list[str]]:
    """name -> argv (after `segcli`); the name is also the JSON Lines file's stem."""
    common = ["--memory", ",".join(args.policies), "--segment-sizes", str(args.segment_size),
              "--memory-size", str(args.memory_size), "--device", "cpu", "--dtype", "float32", "--seed", "0"]
    out = {f"compare-{d}": ["compare", f"sample_docs/{d}.txt", *common, "--max-tokens", str(args.max_tokens)]
           for d in args.docs}
    out["probe"] = ["probe", "--tasks", "passkey", "--lengths", args.lengths, "--depths", args.depths,
                    "--samples", str(args.samples), *common]
    return out


def shown(argv: list[str], name: str) -> str:
    return "segcli " + shlex.join(argv) + f" --format jsonl --output {name}.jsonl"


def run(cmds: dict[str, list[str]], raw: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    (raw / "commit.txt").write_text(commit() + "\n", encoding="utf-8")  # the code the commands run
    for name, argv in cmds.items():
        print(f"policy_table: {shown(argv, name)}", file=sys.stderr, flush=True)
        out = raw / f"{name}.jsonl"
        full = [sys.executable, "-m", "segcli", *argv, "--format", "jsonl", "--quiet", "--output", str(out)]
        done = subprocess.run(full, cwd=ROOT, env=env)
        if done.returncode != 0:
            sys.exit(f"policy_table: {name} failed (exit {done.returncode})")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, 1 torch thread"


def commit() -> str:
    """HEAD, and +dirty(segcli) when the package's tracked files differ from it (what the commands ran)."""
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "segcli"], capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return (head or "unknown") + ("+dirty(segcli)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render(cmds: dict[str, list[str]], raw: Path, args) -> str:
    rows: dict[str, dict] = {p: {} for p in args.policies}
    versions = {}
    for d in args.docs:
        recs = records(raw / f"compare-{d}.jsonl")
        for r in recs:
            if r.get("type") == "row":
                rows[r["policy"]][d] = r
            elif r.get("type") == "summary":
                versions = r["config"]["versions"]
    probe = next(r for r in records(raw / "probe.jsonl") if r.get("type") == "probe_summary")
    for s in probe["settings"]:
        rows[s["policy"]]["probe"] = s
    tokens = {d: rows[args.policies[0]][d]["tokens"] for d in args.docs}
    prompts = rows[args.policies[0]]["probe"]["prompts"]
    ran = (raw / "commit.txt").read_text(encoding="utf-8").strip() if (raw / "commit.txt").exists() else commit()

    lines = ["Every policy at the same budget: n_c = "
             f"{args.memory_size} pairs, segments of n_s = {args.segment_size} tokens (sink: 4 sinks + n_c; "
             "compressive: n_c + 128 slots pooled 4:1; xl holds one segment; average one slot; linear a d x d state "
             "per head), the bundled model, CPU float32, one torch thread, seed 0. Produced by "
             "`python scripts/policy_table.py --write`, which runs (one `segcli` process each, "
             "OMP_NUM_THREADS=1):", "", "```sh"]
    lines += [shown(argv, name) for name, argv in cmds.items()]
    lines += ["```", "",
              f"Machine: {machine()}; segcli at commit {ran}, torch {versions.get('torch', '?')}, "
              f"transformers {versions.get('transformers', '?')}. Loss in nats per token and bits per byte over the "
              f"first {', '.join(f'{tokens[d]:,}' for d in args.docs)} tokens of "
              f"{', '.join(f'sample_docs/{d}.txt' for d in args.docs)}; passkey: {prompts} prompts per policy "
              f"(lengths {args.lengths.replace(',', ', ')} tokens, needle depths {args.depths.replace(',', ', ')} %, "
              f"{args.samples} samples each), accuracy (the argmax is the key at every answer token), mean answer "
              "NLL in nats, and the share of prompts whose needle was still in memory when the question was read "
              "(of those where the policy can say).", ""]
    head = ["policy", "memory (MiB)"]
    for d in args.docs:
        head += [f"{d} loss", f"{d} bits/byte"]
    head += ["passkey accuracy", "answer NLL", f"NLL, needle < {args.memory_size} back",
             f"NLL, needle >= {args.memory_size} back", "needle held"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for p in args.policies:
        r = rows[p]
        cells = [f"`{p}`", f"{r[args.docs[0]]['memory_bytes'] / 2**20:.2f}"]
        for d in args.docs:
            cells += [f"{r[d]['loss']:.4f}", f"{r[d]['bits_per_byte']:.4f}"]
        pr = r["probe"]
        near, far = by_distance(pr, args.memory_size)
        held = f"{pr['in_memory']:.2f} of {pr['in_memory_known']}" if pr.get("in_memory_known") else "-"
        cells += [f"{pr['accuracy']:.2f}", f"{pr['answer_nll']:.2f}", near, far, held]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "memory: the most bytes the policy's memory held at once, all layers, on "
              f"{args.docs[0]} (`compare`'s memory_bytes: buffers as allocated, room for the next segment included). "
              "The two NLL columns split the prompts by the needle's distance from the question "
              "(`probe_summary` settings[].by_distance): within "
              f"the n_c = {args.memory_size} pairs a fifo keeps, or beyond them. needle held: `-` where the policy "
              "cannot say (average, linear; the scored policies: the probe does not read their positions yet)."]
    return "\n".join(lines) + "\n"


def by_distance(setting: dict, n_c: int) -> tuple[str, str]:
    """Mean answer NLL (prompt-weighted) of the distance buckets within n_c and of those at n_c or more."""
    out = []
    for inside in (True, False):
        cells = [b for b in setting["by_distance"]
                 if (b["distance_to"] <= n_c if inside else b["distance_from"] >= n_c)]
        n = sum(b["prompts"] for b in cells)
        out.append(f"{sum(b['answer_nll'] * b['prompts'] for b in cells) / n:.2f} ({n})" if n else "-")
    return out[0], out[1]


def write_section(md: str, path: Path = MODEL_CARD) -> None:
    text = path.read_text(encoding="utf-8")
    m = START.search(text)
    if not m or END not in text[m.end():]:
        sys.exit(f"policy_table: {path} has no <!-- policy-table:start --> ... {END} markers")
    end = text.index(END, m.end())
    path.write_text(text[: m.end()] + md + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-size", type=int, default=128, help="n_c of every bounded policy")
    p.add_argument("--segment-size", type=int, default=16, help="n_s of every row")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens of each document (2,048: the trained length)")
    p.add_argument("--docs", default=",".join(DOCS), help="sample_docs/<name>.txt, comma-separated")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--lengths", default="256,512,1024", help="passkey prompt lengths")
    p.add_argument("--depths", default="0,50,100", help="passkey needle depths (%%)")
    p.add_argument("--samples", type=int, default=2, help="passkey prompts per length and depth")
    p.add_argument("--raw", default=None, help="keep the commands' JSON Lines in this folder")
    p.add_argument("--from", dest="source", default=None, help="render the JSON Lines an earlier --raw run kept")
    p.add_argument("--write", action="store_true",
                   help=f"rewrite the table's section of {MODEL_CARD.relative_to(ROOT)}")
    p.add_argument("--print", dest="show", action="store_true", help="print the markdown (the default without --write)")
    args = p.parse_args(argv)
    args.docs = [d for d in args.docs.split(",") if d]
    args.policies = [x for x in args.policies.split(",") if x]
    cmds = commands(args)
    with tempfile.TemporaryDirectory(prefix="segcli-policy-table-") as tmp:
        raw = Path(args.source or args.raw or tmp)
        if args.source is None:
            raw.mkdir(parents=True, exist_ok=True)
            run(cmds, raw)
        md = render(cmds, raw, args)
    if args.write:
        write_section(md)
    if args.show or not args.write:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
