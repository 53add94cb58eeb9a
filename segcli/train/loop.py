"""Training the native model with segment-level recurrence (`segcli train`).

Each step draws a memory policy, a segment size and a memory size, cuts a batch
of sequences into segments, and carries the memory across them, detached between
segments as in Transformer-XL (one backward per segment, one optimizer step per
batch). Drawing policies keeps every policy, the linear memory's gate included,
in distribution at inference. Library code: yields progress events, never prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .config import from_mapping, load_yaml
from .errors import UsageError
from .memory import POLICY_NAMES, make_policy
from .models.seglm import SegLMConfig, SegLMForCausalLM


@dataclass
class TrainConfig:
    corpus: str = "corpus/train"  # folder of UTF-8 .txt files (searched recursively)
    tokenizer: str = "segcli/bundled/tokenizer.json"  # tokenizer.json to use
    out_dir: str = "runs/seglm"  # checkpoints and the final model
    model: dict = field(default_factory=dict)  # SegLMConfig fields
    seq_len: int = 1024  # tokens per training sequence (memory is carried inside it)
    batch_size: int = 32  # sequences per step
    steps: int = 1000  # optimizer steps
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.1
    smear_lr_scale: float = 1.0  # the key_smear shares (one scalar per head) learn at lr x this
    grad_clip: float = 1.0
    policies: dict = field(default_factory=lambda: {"fifo": 1.0})  # policy -> sampling weight
    segment_sizes: list = field(default_factory=lambda: [128])  # drawn uniformly per step
    memory_sizes: list = field(default_factory=lambda: [512])  # drawn uniformly per step (n_c)
    sink_tokens: int = 4
    compress_rate: int = 4
    val_fraction: float = 0.01  # share of 4096-token blocks held out for validation
    val_every: int = 200  # steps between validation losses
    val_batches: int = 8
    checkpoint_every: int = 200  # steps between resumable checkpoints
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bfloat16 autocast on CUDA (CPU always float32)
    max_minutes: float | None = None  # if set, steps are reduced to fit after timing the first steps
    keep_best: bool = True  # save the weights with the best validation loss (early stopping)
    init_from: str | None = None  # a saved model folder to start from (fine-tuning); `model` keys change its config
    # copy-rich data: in a share of the sequences, passages reappear verbatim later in the same sequence, so the
    # model learns to retrieve from memory across long gaps (what the recall document measures)
    copy_prob: float = 0.0  # share of training sequences that get copied passages
    copy_passages: int = 3  # passages copied per such sequence
    copy_len: list = field(default_factory=lambda: [32, 128])  # passage length in tokens, drawn uniformly [lo, hi]
    copy_gap: list = field(default_factory=lambda: [16, 1536])  # tokens between a passage's end and its copy
    copy_gap_scale: str = "uniform"  # how gaps are drawn in copy_gap: uniform | log (log-uniform: short gaps as often as long)
    # repeated strings: in a share of the sequences, a string of corpus tokens drawn at random (unigram frequencies)
    # is repeated to fill the row. Only copying predicts it (its first occurrence is not scored): the textbook way to
    # grow the induction heads that retrieval from memory needs (docs/MODEL_CARD.md, "Long-range recall")
    repeat_prob: float = 0.0  # share of training sequences replaced by a repeated string
    repeat_len: list = field(default_factory=lambda: [8, 128])  # string length (the repeat period), uniform [lo, hi]
    repeat_ids: str = "unigram"  # how the string's ids are drawn: unigram (corpus frequencies) | uniform (any id but 0)
    # position jumps: in a share of the steps every row is cut in two halves (one segment each, fifo memory) and
    # the second half's positions move `jump` further on, as if that many unseen tokens lay between them; passages
    # of the first half reappear in the second. RoPE distances of a long gap at the cost of a short row, so the
    # CPU can practise copying across 1,000-2,000 positions (docs/MODEL_CARD.md, "Long-range recall").
    jump_prob: float = 0.0  # share of steps that are jump steps
    jump: list = field(default_factory=lambda: [256, 1536])  # positions skipped, drawn uniformly [lo, hi] per step


def load_train_config(path: str | None, overrides: dict[str, Any], settings: dict[str, Any] | None = None) -> TrainConfig:
    """The YAML at `path` with `settings` (any keys, checked like the YAML's) merged in, then `overrides`
    (the CLI's own options; None means not given)."""
    data = {**(load_yaml(path) if path else {}), **(settings or {})}
    cfg = from_mapping(TrainConfig, data, str(path or "train config") + (" with --set" if settings else ""))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if overrides.get("steps") is not None or "steps" in (settings or {}):  # an explicit step count: no time fitting
        cfg = dataclasses.replace(cfg, max_minutes=None)
    for p in cfg.policies:
        if p not in POLICY_NAMES:
            raise UsageError(f"train config: unknown policy {p!r} in policies")
    try:
        SegLMConfig(**cfg.model)
    except (TypeError, ValueError) as e:
        raise UsageError(f"train config: bad model settings ({e})") from None
    if not cfg.smear_lr_scale > 0:
        raise UsageError(f"train config: smear_lr_scale must be > 0, got {cfg.smear_lr_scale}")
    if not 0.0 <= cfg.copy_prob <= 1.0:
        raise UsageError(f"train config: copy_prob must be in [0, 1], got {cfg.copy_prob}")
    if not 0.0 <= cfg.repeat_prob <= 1.0 or cfg.copy_prob + cfg.repeat_prob > 1.0:
        raise UsageError(f"train config: repeat_prob must be in [0, 1 - copy_prob], got {cfg.repeat_prob}")
    for name in ("copy_len", "copy_gap", "repeat_len", "jump"):
        lo_hi = getattr(cfg, name)
        if len(lo_hi) != 2 or not all(isinstance(v, int) and v >= 1 for v in lo_hi) or lo_hi[0] > lo_hi[1]:
            raise UsageError(f"train config: {name} must be [lo, hi] with 1 <= lo <= hi, got {lo_hi}")
    if not 0.0 <= cfg.jump_prob <= 1.0:
        raise UsageError(f"train config: jump_prob must be in [0, 1], got {cfg.jump_prob}")
    if cfg.jump_prob > 0 and cfg.seq_len // 2 <= cfg.copy_len[1]:
        raise UsageError(f"train config: jump steps need seq_len / 2 > copy_len's upper end ({cfg.copy_len[1]})")
    if cfg.copy_gap_scale not in ("uniform", "log"):
        raise UsageError(f"train config: copy_gap_scale must be uniform or log, got {cfg.copy_gap_scale!r}")
    if cfg.repeat_ids not in ("unigram", "uniform"):
        raise UsageError(f"train config: repeat_ids must be unigram or uniform, got {cfg.repeat_ids!r}")
    if cfg.init_from is not None and not (Path(cfg.init_from) / "config.json").is_file():
        raise UsageError(f"train config: init_from {cfg.init_from}: not a saved model folder (no config.json)")
    return cfg


# -- data ---------------------------------------------------------------------
def corpus_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise UsageError(f"corpus {folder}: no .txt files found")
    return files


def tokenize_corpus(cfg: TrainConfig, out_dir: Path) -> np.ndarray:
    """All corpus files tokenized and joined with EOS (id 0); cached by content hash."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(cfg.tokenizer)
    files = corpus_files(Path(cfg.corpus))
    h = hashlib.sha256(Path(cfg.tokenizer).read_bytes())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    cache = out_dir / f"tokens-{h.hexdigest()[:16]}.npy"
    if cache.exists():
        return np.load(cache)
    texts = [f.read_text(encoding="utf-8") for f in files]
    encs = tok.encode_batch(texts, add_special_tokens=False)
    eos = tok.token_to_id("<|endoftext|>") or 0
    arr = np.concatenate([np.array(e.ids + [eos], dtype=np.int32) for e in encs])
    np.save(cache, arr)
    return arr


def split_blocks(n_tokens: int, block: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Block starts for training and validation (a deterministic random subset of blocks)."""
    starts = np.arange(0, n_tokens - block - 1, block)
    rng = np.random.default_rng(seed + 1)
    is_val = rng.random(len(starts)) < val_fraction
    return starts[~is_val], starts[is_val]


def sample_batch(tokens: np.ndarray, starts: np.ndarray, block: int, length: int, batch: int, rng: np.random.Generator) -> torch.Tensor:
    """(batch, length + 1) windows, each inside one training block."""
    picks = rng.choice(starts, size=batch)
    offs = rng.integers(0, block - length, size=batch) if block > length else np.zeros(batch, dtype=np.int64)
    return torch.from_numpy(np.stack([tokens[s + o : s + o + length + 1] for s, o in zip(picks, offs)]).astype(np.int64))


def insert_copies(x: np.ndarray, rng: np.random.Generator, passages: int, length: tuple[int, int],
                  gap: tuple[int, int], log_gap: bool = False) -> np.ndarray:
    """Copy passages of x (B, N) verbatim further along the same row, in place.

    Returns a (B, N) bool mask of the positions holding a copy. Passages are placed left to right
    without overlapping each other or earlier copies, so every copy repeats text that is in the row.
    """
    mask = np.zeros(x.shape, dtype=bool)
    n = x.shape[1]
    for b in range(x.shape[0]):
        pos = int(rng.integers(0, max(1, n // (2 * passages))))
        for _ in range(passages):
            m = int(rng.integers(length[0], length[1] + 1))
            if log_gap:
                g = int(round(math.exp(rng.uniform(math.log(gap[0]), math.log(gap[1] + 1)))))
                g = min(max(g, gap[0]), gap[1])
            else:
                g = int(rng.integers(gap[0], gap[1] + 1))
            dst = pos + m + g
            if dst + m > n:
                break
            x[b, dst : dst + m] = x[b, pos : pos + m]
            mask[b, dst : dst + m] = True
            pos = dst + m + int(rng.integers(0, length[1] + 1))
    return mask


def repeat_random(tokens: np.ndarray, n: int, rng: np.random.Generator, length: tuple[int, int],
                  vocab: int | None = None) -> tuple[np.ndarray, int]:
    """(n,) ids: a string of tokens with a length drawn from [lo, hi], repeated to fill n, and that length (the
    first occurrence, positions 0..length-1, is unpredictable). Ids are drawn independently from the corpus
    (unigram frequencies), or uniformly from 1..vocab-1 when `vocab` is given: no id is likelier than another,
    so nothing but copying lowers the loss (id 0, the document separator, is left out)."""
    m = int(rng.integers(length[0], length[1] + 1))
    ids = tokens[rng.integers(0, len(tokens), size=m)] if vocab is None else rng.integers(1, vocab, size=m)
    return np.resize(ids.astype(tokens.dtype), n), m


def repeat_vocab(model, cfg: TrainConfig) -> int | None:
    """The vocabulary uniform repeated strings draw from (None: unigram draws from the corpus)."""
    return model.config.vocab_size if cfg.repeat_ids == "uniform" else None


def draw_batch(tokens, starts, block, cfg: TrainConfig, batch: int, rng: np.random.Generator,
               vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch x (batch, seq_len + 1): copied passages in a `copy_prob` share of the rows, a repeated
    random string in a `repeat_prob` share (vocab: the model's, for repeat_ids uniform). Also returns the bool
    masks, over x's positions, of copied positions and of scored positions (False where a token is unpredictable
    by construction)."""
    x = sample_batch(tokens, starts, block, cfg.seq_len, batch, rng).numpy()
    mask = np.zeros(x.shape, dtype=bool)
    scored = np.ones(x.shape, dtype=bool)
    kind = rng.random(batch) if cfg.copy_prob > 0 or cfg.repeat_prob > 0 else np.ones(batch)
    rows = np.flatnonzero(kind < cfg.copy_prob)
    if len(rows):
        sub = x[rows]
        mask[rows] = insert_copies(sub, rng, cfg.copy_passages, tuple(cfg.copy_len), tuple(cfg.copy_gap),
                                   log_gap=cfg.copy_gap_scale == "log")
        x[rows] = sub
    for r in np.flatnonzero((kind >= cfg.copy_prob) & (kind < cfg.copy_prob + cfg.repeat_prob)):
        x[r], m = repeat_random(tokens, x.shape[1], rng, tuple(cfg.repeat_len), vocab)
        scored[r, : m + 1] = False  # positions 0..m: the first string and the repeat's first token (after an unseen one)
        mask[r, m + 1 :] = True
    return torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(scored)


def jump_batch(tokens, starts, block, cfg: TrainConfig, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A jump step's batch x (batch, seq_len + 1) and its scored mask: inputs 0..h-1 are the first half
    (h = seq_len // 2), h.. the second; `copy_passages` passages of the first half are copied into the second
    (not overlapping each other). Target h, the first token after the jump, is not scored."""
    x = sample_batch(tokens, starts, block, cfg.seq_len, batch, rng).numpy()
    h, n = cfg.seq_len // 2, cfg.seq_len + 1
    scored = np.ones(x.shape, dtype=bool)
    scored[:, h] = False
    for b in range(batch):
        lengths = rng.integers(cfg.copy_len[0], cfg.copy_len[1] + 1, size=cfg.copy_passages)
        pos = h + 1
        for m in lengths.tolist():
            room = n - pos - m
            if room < 0:
                break
            dst = pos + int(rng.integers(0, room // 2 + 1))  # leaves room for the passages after it
            src = int(rng.integers(1, h - m + 1))
            x[b, dst : dst + m] = x[b, src : src + m]
            pos = dst + m
    return torch.from_numpy(x), torch.from_numpy(scored)


# -- steps --------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, steps: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def draw_setting(cfg: TrainConfig, rng: random.Random) -> tuple[str, int, int]:
    names = list(cfg.policies)
    policy = rng.choices(names, weights=[cfg.policies[n] for n in names])[0]
    return policy, rng.choice(cfg.segment_sizes), rng.choice(cfg.memory_sizes)


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only; the smeared-key shares at lr x smear_lr_scale (each group's
    `lr_scale`: a share starting at 0 moves about lr per step, too slow to form copy heads in a short stage)."""
    groups: dict[str, list] = {"decay": [], "no_decay": [], "smear": []}
    for name, p in model.named_parameters():
        groups["smear" if name.endswith("key_smear") else "decay" if p.dim() >= 2 else "no_decay"].append(p)
    settings = {"decay": (cfg.weight_decay, 1.0), "no_decay": (0.0, 1.0), "smear": (0.0, cfg.smear_lr_scale)}
    return torch.optim.AdamW([{"params": ps, "weight_decay": settings[k][0], "lr_scale": settings[k][1],
                               "lr": cfg.lr * settings[k][1]}
                              for k, ps in groups.items() if ps],
                             lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train_policy(name: str, nc: int, cfg: TrainConfig):
    """The memory policy `name` with memory size nc and the config's other sizes (compressive: nc / rate slots)."""
    return make_policy(name, memory_size=nc, sink_tokens=cfg.sink_tokens,
                       compress_rate=cfg.compress_rate, compressed_size=max(1, nc // cfg.compress_rate))


def sequence_loss(model, x: torch.Tensor, policy_name: str, ns: int, nc: int, cfg: TrainConfig, amp_dtype, backward: bool,
                  scored: torch.Tensor | None = None, jump: int = 0) -> float:
    """Stream x (B, L+1) through the memory in segments; backward per segment. Returns mean loss over the
    targets (scored (B, L+1), optional: only where True; a segment with none scored adds nothing). With
    `jump`, positions skip that many before the second segment."""
    policy = train_policy(policy_name, nc, cfg)
    length = x.shape[1] - 1
    labels = x if scored is None else x.masked_fill(~scored, -100)
    n_scored = x.shape[0] * length if scored is None else int(scored[:, 1:].sum())
    mem = model.new_memory(policy, x.shape[0], dtype=amp_dtype)
    total = 0.0
    for s in range(0, length, ns):
        if jump and s == ns:
            mem = dataclasses.replace(mem, seen=mem.seen + jump)  # stored keys keep their positions
        inp, tgt = x[:, s : min(s + ns, length)], labels[:, s + 1 : s + ns + 1]  # the last segment may be short
        n = int((tgt != -100).sum())
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            out = model(inp, mem, labels=tgt if n else None)
        mem = out.memory
        if not n:
            continue
        w = n / max(1, n_scored)
        if backward:
            (out.loss * w).backward()
        total += float(out.loss.detach()) * w
    return total


@dataclass
class Event:
    kind: str  # "start" | "step" | "val" | "checkpoint" | "done"
    step: int
    data: dict


def train(cfg: TrainConfig, resume: bool = False) -> Iterator[Event]:
    """Train; yields events for the CLI to show. The final model lands in out_dir/model."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    amp_dtype = torch.bfloat16 if (cfg.amp and device.type == "cuda") else torch.float32
    torch.manual_seed(cfg.seed)
    tokens = tokenize_corpus(cfg, out)
    block = 4096 if cfg.seq_len < 4096 else cfg.seq_len + 1
    train_starts, val_starts = split_blocks(len(tokens), block, cfg.val_fraction, cfg.seed)
    if len(train_starts) == 0:
        raise UsageError(f"corpus {cfg.corpus} is too small: fewer than {block} tokens")
    mcfg = SegLMConfig(**cfg.model)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(cfg.tokenizer).get_vocab_size()
    if mcfg.vocab_size != vocab:
        mcfg = SegLMConfig(**{**cfg.model, "vocab_size": vocab})
    if cfg.init_from is not None:
        # `model` keys given next to init_from change the saved config (parameters they add start from their init)
        model = SegLMForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32, **cfg.model).to(device)
        if model.config.vocab_size != vocab:
            raise UsageError(f"init_from {cfg.init_from}: vocabulary {model.config.vocab_size} != tokenizer's {vocab}")
    else:
        model = SegLMForCausalLM(mcfg).to(device)
    opt = make_optimizer(model, cfg, device)
    np_rng = np.random.default_rng(cfg.seed)
    py_rng = random.Random(cfg.seed)
    step, steps, log = 0, cfg.steps, []
    ckpt = out / "checkpoint.pt"
    if resume:
        if not ckpt.exists():
            raise UsageError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, log = state["step"], state["log"]  # steps: the current config (may extend the run)
        np_rng.bit_generator.state = state["np_rng"]
        py_rng.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    n_params = sum(p.numel() for p in model.parameters())
    yield Event("start", step, {"params": n_params, "tokens": len(tokens), "device": str(device), "steps": steps,
                                "train_blocks": len(train_starts), "val_blocks": len(val_starts)})
    t_start = time.perf_counter()
    t_ref, step_ref = t_start, step
    best_val, best_state = math.inf, None
    model.train()
    ids_vocab = repeat_vocab(model, cfg)
    while step < steps:
        policy, ns, nc = draw_setting(cfg, py_rng)
        jump = py_rng.randint(*cfg.jump) if cfg.jump_prob and py_rng.random() < cfg.jump_prob else 0
        if jump:
            policy, ns, nc = "fifo", cfg.seq_len // 2, max(max(cfg.memory_sizes), cfg.seq_len // 2)
            x, scored = jump_batch(tokens, train_starts, block, cfg, cfg.batch_size, np_rng)
        else:
            x, _, scored = draw_batch(tokens, train_starts, block, cfg, cfg.batch_size, np_rng, ids_vocab)
        x, scored = x.to(device), scored.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, steps) * g.get("lr_scale", 1.0)  # checkpoints before lr_scale: 1
        opt.zero_grad(set_to_none=True)
        loss = sequence_loss(model, x, policy, ns, nc, cfg, amp_dtype, backward=True, scored=scored, jump=jump)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t_start
        if step == step_ref + 10:  # time steps 10..40: past start-up and allocator warm-up
            t_ref = time.perf_counter()
        if cfg.max_minutes and step == step_ref + 40 and not resume:
            per_step = (time.perf_counter() - t_ref) / 30 * 1.03  # ~3% for validation and checkpoints
            steps = min(steps, max(step + 1, int((cfg.max_minutes * 60 - (t_ref - t_start)) / per_step) + 10))
        rec = {"step": step, "loss": loss, "lr": lr_at(step - 1, cfg, steps), "policy": policy, "segment_size": ns,
               "memory_size": nc, "grad_norm": grad_norm, "elapsed_s": elapsed, "steps": steps}
        if jump:
            rec["jump"] = jump
        log.append(rec)
        yield Event("step", step, rec)
        if (step % cfg.val_every == 0 or step == steps) and len(val_starts):
            v = validate(model, tokens, val_starts, block, cfg, device, amp_dtype)
            log[-1]["val"] = v
            if cfg.keep_best and v["val_fifo"] < best_val:
                best_val = v["val_fifo"]
                best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
                v = {**v, "best_step": step}
            yield Event("val", step, v)
        if step % cfg.checkpoint_every == 0 or step == steps:
            save_checkpoint(ckpt, model, opt, step, steps, log, np_rng, py_rng)
            yield Event("checkpoint", step, {"path": str(ckpt)})
    if best_state is not None:
        model.load_state_dict(best_state)
    final = save_final(model, cfg, out, log, time.perf_counter() - t_start)
    yield Event("done", step, {"model_dir": str(final), "seconds": time.perf_counter() - t_start})


@torch.no_grad()
def validate(model, tokens, val_starts, block, cfg, device, amp_dtype) -> dict[str, float]:
    """Validation loss of the held-out training blocks under fifo and none (fixed draws); with copy_prob
    (repeat_prob), also the loss on the copied positions of copy-augmented (repeated-string) validation rows,
    fifo with the largest memory vs none."""
    model.eval()
    rng = np.random.default_rng(12345)
    x = sample_batch(tokens, val_starts, block, cfg.seq_len, cfg.val_batches * 4, rng).to(device)
    out = {}
    for policy in ("fifo", "none"):
        out[f"val_{policy}"] = sequence_loss(model, x, policy, 128, 512, cfg, amp_dtype, backward=False)
    for kind, on in (("copy", cfg.copy_prob > 0), ("repeat", cfg.repeat_prob > 0)):
        if not on:
            continue
        only = dataclasses.replace(cfg, copy_prob=float(kind == "copy"), repeat_prob=float(kind == "repeat"))
        xc, mask, _ = draw_batch(tokens, val_starts, block, only, cfg.val_batches, rng, repeat_vocab(model, cfg))
        for policy in ("fifo", "none"):
            out[f"val_{kind}_{policy}"] = sequence_loss(model, xc.to(device), policy, 128, max(cfg.memory_sizes), cfg,
                                                        amp_dtype, backward=False, scored=mask.to(device))
    model.train()
    return out


def save_checkpoint(path: Path, model, opt, step, steps, log, np_rng, py_rng) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "steps": steps, "log": log,
                "np_rng": np_rng.bit_generator.state, "py_rng": py_rng.getstate(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp)
    tmp.replace(path)


def save_final(model, cfg: TrainConfig, out: Path, log: list, seconds: float) -> Path:
    final = out / "model"
    model.eval()
    model.config.trained_length = max(cfg.seq_len, model.config.trained_length or 0)  # run-time span notes
    # float16 storage halves the file (the bundled model must stay <= 25 MB); runs upcast to float32.
    model.to("cpu").to(torch.float16).save_pretrained(final)
    shutil.copy(cfg.tokenizer, final / "tokenizer.json")
    (final / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "model_max_length": 1000000000}, indent=1))
    (final / "training.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "seconds": seconds,
                                                     "steps": log[-1]["step"] if log else 0, "log": log[-50:]}, indent=1))
    return final
