"""The file checks every command shares: one clear UsageError (exit 2) before any work."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError


def require_file(path: str, label: str, kind: str | None = None) -> Path:
    """An existing file to read; `label` starts the message, `kind` names what a folder is not."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{label}: no such file")
    if p.is_dir():
        raise UsageError(f"{label}: is a directory" + (f", not a {kind}" if kind else ""))
    return p


def require_writable(path: str, option: str) -> Path:
    """A file `option` may create: its folder exists and it is not a folder itself."""
    target = Path(path)
    if not target.parent.exists():
        raise UsageError(f"{option} {path}: folder {target.parent} does not exist")
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a directory")
    return target
