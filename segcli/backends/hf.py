"""Any Hugging Face causal LM, streamed through segcli's policies as transformers cache layers (`segcli.hf`).

The model runs the attention implementation transformers picks for it (SDPA where the family has it, else
eager), so what is streamed is the model's own computation; only `--memory linear` switches it to segcli's
attention function ("segcli": the model's own eager attention plus the linear read), and back afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..config import RunConfig
from ..errors import UsageError
from ..memory import make_policy
from ..ops.layout import column_major_linears
from ..hf import (
    SegcliCache, cache_kwarg, extra_mask, make_cache, model_features, register_attention, track_memory_mass,
    visible_in_stream,
)
from ..hf.features import LayerKind
from ..hf.layers import PolicyLayer
from ..hf.sinks import moved_sinks, sink_visible
from . import guard
from ..cache import remembered
from .folder_checks import check_hf_model_fits, reason, refuse_incomplete
from .base import Backend, cached_sha256, fifo_stats, model_fingerprint


TOKEN_PASS_POLICIES = ("full", "fifo", "sink")  # exact pairs (sink's moved per query): one forward per token pass
TOKEN_PASS = 128  # tokens per pass under full (fifo: its window, at most this; see engine.stream.pass_size)
PASS_CHECK = 8  # tokens of the once-per-model check that a pass equals stepping (even: segments of 2)


@dataclass
class HFBackend(Backend):
    kind = "hf"
    attn_implementation: str = "sdpa"  # what the model was loaded with (some policies switch it while they run)
    load_args: dict = field(default_factory=dict)  # how to load the checkpoint again (path, revision, ...)
    # what the last step checked: (model, policy, text config, attention implementation) -> (position limit, why); a
    # step under the same model, policy and implementation skips the checks (attention switched, features looked up),
    # ~40 us of a ~5 ms token step
    _checked: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _limit: tuple = field(default=(None, None), init=False, repr=False, compare=False)
    _pass_ok: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # _pass_checked's findings

    def attention_for(self, policy) -> str:
        """The attention implementation a policy runs under: segcli's for the linear memory's read, eager where
        the policy evicts by attention probabilities (only eager returns them), else the one loaded."""
        if policy.kind == "linear":
            return "segcli"
        return "eager" if getattr(policy, "needs_attention", None) else self.attn_implementation

    def _use_attention(self, name: str, policy: str | None = None) -> None:
        cfg = self.model.config.get_text_config()
        if cfg._attn_implementation != name:
            if name == "segcli":
                register_attention()
            try:
                self.model.set_attn_implementation(name)
            except (ValueError, ImportError, KeyError):
                pass
        if cfg._attn_implementation != name:
            family, cls = self.identity["model_type"], type(self.model).__name__
            if name == "segcli":
                raise UsageError(f"{family}: --memory linear needs segcli's attention function, and {cls} does not "
                                 "go through transformers' attention interface; use another policy")
            why = f"--memory {policy} evicts by attention probabilities, which only eager attention returns, and " \
                if policy else ""
            raise UsageError(f"{family}: {why}{cls} cannot switch to {name} attention in this transformers")
        if name in ("eager", "segcli"):
            track_memory_mass(self.model)  # their probabilities give the mass on memory (and scored evictions)

    def use_attention_implementation(self, name: str) -> None:
        """Run the model under another of transformers' attention implementations ("eager", "sdpa") from now on:
        switched in place where the family allows it, else loaded again with it."""
        try:
            self._use_attention(name)
        except UsageError:
            self.model = _load_model(**self.load_args, attn_implementation=name).to(self.device).eval()
            if self.device.type == "cpu":
                column_major_linears(self.model)
            self._use_attention(name)
        self.attn_implementation = name
        self.identity["attn_implementation"] = name

    @torch.inference_mode()
    def reference_logits(self, ids: Tensor, rule: tuple[str, int, int] | None = None) -> Tensor | None:
        """(N, V) logits of one plain forward of ids (1, N), no cache, the model's own attention; with `rule`
        ((policy, segment size, memory size), see segcli.hf.visible_in_stream) every mask the model builds is
        intersected with what that stream lets a query see. None when the model builds no mask to intersect."""
        self._use_attention(self.attn_implementation)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        if rule is None:
            return self.model(input_ids=ids, position_ids=pos).logits[0]
        with extra_mask(self.model, visible_in_stream(*rule)) as calls:
            logits = self.model(input_ids=ids, position_ids=pos).logits[0]
        return logits if calls else None

    def new_memory(self, cfg: RunConfig, batch: int = 1) -> SegcliCache:
        policy = cfg.policy()
        name = self.attention_for(policy)
        try:
            self._use_attention(name, policy.name)
        except UsageError:
            if name != "eager":
                raise
            self.use_attention_implementation("eager")  # a family that cannot switch: loaded again, eager from now on
        return make_cache(self.model, policy)

    def check_continuation(self) -> None:
        """The load-time guard (segcli.backends.guard): `full` through segcli's cache layers, in pieces, against one
        forward of the model; a difference is one UsageError line."""
        cfg = self.model.config.get_text_config()
        try:
            gap = remembered(self.model, "continuation", lambda: guard.continuation_gap(
                lambda ids, pos: self.model(input_ids=ids, position_ids=pos).logits,
                lambda: make_cache(self.model, "full"),
                lambda ids, pos, cache: self.step(ids, cache)[:2], cfg.vocab_size, self.device))
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - a model whose cache segcli cannot drive
            raise UsageError(f"{self.identity['model_type']}: segcli cannot stream it through its cache layers "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it is not supported") from None
        guard.refuse_unless_exact(self.identity["model_type"], gap, self.dtype)

    # -- token and segment passes: many segments of n_s tokens in one forward -----------------------------------------

    def sliding_window(self, memory, segment_size: int) -> int | None:
        """The pass bound when segment size 1 has an exact token pass here (`step_window`), else None (steps)."""
        return self._pass_bound(memory) if segment_size == 1 else None

    def segment_pass(self, memory, segment_size: int) -> int | None:
        """Tokens per forward when segments of `segment_size` (> 1) are computed several at once (`step_segments`): a
        multiple of it, at least two segments; None: they step one by one."""
        if segment_size <= 1 or TOKEN_PASS < 2 * segment_size:  # two segments never fit: no check to run for it
            return None
        if isinstance(memory, SegcliCache) and memory.policy.name == "sink":  # token passes only
            return None
        bound = self._pass_bound(memory)
        n = bound // segment_size * segment_size if bound else 0
        return n if n >= 2 * segment_size else None

    def _pass_bound(self, memory) -> int | None:
        """How many tokens one pass may take, or None where segments must step.

        full and fifo hold exact pairs, the newest ones: k segments of n_s tokens are one forward of k n_s tokens on
        the cache as it was before them, each query masked to the keys its own segment's step would have read (fifo:
        the n_c positions before its segment and the segment up to itself, intersected with the model's own windows;
        full: the model's causal mask). sink at n_s = 1 (token passes only) holds exact pairs and the sinks, which
        each query reads moved to just before its own window (`hf.sinks`). Not under per-layer budgets, the relative
        frame, or attention that reports the mass on memory (eager: the mass is per segment, a pass would report one
        for all of its segments); only once `_pass_checked` found a pass equal to stepping on this model; and never
        more tokens than a fifo window holds (full keeps a sliding layer's last window - 1 pairs as a fifo of them;
        sink: its window), so that a pass grows no buffer past what the steps reach."""
        if not isinstance(memory, SegcliCache):
            return None
        policy = memory.policy
        if policy.name not in TOKEN_PASS_POLICIES or memory.per_layer or memory.frame != "absolute":
            return None
        if (policy.name == "fifo" and policy.sliding_window() is None) or (
                policy.name == "sink" and policy.token_pass() is None):
            return None
        if self.attention_for(policy) != "sdpa" or not self._pass_checked(policy):
            return None
        windows = [layer.policy.memory_size for layer in memory.memory_layers if layer.policy.name in ("fifo", "sink")]
        return min([TOKEN_PASS, *windows])

    def step_window(self, ids: Tensor, memory: SegcliCache, band: int):
        """ids (1, T) as T segments of one token in one forward (see `_pass_bound`). Returns logits (1, T, V), the
        memory after the last token, and per token the mass (None: SDPA reports none) and the layers' stats as
        `step` and `memory_stats` would have given them after it. sink: in one or two passes (`sink_pieces`)."""
        if memory.policy.name != "sink":
            return self.step_segments(ids, memory, 1)
        kinds = [layer.kind if isinstance(layer, PolicyLayer) else LayerKind("shared") for layer in memory.layers]
        parts = [self.step_segments(ids[:, a:b], memory, 1)
                 for a, b in sink_pieces(memory.policy, memory.seen, ids.shape[1], kinds)]
        logits = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], 1)
        return logits, memory, [m for p in parts for m in p[2]], [s for p in parts for s in p[3]]

    def step_segments(self, ids: Tensor, memory: SegcliCache, segment_size: int):
        """ids (1, T) as segments of `segment_size` tokens (the last may be shorter) in one forward: logits (1, T, V),
        the memory after the last segment, and per segment the mass (None) and the layers' stats after it."""
        t, n = ids.shape[1], segment_size
        layers = memory.memory_layers
        before = [0 if layer.state is None else layer.policy.slots(layer.state) for layer in layers]
        logits, memory, _ = self._pass(ids, memory, n)
        ends = [min(e, t) for e in range(n, t + n, n)]  # tokens pushed after each segment
        each = []
        for layer, held in zip(layers, before):
            per_token = layer.policy.stats_each(layer.state, held, t)
            stats, slots = [], held
            for start, end in zip([0, *ends[:-1]], ends):  # a segment pushed at once drops what its tokens dropped
                s = per_token[end - 1]
                if n > 1:
                    size = layer.policy.capacity(n)
                    s = dataclasses.replace(s, evicted=0 if size is None else max(0, slots + end - start - size))
                stats.append(s)
                slots = s.slots
            if hasattr(layer.state, "evicted"):  # what the last step dropped, as its state would say
                layer.state = dataclasses.replace(layer.state, evicted=stats[-1].evicted)
            each.append(stats)
        return logits, memory, [None] * len(ends), [list(x) for x in zip(*each)]

    def _pass(self, ids: Tensor, memory: SegcliCache, segment_size: int = 1):
        policy = memory.policy
        if policy.name == "full":  # the model's own causal mask is each segment's step
            return self.step(ids, memory)
        if policy.name == "sink":  # single tokens (`sink_pieces`)
            start, t, n_sink, window = memory.seen, ids.shape[1], policy.sink_tokens, policy.memory_size
            if start + t <= n_sink + window + 1:  # no pair dropped yet: every one at its own position, causal
                return self.step(ids, memory)
            if start < n_sink:
                raise ValueError("a sink pass that moves its sinks starts with them full (sink_pieces)")
            oldest = max(n_sink, start - window)  # the window's oldest position before the pass
            q = torch.arange(start, start + t)
            moved = q.sub(window).clamp(min=n_sink) - oldest  # (T,) how much further each query's sinks sit
            with extra_mask(self.model, sink_visible(oldest, window)) as calls, \
                    moved_sinks(self.model, memory, n_sink, moved):
                out = self.step(ids, memory)
            if not calls:
                raise RuntimeError(f"{self.identity['model_type']}: the token pass built no mask")
            return out
        # each query's segment starts at seen + a multiple of n_s, and its step read the n_c pairs before it
        allowed = visible_in_stream("fifo", segment_size, policy.memory_size, start=memory.seen)
        with extra_mask(self.model, allowed) as calls:
            out = self.step(ids, memory)
        if not calls:  # `_pass_checked` found masks on this model; a model that stops building them is a bug
            raise RuntimeError(f"{self.identity['model_type']}: the token pass built no mask")
        return out

    def _pass_checked(self, policy) -> bool:
        """Whether passes equal stepping on this model, found once per (policy name, attention): PASS_CHECK tokens
        stepped one by one, and in segments of 2, against the same in one pass each, from an empty memory of 3 slots
        (fifo; sink: 2 sinks and 3 slots, the window full halfway: both of `sink_pieces`' passes), after 2 tokens
        stepped (a pass that continues a memory). Remembered across runs (`checks`)."""
        key = (policy.name, self.model.config.get_text_config()._attn_implementation)
        known = self._pass_ok.get(key)
        if known is None:
            known = remembered(self.model, f"pass:{key[0]}:{key[1]}", lambda: self._pass_equal(policy))
            self._pass_ok[key] = known
        return known

    def _pass_equal(self, policy) -> bool:
        """PASS_CHECK tokens stepped, and passed, as `_pass_checked` says: whether every logit agrees."""
        sizes = {"fifo": {"memory_size": 3}, "sink": {"memory_size": 3, "sink_tokens": 2}}.get(policy.name, {})
        probe = make_policy(policy.name, **sizes)
        ids = guard.probe_ids(self.model.config.get_text_config().vocab_size, self.device)[:, :PASS_CHECK + 2]
        try:
            with torch.inference_mode():
                for n in (1,) if policy.name == "sink" else (1, 2):
                    stepped, passed = make_cache(self.model, probe), make_cache(self.model, probe)
                    for cache in (stepped, passed):
                        self.step(ids[:, :2], cache)
                    want = torch.cat([self.step(ids[:, i:i + n], stepped)[0]
                                      for i in range(2, PASS_CHECK + 2, n)], 1).float()
                    got = (self.step_window(ids[:, 2:], passed, 1) if policy.name == "sink"
                           else self._pass(ids[:, 2:], passed, n))[0].float()
                    gap = float((want - got).abs().max() / want.abs().max().clamp_min(1e-6))
                    if not gap <= guard.tolerance(self.dtype):
                        return False
        except (RuntimeError, ValueError, IndexError, TypeError, UsageError):
            return False
        return True

    def memory_stats(self, memory: SegcliCache):
        """Every cache layer's stats (fifo layers': one batched reduction, `fifo_stats`)."""
        fast = fifo_stats([(layer.policy, layer.state) for layer in memory.memory_layers])
        return memory.stats() if fast is None else fast

    def step(self, ids: Tensor, memory: SegcliCache):
        t = ids.shape[1]
        start = memory.seen
        model, policy = self.model, memory.policy
        checked = self._checked  # (model, policy, its text config, the attention implementation checked)
        if (checked is None or checked[0] is not model or checked[1] is not policy
                or checked[2]._attn_implementation != checked[3]):
            self._use_attention(self.attention_for(policy), policy.name)
            feats = model_features(model)
            self._limit = (feats.position_limit, feats.limit_reason)
            text = model.config.get_text_config()
            self._checked = (model, policy, text, text._attn_implementation)
        limit, reason = self._limit
        if limit is not None and start + t > limit:
            raise UsageError(
                f"{self.identity['model']}: {reason}; a stream past them is not the model's own "
                f"(use --max-tokens {limit})")
        pos = torch.arange(start, start + t, device=ids.device)[None]
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kwarg(self.model): memory})
        return out.logits, memory, memory.memory_mass()


def sink_pieces(policy, seen: int, t: int, kinds) -> list[tuple[int, int]]:
    """How T single-token steps under sink after `seen` tokens go through passes (`_pass`): [(start, end)], one pass,
    or two split at the first token whose window has dropped a pair where one pass cannot hold both sides: the sinks
    still filling when it starts, or a layer (`kinds`, `LayerKind`s) whose own window could reach the sinks at their
    own positions from a token that must no longer see them there (a sliding window wider than n_c + 1, chunked or
    shared layers). Before that token every pair sits at its own position; from it on the sinks are moved."""
    n_sink, window = policy.sink_tokens, policy.memory_size
    edge = min(t, max(0, n_sink + window + 1 - seen))
    one = seen >= n_sink and all(k.kind == "full" or (k.kind == "sliding" and k.window - 1 <= window) for k in kinds)
    if one or edge in (0, t):
        return [(0, t)]
    return [(0, edge), (edge, t)]


def load_hf(cfg: RunConfig, path: Path, model_cfg, device: torch.device, dtype: torch.dtype) -> HFBackend:
    from transformers import AutoTokenizer

    load_args = dict(path=path, dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise many kinds for files they cannot read
        raise UsageError(f"{path}: cannot load its tokenizer ({reason(e)})") from None
    check_hf_model_fits(path, model_cfg, dtype, device)  # built on the meta device: its bytes before they are taken
    model = _load_model(**load_args)
    model.to(device).eval()
    backend_tok = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend_tok is None:
        raise UsageError(f"{path}: segcli needs a fast tokenizer (tokenizer.json)")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    attn = model.config.get_text_config()._attn_implementation
    identity = {
        "model": str(path),
        "model_type": model.config.model_type,
        "model_sha256": model_fingerprint(path),
        "tokenizer_sha256": cached_sha256(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attn_implementation": attn,
        "attention_layers": model_features(model).describe(),
    }
    if attn == "eager":
        track_memory_mass(model)
    return HFBackend(model, backend_tok, bos, device, dtype, identity, attn_implementation=attn, load_args=load_args)


def _load_model(path: Path, dtype: torch.dtype, revision, trust_remote_code: bool, attn_implementation=None):
    """The checkpoint as a causal LM (attn_implementation None: the one transformers picks for the family)."""
    from transformers import AutoModelForCausalLM

    try:  # mismatched shapes come back in the loading info (else: an error pointing at a report it does not print)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision,
                                                           trust_remote_code=trust_remote_code,
                                                           attn_implementation=attn_implementation,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a checkpoint transformers cannot read (segcli's checks came first)
        what = f"with attn_implementation={attn_implementation!r}" if attn_implementation else "as a causal LM"
        raise UsageError(f"{path}: cannot load {what} ({reason(e)})") from None
    refuse_incomplete(path, info)  # tensors made up at random (missing, or of another shape) are not the model
    return model
