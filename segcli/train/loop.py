"""The training loop: each step draws a memory setting, takes a batch from the data tasks, and streams it.

Each step draws a memory policy, a segment size and a memory size, gets its batch from `tasks.draw`
(which may change the plan: a jump step streams two halves through fifo with a position skip), cuts
the batch into segments and streams them through the engine's one segment loop
(`segcli.engine.loop.stream`), the memory carried across them and detached between segments as in
Transformer-XL (one backward per segment, one optimizer step per batch). Drawing policies keeps every
policy, the linear memory's gate included, in distribution at inference. Library code: yields
progress events, never prints.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import resolve_device
from ..engine.loop import split, stream
from ..errors import UsageError
from ..memory import make_policy
from ..models.seglm import SegLMConfig, SegLMForCausalLM
from . import tasks as data_tasks
from .checkpoint import load_checkpoint, save_checkpoint, save_final
from .config import TrainConfig
from .data import TextSource, corpus_files, split_blocks, tokenize_corpus
from .tasks import Plan, RowTask


def lr_at(step: int, cfg: TrainConfig, steps: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def draw_setting(cfg: TrainConfig, rng: random.Random) -> Plan:
    """The step's memory setting: a policy by weight, a segment size and a memory size uniformly."""
    names = list(cfg.policies)
    policy = rng.choices(names, weights=[cfg.policies[n] for n in names])[0]
    return Plan(policy, rng.choice(cfg.segment_sizes), rng.choice(cfg.memory_sizes))


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


def skip_positions(memory, n: int):
    """The memory with its next position n further on (the stored keys keep theirs): n unseen tokens between."""
    return dataclasses.replace(memory, seen=memory.seen + n)


class ModelStep:
    """The engine's step for training: one model forward under autocast, under autograd. Applies the plan's
    position skips before the segments they precede."""

    def __init__(self, model, amp_dtype: torch.dtype, skips: dict[int, int]):
        self.model, self.amp_dtype, self.skips, self.start = model, amp_dtype, skips, 0

    def __call__(self, ids: torch.Tensor, memory):
        if self.start in self.skips:
            memory = skip_positions(memory, self.skips[self.start])
        self.start += ids.shape[1]
        with self.autocast(ids.device):
            out = self.model(ids, memory)
        return out.logits, out.memory, None

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)


def sequence_loss(model, x: torch.Tensor, plan: Plan, cfg: TrainConfig, amp_dtype: torch.dtype, backward: bool,
                  scored: torch.Tensor | None = None) -> float:
    """Stream x (B, L+1) through the memory in segments; backward per segment. Returns the mean loss over the
    targets (scored (B, L+1), optional: only where True; a segment with none scored adds nothing)."""
    policy = train_policy(plan.policy, plan.memory_size, cfg)
    length = x.shape[1] - 1
    labels = x if scored is None else x.masked_fill(~scored, -100)
    n_scored = x.shape[0] * length if scored is None else int(scored[:, 1:].sum())
    if not set(plan.skips) <= set(range(plan.segment_size, length, plan.segment_size)):
        raise ValueError(f"position skips {plan.skips} must precede segments after the first (size {plan.segment_size})")
    step = ModelStep(model, amp_dtype, plan.skips)
    total = 0.0
    for seg in stream(step, model.new_memory(policy, x.shape[0], dtype=amp_dtype), split(x[:, :-1], plan.segment_size)):
        s = seg.item
        tgt = labels[:, s + 1 : s + 1 + seg.logits.shape[1]]  # the last segment may be short
        n = int((tgt != -100).sum())
        if not n:
            continue
        with step.autocast(x.device):  # the loss SegLMForCausalLM computes from labels, computed here from the logits
            loss = F.cross_entropy(seg.logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-100)
        w = n / max(1, n_scored)
        if backward:
            (loss * w).backward()
        total += float(loss.detach()) * w
    return total


@dataclass
class Event:
    kind: str  # "start" | "step" | "val" | "checkpoint" | "done"
    step: int
    data: dict


def train(cfg: TrainConfig, resume: bool = False) -> Iterator[Event]:
    """Train; yields events for the CLI to show. The final model lands in out_dir/model."""
    device = resolve_device(cfg.device)  # --device cuda without a GPU: a usage error before anything is written
    corpus_files(Path(cfg.corpus))  # so is a corpus with no text
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    amp_dtype = torch.bfloat16 if (cfg.amp and device.type == "cuda") else torch.float32
    torch.manual_seed(cfg.seed)
    tokens = tokenize_corpus(Path(cfg.corpus), cfg.tokenizer_path(), out)
    block = 4096 if cfg.seq_len < 4096 else cfg.seq_len + 1
    train_starts, val_starts = split_blocks(len(tokens), block, cfg.val_fraction, cfg.seed)
    if len(train_starts) == 0:
        raise UsageError(f"corpus {cfg.corpus} is too small: fewer than {block} tokens")
    train_text, val_text = TextSource(tokens, train_starts, block), TextSource(tokens, val_starts, block)
    model = build_model(cfg, device)
    opt = make_optimizer(model, cfg, device)
    np_rng = np.random.default_rng(cfg.seed)
    py_rng = random.Random(cfg.seed)
    step, steps, log = 0, cfg.steps, []
    ckpt = out / "checkpoint.pt"
    if resume:
        step, log = load_checkpoint(ckpt, model, opt, np_rng, py_rng, device)
    n_params = sum(p.numel() for p in model.parameters())
    yield Event("start", step, {"params": n_params, "tokens": len(tokens), "device": str(device), "steps": steps,
                                "train_blocks": len(train_starts), "val_blocks": len(val_starts)})
    t_start = time.perf_counter()
    t_ref, step_ref = t_start, step
    best_val, best_state = math.inf, None
    model.train()
    vocab = model.config.vocab_size
    while step < steps:
        batch = data_tasks.draw(cfg.tasks, train_text, cfg, draw_setting(cfg, py_rng), py_rng, np_rng, vocab)
        plan = batch.plan
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, steps) * g.get("lr_scale", 1.0)  # checkpoints before lr_scale: 1
        opt.zero_grad(set_to_none=True)
        loss = sequence_loss(model, batch.x.to(device), plan, cfg, amp_dtype, backward=True,
                             scored=batch.scored.to(device))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t_start
        if step == step_ref + 10:  # time steps 10..40: past start-up and allocator warm-up
            t_ref = time.perf_counter()
        if cfg.max_minutes and step == step_ref + 40 and not resume:
            per_step = (time.perf_counter() - t_ref) / 30 * 1.03  # ~3% for validation and checkpoints
            steps = min(steps, max(step + 1, int((cfg.max_minutes * 60 - (t_ref - t_start)) / per_step) + 10))
        rec = {"step": step, "loss": loss, "lr": lr_at(step - 1, cfg, steps), "policy": plan.policy,
               "segment_size": plan.segment_size, "memory_size": plan.memory_size, "grad_norm": grad_norm,
               "elapsed_s": elapsed, "steps": steps, **batch.record}
        log.append(rec)
        yield Event("step", step, rec)
        if (step % cfg.val_every == 0 or step == steps) and len(val_starts):
            v = validate(model, val_text, cfg, device, amp_dtype)
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


def build_model(cfg: TrainConfig, device: torch.device) -> SegLMForCausalLM:
    """A new model of cfg.model's settings, or the init_from model with them applied; the tokenizer's vocabulary."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(cfg.tokenizer_path())).get_vocab_size()
    init = cfg.init_path()
    if init is not None:
        # `model` keys given next to init_from change the saved config (parameters they add start from their init)
        model = SegLMForCausalLM.from_pretrained(init, dtype=torch.float32, **cfg.model).to(device)
        if model.config.vocab_size != vocab:
            raise UsageError(f"init_from {cfg.init_from}: vocabulary {model.config.vocab_size} != tokenizer's {vocab}")
        return model
    return SegLMForCausalLM(SegLMConfig(**{**cfg.model, "vocab_size": vocab})).to(device)


@torch.no_grad()
def validate(model, text: TextSource, cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype) -> dict[str, float]:
    """Validation loss of the held-out blocks under fifo and none (fixed draws); for each row task that is on,
    also the loss on the copied positions of rows all of that task, fifo with the largest memory vs none."""
    model.eval()
    rng = np.random.default_rng(12345)
    x = torch.from_numpy(text.sample(cfg.seq_len, cfg.val_batches * 4, rng)).to(device)
    out = {}
    for policy in ("fifo", "none"):
        out[f"val_{policy}"] = sequence_loss(model, x, Plan(policy, 128, 512), cfg, amp_dtype, backward=False)
    for task in data_tasks.in_order(cfg.tasks):
        name = task.name
        if not isinstance(task, RowTask) or not task.prob > 0:
            continue
        only = dataclasses.replace(task, prob=1.0)
        xc, copied, _ = data_tasks.row_batch([only], text, cfg.seq_len, cfg.val_batches, rng, model.config.vocab_size)
        xc, copied = torch.from_numpy(xc).to(device), torch.from_numpy(copied).to(device)
        for policy in ("fifo", "none"):
            out[f"val_{name}_{policy}"] = sequence_loss(model, xc, Plan(policy, 128, max(cfg.memory_sizes)), cfg,
                                                        amp_dtype, backward=False, scored=copied)
    model.train()
    return out
