"""What the engine needs from a model: the `Backend` interface, and the loading helpers every backend shares.

    backend = load_backend(cfg)                     # segcli.backends: the loader registered for the checkpoint
    memory = backend.new_memory(cfg)                # an empty memory under cfg's policy
    logits, memory, mass = backend.step(ids, memory)
    stats = backend.memory_stats(memory)            # one LayerStats per layer

A backend kind is one subclass (`native.py`, `hf.py`) registered in `segcli.backends.LOADERS`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import RunConfig
from ..cache import cache_root, read_cache, write_cache  # noqa: F401  (cache_root: gguf's)
from ..errors import UsageError
from ..memory.base import LayerStats, tensor_bytes
from ..memory.fifo import Fifo, FifoState

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backend:
    """A loaded model, its tokenizer and how to step a segment through its memory."""

    kind: ClassVar[str]  # the loader registry key ("native", "hf")
    model: Any
    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    device: torch.device
    dtype: torch.dtype
    identity: dict[str, Any]  # model, model_type, model_sha256, tokenizer_sha256, parameters (the config block)

    @property
    def trained_length(self) -> int | None:
        """The longest span of keys the model was trained to attend over, where its config records it."""
        return None

    @property
    def eos_id(self) -> int | None:
        """The token that ends a generation (None: generation runs its full length)."""
        return None

    def kv_layout(self) -> tuple[int, int, int] | None:
        """(attention layers, key-value heads, head dim) of the pairs a policy holds, for the memory budget;
        None where the backend cannot say (the budget is then not checked)."""
        cfg = self.model.config.get_text_config()
        heads = getattr(cfg, "num_attention_heads", None)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
        layers = getattr(cfg, "num_hidden_layers", None)
        return (layers, kv, dim) if layers and kv and dim else None

    def check_memory_budget(self, cfg: RunConfig, tokens: int | None) -> None:
        """Refuse (one UsageError line, before the run) settings whose memory could not fit: the bytes the
        policy's memory can reach over `tokens` (None: unknown), against the device's free memory."""
        from ..memory.budget import check_memory_budget

        layout = self.kv_layout()
        if layout is None:
            return
        available = None  # the CPU: MemAvailable
        if self.device.type == "cuda":
            available = torch.cuda.mem_get_info(self.device)[0]
        layers, kv_heads, head_dim = layout
        check_memory_budget(cfg.policy(), layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                            itemsize=torch.empty(0, dtype=self.dtype).element_size(), segment_size=cfg.segment_size,
                            tokens=tokens, available=available)

    def notes(self, cfg: RunConfig) -> list[str]:
        """Lines for stderr about how this model streams under cfg (e.g. a slower exact route it takes), and what
        loading it noted (`load_notes`, e.g. a GGUF cache that could not be written)."""
        return list(getattr(self, "load_notes", ()))

    def new_memory(self, cfg: RunConfig, batch: int = 1) -> Any:
        raise NotImplementedError

    def step(self, ids: Tensor, memory) -> tuple[Tensor, Any, float | None]:
        """ids (1, T): one segment. Returns logits (1, T, V), the memory after it, and the mean attention
        mass on memory (None when the memory was empty)."""
        raise NotImplementedError

    def memory_stats(self, memory) -> list[LayerStats]:
        """One LayerStats per layer, as `policy.stats` reports them (fifo's from one batched reduction)."""
        states = getattr(memory, "states", None)
        if states is not None and type(getattr(memory, "policy", None)) is Fifo:  # the native model's SegMemory
            fast = fifo_stats([(memory.policy, s) for s in states])
            if fast is not None:
                return fast
        return memory.stats()

    def row_memory(self, memory, b: int, batch: int) -> Any | None:
        """Stream `b` of a memory of `batch` streams (`new_memory(cfg, batch)`), for its statistics; None where this
        backend's memory has no such view (then documents are not batched: `engine.stream.one_segment_batch`)."""
        return None

    def sliding_window(self, memory, segment_size: int) -> int | None:
        """W when streaming `memory` at `segment_size` (1) is a causal sliding window of W keys that `step_window`
        computes many tokens at a time; None when it must go token by token."""
        return None

    def step_window(self, ids: Tensor, memory, band: int):
        raise NotImplementedError(f"the {self.kind} backend has no sliding-window pass")

    def segment_pass(self, memory, segment_size: int) -> int | None:
        """Tokens per forward when several segments of `segment_size` (> 1) can be computed in one (`step_segments`),
        a multiple of it; None when each segment is its own forward."""
        return None

    def step_segments(self, ids: Tensor, memory, segment_size: int):
        """ids (1, T) as consecutive segments of `segment_size` in one forward: (logits (1, T, V), the memory after
        the last, per segment the mass and the layers' stats after it), what the steps would have reported."""
        raise NotImplementedError(f"the {self.kind} backend has no segment pass")

    def packs(self, memory) -> int | None:
        """The most tokens one forward may take as consecutive segments of any lengths (`step_packed`: many small
        documents through a carried memory); None when each segment is its own forward."""
        return None

    def step_packed(self, ids: Tensor, memory, lengths: list[int]):
        """ids (1, T) as consecutive segments of `lengths` tokens in one forward: `step_segments`' results."""
        raise NotImplementedError(f"the {self.kind} backend has no segment pass")


REDUCE_GRAIN = 32768  # torch's GRAIN_SIZE: a CPU reduction of fewer elements (or on one thread) runs serially


def f32(xs: list[float]) -> list[float]:
    """Each value rounded to the nearest float32 (an `array("f")` stores C floats)."""
    return array("f", xs).tolist()


_SCRATCH = threading.local()  # per thread: the buffer `norm_means` stacks into


def _cat_buffer(shape: tuple[int, int, int]) -> Tensor:
    """A float32 CPU tensor of `shape` kept for the next call of this thread: a new (B, V x H, cap) stack per
    segment, often above malloc's mmap threshold, costs a mapping and its page faults every time. A normal tensor
    (not an inference one), so that it can be written inside and outside inference mode."""
    buf = getattr(_SCRATCH, "cat", None)
    if buf is None or tuple(buf.shape) != shape:
        with torch.inference_mode(False):
            buf = torch.empty(shape, dtype=torch.float32)
        _SCRATCH.cat = buf
    return buf


def norm_means(buffers: list[Tensor], start: int, end: int) -> list[float] | None:
    """float(buf[:, :, start:end].mean()) of each float32 buffer (B, H, cap) (all of one shape), bit for bit, in
    two kernels; None where the views reduce another way (the caller then asks `mean`).

    A CPU reduction of such a view to one number sums each of its B x H rows (end - start contiguous floats) on
    its own and adds the row sums in order, in float32, starting from 0; `mean` then divides by their count in
    float32. Here one `cat` stacks every buffer's rows (into a buffer kept per thread, `_cat_buffer`) and one
    `sum(-1)` over the slice reduces each row alone the same way; the row sums of each buffer are then added in order and divided in Python, each result rounded to
    float32 (`f32`): a double holds more than twice float32's precision, so a sum or quotient of two float32s
    computed in double and rounded to float32 is the float32 operation's own result (rounding twice is rounding
    once). No numpy: every tensor or array operation between two forwards costs tens of microseconds on a cold
    cache, a few Python lines far less. Reduced another way, so None: fewer than two columns (a single column is
    summed across rows in another order), a slice that spans whole buffers of several rows (its rows merge into
    one), and on several threads a reduction large enough to be split among them.
    `tests/engine/test_stream_stats.py` compares it with `mean`."""
    b, h, cap = buffers[0].shape
    m = end - start
    rows = len(buffers) * b * h
    if (m < 2 or (b * h > 1 and m == cap) or buffers[0].device.type != "cpu"
            or any(x.dtype != torch.float32 or x.shape != (b, h, cap) for x in buffers)
            or (torch.get_num_threads() > 1 and rows * m >= REDUCE_GRAIN)):
        return None
    stack = torch.cat(buffers, 1, out=_cat_buffer((b, len(buffers) * h, cap)))  # (B, V x H, cap)
    sums = stack.narrow(2, start, m).sum(-1).tolist()  # B lists of V x H: every row's own sum
    acc = None  # per buffer, its rows' sums added in row order (batch, then head)
    for batch_row in sums:
        for j in range(h):
            col = batch_row[j::h]  # every buffer's row (batch, j)
            acc = col if acc is None else f32([a + c for a, c in zip(acc, col)])
    count = f32([b * h * m])[0]
    return f32([a / count for a in acc])


def fifo_stats(layers: list[tuple[Any, Any]]) -> list[LayerStats] | None:
    """`Fifo.stats` of every (policy, state) layer, with the norm means of layers whose windows share a buffer
    shape and slice from one `norm_means`; None unless every layer is a plain fifo state holding pairs (the
    caller then asks each policy)."""
    windows = []
    for policy, state in layers:
        if type(policy) is not Fifo or type(state) is not FifoState or not state.window.filled:
            return None
        windows.append(state.window)
    means: list[float | None] = [None] * (2 * len(windows))
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault((tuple(w.kn.shape), w.start, w.end), []).append(i)
    for (_, start, end), idx in groups.items():
        got = norm_means([x for i in idx for x in (windows[i].kn, windows[i].vn)], start, end)
        if got is not None:
            for n, i in enumerate(idx):
                means[2 * i], means[2 * i + 1] = got[2 * n], got[2 * n + 1]
    out = []
    for i, (w, (_, state)) in enumerate(zip(windows, layers)):
        if means[2 * i] is None:
            kn, vn = w.norms()
            means[2 * i], means[2 * i + 1] = float(kn.mean()), float(vn.mean())
        out.append(LayerStats(
            slots=w.filled, capacity=w.size, bytes=tensor_bytes(w.k, w.v, w.kn, w.vn), key_norm=means[2 * i],
            value_norm=means[2 * i + 1], oldest_age=w.filled, tokens_per_slot=1.0, evicted=state.evicted,
            mean_age=(w.filled + 1) / 2,
        ))
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 matmuls are slow on CPUs: float32 there
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# -- identity: what a run's `model_sha256` and a memory file's model hash are -----------------------------------------
#
# The hash of a model folder is the sha256 of one line per file that defines the model (`MODEL_FILES`: its config,
# every weight file and any code of its own), in name order: "name<TAB>size<TAB>sha256 of the whole file". Every byte
# of every such file counts, whatever its size. A file's sha256 is remembered in a small JSON cache (`hash_cache`)
# under its path, size, mtime, ctime, inode and device, so an unchanged 500 MB file is read once, not every run; an
# entry is trusted only when the file had not changed for `RACY_NS` before it was hashed (a write within the file
# system's timestamp granularity after hashing would leave those the same), and a cache that cannot be read or
# written is no error: the file is hashed again.

HASH_BLOCK = 1 << 20  # bytes read at a time: hashing is bounded in memory whatever the file's size
RACY_NS = 2_000_000_000  # a file changed less than this before it was hashed is hashed again next time (FAT: 2 s)
CACHE_ENTRIES = 1024  # files remembered; the oldest are dropped beyond


def hash_cache() -> Path:
    """The file of remembered model-file hashes."""
    return cache_root() / "hashes.json"


def file_sha256(path: Path) -> str:
    """sha256 of the whole file, read in blocks of HASH_BLOCK."""
    h = hashlib.sha256()
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _identity(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def _usable(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
            and type(entry.get("hashed_ns")) is int)


def cached_sha256(path: Path, index: Path | None = None) -> str:
    """sha256 of the whole file, from the cache `index` (None: `hash_cache()`) where it holds an entry for this very
    file (same path, size, mtime, ctime, inode and device, hashed at least RACY_NS after its last change); else
    hashed (`file_sha256`) and remembered. An unreadable or unwritable cache only means hashing again."""
    index = index or hash_cache()
    key = str(Path(path).resolve())
    before = os.stat(path)
    ident = _identity(before)
    known = read_cache(index)
    entry = known.get(key)
    if _usable(entry) and all(entry.get(k) == v for k, v in ident.items()) \
            and max(before.st_mtime_ns, before.st_ctime_ns) < entry["hashed_ns"] - RACY_NS:
        return entry["sha256"]
    started = time.time_ns()
    digest = file_sha256(path)
    if _identity(os.stat(path)) != ident:  # changed while it was read: this digest is of no one version
        return digest
    known = {k: v for k, v in read_cache(index).items() if _usable(v) and k != key}  # another run's entries kept
    for old in list(known)[: max(0, len(known) - CACHE_ENTRIES + 1)]:
        del known[old]
    known[key] = {**ident, "sha256": digest, "hashed_ns": started}
    try:
        write_cache(index, known)
    except OSError:
        pass  # an unwritable cache: hashed again next time
    return digest


def model_files(path: Path) -> list[Path]:
    """The files that define the model of a folder: its configuration (config.json, generation_config.json, a
    sharded checkpoint's index), every weight file (*.safetensors, *.bin, *.pt, *.pth) and its own code (*.py,
    for trust_remote_code); not the tokenizer's files (hashed apart) nor segcli's own notes."""
    out = []
    for f in sorted(path.iterdir(), key=lambda p: p.name):
        name = f.name
        if not f.is_file() or name.startswith("."):
            continue
        if name in ("config.json", "generation_config.json") or name.endswith(
                (".safetensors", ".bin", ".pt", ".pth", ".py", ".safetensors.index.json", ".bin.index.json")):
            out.append(f)
    return out


def model_fingerprint(path: Path) -> str:
    """sha256 over the full content of every file that defines the model (`model_files`): one line per file,
    "name<TAB>size<TAB>sha256", in name order; each file's sha256 from the cache where the file is unchanged."""
    h = hashlib.sha256()
    for f in model_files(path):
        h.update(f"{f.name}\t{f.stat().st_size}\t{cached_sha256(f)}\n".encode())
    return h.hexdigest()


def resolve_model_dir(model: str | None, revision: str | None = None) -> Path:
    if model is None:
        if not (BUNDLED_DIR / "model.safetensors").exists():
            raise UsageError("the bundled model is not installed in this copy of segcli; pass --model DIR")
        return BUNDLED_DIR
    p = Path(model)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise UsageError(f"{model}: not a model directory (no config.json); pass a saved checkpoint folder")
        return p
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return hub_snapshot(model, revision)
    raise UsageError(f"{model}: no such model directory")


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """A hub model from the local cache, or downloaded when the network allows it."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UsageError(f"{repo_id}: not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{repo_id}: not a local folder and the hub could not provide it ({type(e).__name__})") from None
