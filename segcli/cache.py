"""segcli's cache folder (`cache_root`), its small JSON files written whole (`read_cache`, `write_cache`: the model
files' hashes, GGUF conversions' hashes), and the checks a model passes once, remembered across runs: the load-time
guard (a stream in pieces equals one forward), the memory frame a model takes (`hf.refusals.bounded_frame`), whether its token passes equal stepping. Each runs a
few forwards; on a 135M-parameter model that was seconds of every start, for an answer that only changes when the
model or the software does.

    value = remembered(model, "continuation", lambda: guard.continuation_gap(...))

The answer is kept under a key of everything it depends on: the model's bytes (`model_sha256`: every weight and
config file, `base.model_fingerprint`), the dtype, the device type and the attention implementation it ran with
(`stamp_model`, set by `load_backend`), the check's name, and the software: segcli's version and its own source
files (path, size and modification time of each), torch's and transformers' versions. A key that differs in any of
them runs the check again. A model without a stamp (built in a test, not loaded) is always checked. The cache is
`checks.json` in segcli's cache folder, written whole (temporary file and rename); a damaged or unwritable one only
means checking again. SEGCLI_CHECK_CACHE=0 checks every time (the test suite sets it: its tests patch segcli's
code in memory, which the source files' stamp cannot see).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
CHECK_ENTRIES = 512  # answers remembered; the oldest are dropped beyond


# -- the cache folder and its JSON files -------------------------------------------------------------------------------

def cache_root() -> Path:
    """segcli's cache folder: $SEGCLI_CACHE, else $XDG_CACHE_HOME/segcli, else ~/.cache/segcli."""
    if os.environ.get("SEGCLI_CACHE"):
        return Path(os.environ["SEGCLI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "segcli"


def read_cache(index: Path) -> dict[str, Any]:
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return known if isinstance(known, dict) else {}


def write_cache(index: Path, known: dict[str, Any]) -> None:
    """Replace `index` with `known` (a temporary file renamed into place); any OSError is left to the caller."""
    index.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{index.stem}-", suffix=".json", dir=index.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, index)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def checks_file() -> Path:
    return cache_root() / "checks.json"


@functools.lru_cache(maxsize=1)
def software() -> dict[str, str]:
    """What the answers depend on besides the model: segcli (version and source files), torch, transformers."""
    import torch
    import transformers

    from . import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"segcli": __version__, "segcli_source": h.hexdigest(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def stamp_model(model, identity: dict[str, Any], dtype, device) -> None:
    """Mark a loaded model with what its checks' answers depend on (None where the model has no content hash)."""
    if identity.get("model_sha256"):
        model._segcli_stamp = {"model_sha256": identity["model_sha256"], "dtype": str(dtype), "device": device.type}


def remembered(model, name: str, compute: Callable[[], T]) -> T:
    """The check `name`'s answer for this model (JSON: a number, a string, a bool, None), from an earlier run with
    the same key, else `compute()`d and remembered. An exception from `compute` is raised, not remembered."""
    stamp = getattr(model, "_segcli_stamp", None)
    if stamp is None or os.environ.get("SEGCLI_CHECK_CACHE", "1") == "0":
        return compute()
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    key = hashlib.sha256(json.dumps({"check": name, "attn": attn, **stamp, **software()}, sort_keys=True).encode()
                         ).hexdigest()
    index = checks_file()
    known = read_cache(index)
    entry = known.get(key)
    if isinstance(entry, dict) and "value" in entry:
        return entry["value"]
    value = compute()
    known = {k: v for k, v in read_cache(index).items() if k != key}
    for old in list(known)[: max(0, len(known) - CHECK_ENTRIES + 1)]:
        del known[old]
    known[key] = {"check": name, "value": value}
    try:
        write_cache(index, known)
    except OSError:
        pass  # an unwritable cache: checked again next time
    return value
