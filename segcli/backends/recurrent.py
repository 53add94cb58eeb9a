"""Recurrent and hybrid Hugging Face causal LMs: the layers' own state is their memory (DESIGN §1).

Mamba, Mamba2, RWKV, xLSTM and the recurrent layers of hybrids (jamba, zamba, zamba2, bamba, falcon_h1, qwen3_next,
lfm2, recurrent_gemma, minimax, granitemoehybrid, kimi_linear, nemotron_h, ...) keep a fixed-size state (a conv
window and an SSM, linear-attention or RNN state) that the layer itself updates once per segment: the seed's
`Mem = Update(S_kv, Mem_pre)` in its purest form. A stream's memory (`RecurrentMemory`) is the model's own cache
object for that stream: every policy but `none` carries the recurrent states from segment to segment, `none`
starts every segment from a fresh one, and the policy acts on the attention layers of hybrids: `full` is the model's
own key-value cache, `none` the segment alone, and every other policy runs segcli's policy cache layers
(`segcli.hf.PolicyLayer`, which keep the model's own attention, masks and windows) on the attention layers, next
to the model's own recurrent layers in one Cache (`Family.policy_cache`; a layer with both, zamba's or falcon_h1's,
is a `HybridPolicyLayer`). What that machinery refuses for a transformer (the linear memory, which changes the
attention function; slots chosen by content inside sliding windows) is refused here too, in one line.

Each family's state is one `Family` object (`recurrent_families`), looked up by model type. Where a transformers code
path is wrong for a segment that continues a state, `recurrent_routes` installs an exact route on the loaded model's
own modules. Every model is checked once at load (`segcli.backends.guard`): a short random sequence in one forward
against the same in pieces; a difference is refused with one line, never reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import RunConfig
from ..errors import UsageError
from ..memory import MemoryPolicy
from ..memory.base import LayerStats
from ..memory.catalog import POLICY_ON_ATTENTION  # policies a hybrid's attention layers follow with its own cache
from . import guard
from ..cache import remembered
from .folder_checks import check_hf_model_fits, reason, refuse_incomplete
from .base import Backend, cached_sha256, model_fingerprint
from .recurrent_families import FAMILIES, Family, layer_types
from .recurrent_routes import Route, install_routes

RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba"})
OWN_STATE = frozenset({"rwkv", "xlstm", "recurrent_gemma"})  # model types whose state is not a transformers Cache


def is_recurrent(model_cfg) -> bool:
    """Whether a checkpoint's config describes a model with recurrent layers (this backend's kind)."""
    return model_cfg.model_type in OWN_STATE or any(t in RECURRENT_LAYER_TYPES for t in layer_types(model_cfg))


@dataclass
class RecurrentMemory:
    """One stream's memory: the family's state object, the policy, tokens seen and tokens since the last reset."""

    policy: MemoryPolicy
    cache: Any
    seen: int = 0
    since_reset: int = 0


@dataclass
class RecurrentBackend(Backend):
    kind: ClassVar[str] = "recurrent"
    family: Family = field(default_factory=Family)
    routes: list[Route] = field(default_factory=list)  # exact routes installed on the model's layers
    n_attention: int = 0  # attention layers (0: a pure recurrent model)
    _bounded: dict = field(default_factory=dict)  # bounded_check's finding per attention implementation ("": exact)
    _observed: bool = False  # observed_check found that the attention modules hand their probabilities on

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    def kv_layout(self) -> tuple[int, int, int] | None:
        """Only the attention layers hold key-value pairs (a pure recurrent model's state has a fixed size)."""
        layout = super().kv_layout()
        return None if not self.n_attention or layout is None else (self.n_attention, layout[1], layout[2])

    def check_policy(self, policy: MemoryPolicy) -> None:
        """One UsageError line where `policy` cannot run on this model's attention layers as the model computes them."""
        if not self.n_attention or policy.name in POLICY_ON_ATTENTION:
            return
        layers = f"its {self.n_attention} attention layer{'s' if self.n_attention > 1 else ''}"
        if not self.family.policy_caches:
            raise UsageError(f"{self.model_type}: --memory {policy.name} on {layers} is not supported (its cache is "
                             "its own, not one segcli's policy layers can join); use --memory full or --memory none")
        if policy.kind == "linear":
            raise UsageError(f"{self.model_type}: --memory linear changes the attention of {layers} and segcli does "
                             "not run its attention function on hybrid models; use another policy")
        from ..hf import Features, refusal

        cfg = self.model.config.get_text_config()
        loaded = cfg._attn_implementation
        if policy.needs_attention:
            self.use_eager(policy)
        kinds = [k for k in self.family.layer_kinds(self.model)[0] if k.kind != "shared"]
        reason = refusal(Features(self.model_type, cfg._attn_implementation, tuple(kinds), None, None), policy) \
            or self.bounded_check() or (self.observed_check(policy) if policy.needs_attention else None)
        if reason and cfg._attn_implementation != loaded:  # back to what it was loaded with, for other policies
            self.model.set_attn_implementation(loaded)
            self.identity["attn_implementation"] = loaded
        if reason:
            raise UsageError(f"{reason} (--memory {policy.name})" if reason.startswith(self.model_type) else reason)

    def use_eager(self, policy: MemoryPolicy) -> None:
        """tova, h2o and snapkv evict by attention probabilities, which only eager attention returns: the model runs
        eager attention from then on (switched in place where the family allows it; refused by `refusal` where not),
        with segcli.hf's hooks handing each attention module's probabilities to its policy layer."""
        from ..hf import track_memory_mass

        cfg = self.model.config.get_text_config()
        if cfg._attn_implementation != "eager":
            try:
                self.model.set_attn_implementation("eager")
            except (ValueError, ImportError, KeyError, AttributeError):
                return
            self.identity["attn_implementation"] = cfg._attn_implementation
        if cfg._attn_implementation == "eager":
            track_memory_mass(self.model)

    def observed_check(self, policy: MemoryPolicy) -> str | None:
        """Why the attention modules do not hand their probabilities to `policy.observe` (None: they do), found once:
        two tokens into a memory of one slot; every attention layer must have evicted to its budget after it."""
        if self._observed:
            return None
        from ..hf import PolicyLayer

        probe = type(policy)(memory_size=1, sink_tokens=policy.sink_tokens, compress_rate=policy.compress_rate,
                             compressed_size=policy.compressed_size, recent_tokens=0, window=1)
        vocab = self.model.config.get_text_config().vocab_size
        ids = ((torch.arange(2) * 13 + 7) % vocab)[None].to(self.device)
        try:
            with torch.inference_mode():
                _, cache = self.family.forward(self.model, ids, torch.arange(2, device=self.device)[None],
                                               self.family.policy_cache(self.model, probe))
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            return (f"{self.model_type}: its attention fails under eager attention, which --memory {policy.name} needs "
                    f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]})")
        if any(getattr(layer.state, "pending", 0) for layer in cache.layers if isinstance(layer, PolicyLayer)):
            return (f"{self.model_type}: its attention modules return no attention probabilities segcli can read, so "
                    f"--memory {policy.name} cannot evict by them; use fifo, sink or keynorm")
        self._observed = True
        return None

    def bounded_check(self) -> str | None:
        """Why a bounded memory on the attention layers does not reproduce the model (None: it does), found once
        on three tokens: two into a fifo memory of one slot, then one more, against one plain forward whose
        attention masks say the same (segcli.hf.extra_mask); the recurrent layers carry their state in both."""
        impl = self.model.config.get_text_config()._attn_implementation
        if impl in self._bounded:
            return self._bounded[impl] or None
        from ..hf import extra_mask, visible_in_stream
        from ..memory import make_policy

        vocab = self.model.config.get_text_config().vocab_size
        ids = ((torch.arange(3) * 11 + 5) % vocab)[None].to(self.device)
        pos = torch.arange(3, device=self.device)[None]
        try:
            with torch.inference_mode():
                cache = self.family.policy_cache(self.model, make_policy("fifo", memory_size=1))
                first, cache = self.family.forward(self.model, ids[:, :2], pos[:, :2], cache)
                last, cache = self.family.forward(self.model, ids[:, 2:], pos[:, 2:], cache)
                with extra_mask(self.model, visible_in_stream("fifo", 2, 1)) as calls:
                    plain, _ = self.family.forward(self.model, ids, pos, self.family.new_cache(self.model))
            streamed = torch.cat([first, last], 1).float()
            gap = float((streamed - plain.float()).abs().max() / plain.float().abs().max().clamp_min(1.0))
            self._bounded[impl] = "" if calls and gap <= guard.tolerance(self.dtype) else (
                f"{self.model_type}: a bounded memory on its attention layers does not reproduce the model (relative "
                f"logit gap {gap:.1e} on a three-token check)")
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            first = (str(e).splitlines() or [""])[0][:100]
            self._bounded[impl] = (f"{self.model_type}: its attention layers do not cache key-value pairs segcli's "
                                   f"policy layers can hold ({type(e).__name__}: {first})")
        return self._bounded[impl] or None

    def notes(self, cfg: RunConfig) -> list[str]:
        """Lines for stderr, once per run (the engine prints them as it prints CorpusRun.note): the exact routes
        taken where transformers' own path is wrong for a continued segment, and what the policy does here (after
        what loading noted, e.g. a GGUF cache that could not be written)."""
        out = [*super().notes(cfg), *(f"note: {self.model_type}: exact route: {r.note}" for r in self.routes)]
        if not self.n_attention and cfg.memory not in ("full", "none"):
            out.append(f"note: {self.model_type} has no attention layers: --memory {cfg.memory} carries the recurrent "
                       "state from segment to segment as full does (only none resets it)")
        return out

    def new_memory(self, cfg: RunConfig, batch: int = 1) -> RecurrentMemory:
        if batch != 1:
            raise UsageError(f"{self.model_type}: segcli streams one document at a time (batch {batch})")
        policy = cfg.policy()
        self.check_policy(policy)
        return RecurrentMemory(policy, self.fresh_cache(policy))

    def fresh_cache(self, policy: MemoryPolicy) -> Any:
        """An empty state object for a stream under `policy`: segcli.hf's policy layers on the attention layers of a
        hybrid under a bounded policy, the model's own cache otherwise."""
        if self.n_attention and policy.name not in POLICY_ON_ATTENTION:
            return self.family.policy_cache(self.model, policy)
        return self.family.new_cache(self.model)

    def step(self, ids: Tensor, memory: RecurrentMemory) -> tuple[Tensor, RecurrentMemory, float | None]:
        t = ids.shape[1]
        pos = torch.arange(memory.seen, memory.seen + t, device=ids.device)[None]  # (1, T) absolute
        reset = memory.policy.name == "none"
        cache = self.family.new_cache(self.model) if reset else memory.cache
        logits, cache = self.family.forward(self.model, ids, pos, cache)
        memory.seen += t
        if reset:  # nothing of this segment reaches the next: the memory between segments is empty
            memory.cache, memory.since_reset = self.family.new_cache(self.model), 0
        else:
            memory.cache, memory.since_reset = cache, memory.since_reset + t
        mass = getattr(cache, "memory_mass", None)  # segcli.hf's policy cache: from the model's own probabilities
        return logits, memory, mass() if mass is not None else None

    @torch.inference_mode()
    def reference_logits(self, ids: Tensor, rule: tuple[str, int, int] | None = None) -> Tensor | None:
        """(N, V) logits of one plain forward of ids (1, N) without a cache (what `segcli check` compares with); with
        `rule` ((policy, segment size, memory size), segcli.hf.visible_in_stream) the attention layers' masks are
        intersected with what that stream lets a query see. A model without attention layers has no mask to
        intersect: every policy but none streams as the plain forward, which is returned."""
        from ..hf import extra_mask, visible_in_stream

        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        if rule is None or not self.n_attention:
            return self.family.forward(self.model, ids, pos, self.family.new_cache(self.model))[0][0]
        with extra_mask(self.model, visible_in_stream(*rule)) as calls:
            logits = self.family.forward(self.model, ids, pos, self.family.new_cache(self.model))[0][0]
        return logits if calls else None

    def memory_stats(self, memory: RecurrentMemory) -> list[LayerStats]:
        """Attention caches first (layer order), then recurrent and conv states (layer order): the report's per-layer
        fields (slots, capacity, oldest age) come from its first entry, an attention layer where there is one."""
        parts = self.family.components(self.model, memory.cache, memory.since_reset)
        return [p for p in parts if p.kind == "attention"] + [p for p in parts if p.kind != "attention"]

    def check_continuation(self) -> None:
        """The load-time guard (segcli.backends.guard): the model's own cache, continued in pieces, against one
        forward; a difference, or a state segcli cannot drive, is one UsageError line."""
        vocab = self.model.config.get_text_config().vocab_size
        try:
            gap = remembered(self.model, "continuation", lambda: guard.continuation_gap(
                lambda ids, pos: self.family.forward(self.model, ids, pos, self.family.new_cache(self.model))[0],
                lambda: self.family.new_cache(self.model),
                lambda ids, pos, cache: self.family.forward(self.model, ids, pos, cache), vocab, self.device))
        except Exception as e:  # noqa: BLE001 - a family whose cache segcli cannot drive
            raise UsageError(f"{self.model_type}: segcli cannot stream this family's recurrent state "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it is not supported") from None
        guard.refuse_unless_exact(self.model_type, gap, self.dtype, "streaming its recurrent state in segments")


def load_recurrent(cfg: RunConfig, path: Path, model_cfg, device: torch.device, dtype: torch.dtype) -> RecurrentBackend:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise many kinds for files they cannot read
        raise UsageError(f"{path}: cannot load its tokenizer ({reason(e)})") from None
    check_hf_model_fits(path, model_cfg, dtype, device)  # built on the meta device: its bytes before they are taken
    try:  # mismatched shapes come back in the loading info (else: an error pointing at a report it does not print)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=cfg.revision,
                                                           trust_remote_code=cfg.trust_remote_code,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a checkpoint transformers cannot read (segcli's checks came first)
        raise UsageError(f"{path}: cannot load as a causal LM ({reason(e)})") from None
    refuse_incomplete(path, info)  # tensors made up at random (missing, or of another shape) are not the model
    model.to(device).eval()
    backend_tok = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend_tok is None:
        raise UsageError(f"{path}: segcli needs a fast tokenizer (tokenizer.json)")
    model_type = model.config.model_type
    family = FAMILIES.get(model_type, Family())
    routes = install_routes(model)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    identity = {
        "model": str(path),
        "model_type": model_type,
        "model_sha256": model_fingerprint(path),
        "tokenizer_sha256": cached_sha256(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_positions": None,
        "attn_implementation": model.config.get_text_config()._attn_implementation,
        "exact_routes": [r.name for r in routes],
    }
    return RecurrentBackend(model, backend_tok, bos, device, dtype, identity, family=family, routes=routes,
                            n_attention=family.attention_layers(model))  # load_backend runs check_continuation
