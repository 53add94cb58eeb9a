"""The files every command reads or writes: one clear UsageError (exit 2) before any work, and one
way to write an output file that never replaces or loses what the user had.

An output (`--output`, `--save-memory`, `plot -o`) is checked before the run (`output_target`)
and written with `AtomicOutput`:

- a new or regular file: a temporary file in the target's folder, renamed over the target only
  when the whole output is written (a failed or interrupted run leaves the old file, or none, and
  no temporary file); an existing file keeps its mode (and owner, where allowed), a new one gets
  the umask's mode, as the shell's `>` would;
- a symbolic link: followed; the file it points to is replaced, never the link;
- anything else (a character device such as /dev/null, a FIFO, a socket, a terminal) is opened
  and written in place, with no rename: replacing it would destroy it;
- /dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N: the process's own descriptor N, written
  as it stands (a `>> log` redirection keeps appending).

`check_distinct` refuses an output that is one of the inputs or another output.

A path means what the kernel means by it: `..` is taken after the symbolic link before it is
followed, as open() does, never by editing the text. With `link -> real/deep`, `link/../doc.txt`
is `real/doc.txt` (the shell's `> link/../doc.txt` writes there too), so `-o link/../out.jsonl`
writes real/out.jsonl, and is refused where real/doc.txt is an input. Each folder on the way is
checked by the kernel (os.stat: a missing folder, a file used as a folder, a link loop) and then
named by its real path, which is where the temporary file and the rename go.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import signal
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from .errors import RunError, UsageError

# The process's own descriptors, spelled as paths (Linux: /dev/stdout -> /proc/self/fd/1).
_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/thread-self/fd|proc/self/task/\d+/fd)/(\d+)$")
_STD_PATH = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
_MAX_LINKS = 40  # symbolic links followed before giving up (the kernel's own limit)
_WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EPERM, errno.EACCES}
CLOSED_AT_START: set[int] = set()  # of 0, 1, 2: closed when segcli started (cli.common.guard_std_streams)


def file_kind(mode: int) -> str:
    """What a stat mode that is not a regular file's describes, in words (for "is a FIFO (named pipe), not ...")."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def require_file(path: str, label: str, kind: str | None = None) -> Path:
    """An existing file to read; `label` starts the message, `kind` names what a folder is not."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{label}: no such file")
    if p.is_dir():
        raise UsageError(f"{label}: is a directory" + (f", not a {kind}" if kind else ""))
    return p


# -- what an output path names ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputTarget:
    """An output path, checked and classified before any work."""

    path: str  # as the user gave it
    option: str  # the option that named it (--output), for messages
    resolved: Path  # symbolic links followed: the file that will be written
    kind: str  # "new" | "regular" (temporary file + rename) | "special" (written in place) | "fd"
    fd: int | None = None  # kind "fd": the process's own descriptor

    @property
    def where(self) -> str:
        return f"{self.option} {self.path}"


def _own_fd(path: str) -> int | None:
    if path in _STD_PATH:
        return _STD_PATH[path]
    m = _FD_PATH.match(path) or re.match(rf"^/proc/{os.getpid()}(?:/task/\d+)?/fd/(\d+)$", path)
    return int(m.group(1)) if m else None


def _follow(path: str, where: str) -> tuple[str, int | None]:
    """Follow symbolic links one hop at a time (a dangling link names the file it would create).
    Returns the final path, its folder a real path (no links, no '..'), or the descriptor number
    when a hop is one of the process's own descriptors (/dev/stdout, /proc/self/fd/1): those are
    magic links to pipes and terminals that have no path of their own.

    The text is never normalised (os.path.abspath would turn `link/..` into the folder holding
    the link, not the link target's parent): each hop's folder is resolved by `_real_folder`."""
    current = os.path.join(os.getcwd(), path)
    for _ in range(_MAX_LINKS):
        fd = _own_fd(current)
        if fd is not None:
            return current, fd
        head, tail = os.path.split(current)
        if tail in ("", ".", ".."):  # names a folder ('x/', 'x/.', 'x/..'): the kernel resolves it whole
            return _real_folder(current, where) or current, None
        folder = _real_folder(head, where)
        if folder is None:
            return current, None  # a folder that does not exist (output_target says so)
        current = os.path.join(folder, tail)  # the folders' own links and '..', as the kernel sees them
        fd = _own_fd(current)
        if fd is not None:
            return current, fd
        try:
            link = os.readlink(current)
        except FileNotFoundError:
            return current, None  # a new file
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a symbolic link
                return current, None
            raise UsageError(f"{where}: {e.strerror}") from None
        current = os.path.join(folder, link)  # a relative target is read from the link's own folder
    raise UsageError(f"{where}: too many levels of symbolic links")


def _real_folder(folder: str, where: str) -> str | None:
    """The real path of the folder the kernel opens for `folder` (links followed where they stand,
    then '..'), None where it does not exist. The kernel does the walk (os.stat), so a file used
    as a folder (`afile/../x`) and a link loop are refused as open() would refuse them;
    os.path.realpath then only spells a folder that exists, which it does exactly, and the
    spelling is checked against the kernel's answer by device and inode."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UsageError(f"{where}: {_first_non_folder(folder)} is not a folder") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{where}: too many levels of symbolic links") from None
        raise UsageError(f"{where}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{where}: {folder} is not a folder")
    real = os.path.realpath(folder)
    try:
        same = os.stat(real)
    except OSError:
        same = None
    if same is None or (same.st_dev, same.st_ino) != (st.st_dev, st.st_ino):
        raise UsageError(f"{where}: folder {folder} has no path of its own (or changed while it was checked)")
    return real


def _first_non_folder(path: str) -> str:
    p = Path(path)
    for parent in reversed(p.parents):
        if parent.exists() and not parent.is_dir():
            return str(parent)
    return str(p.parent)


def output_target(path: str, option: str) -> OutputTarget:
    """Check, before any work, that `path` can be written as `option`'s output; classify it.

    Exit 2 for: an empty name, a name ending in '/', a folder, a missing or unwritable folder,
    a path through something that is not a folder, an unwritable special file, a closed
    descriptor, a symbolic-link loop."""
    where = f"{option} {path}"
    if not path:
        raise UsageError(f"{option}: give a file name")
    if path == "-":  # stdout, as '-' is stdin for inputs
        return _fd_target(path, option, "/dev/stdout", 1)
    if path.endswith(("/", os.sep)) or os.path.basename(path) in (".", ".."):
        raise UsageError(f"{where}: names a folder; give a file name (e.g. {path.rstrip('/') or '.'}/out.jsonl)")
    resolved, fd = _follow(path, where)
    if fd is not None:
        return _fd_target(path, option, resolved, fd)
    target = Path(resolved)
    folder = target.parent
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise UsageError(f"{where}: {_first_non_folder(str(target))} is not a folder") from None
    except OSError as e:
        raise UsageError(f"{where}: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{where}: is a directory; give a file name inside it")
    if st is not None and stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{where}: is a socket, not a file")
    if st is not None and not stat.S_ISREG(st.st_mode):
        if not os.access(target, os.W_OK):
            raise UsageError(f"{where}: permission denied")
        return OutputTarget(path, option, target, "special")
    # a new or regular file: written beside the target, then renamed, so the folder must take a new file
    if not folder.exists():
        raise UsageError(f"{where}: folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise UsageError(f"{where}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: folder {folder} is not writable")
    if st is not None and not os.access(target, os.W_OK):  # the rename could replace it; `>` would refuse
        raise UsageError(f"{where}: permission denied (a read-only file)")
    return OutputTarget(path, option, target, "new" if st is None else "regular")


def _fd_target(path: str, option: str, resolved: str, fd: int) -> OutputTarget:
    """One of the process's own descriptors (stdout for '-' and /dev/stdout), written as it stands."""
    where = f"{option} {path}"
    name = {0: "stdin", 1: "stdout", 2: "stderr"}.get(fd, f"descriptor {fd}")
    if fd in CLOSED_AT_START:
        raise UsageError(f"{where}: {name} is closed")
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise UsageError(f"{where}: {name} is closed") from None
    if flags & os.O_ACCMODE == os.O_RDONLY or stat.S_ISDIR(mode):
        raise UsageError(f"{where}: {name} is not open for writing")
    return OutputTarget(path, option, Path(resolved), "fd", fd)


def require_writable(path: str, option: str) -> Path:
    """A file `option` may write (see `output_target`); the file that will be written."""
    return output_target(path, option).resolved


# -- outputs against inputs ---------------------------------------------------------------------------------------------

def _identity(path: str) -> tuple[str, object] | None:
    """What a path names, for the files a write could replace: ("inode", (dev, ino)) for an
    existing regular file (stdin '-' by what descriptor 0 is open on), ("new", (dev, ino of its
    folder, name)) for a file that does not exist yet (("path", its spelling) where the folder
    is missing too), None for the rest (a device, FIFO or terminal is written in place, not
    replaced; two writers of /dev/null harm nothing). Symbolic links and '..' are taken as the
    kernel takes them (`_follow`)."""
    try:
        if path == "-":
            st = os.fstat(0)
        else:
            resolved, fd = _follow(path, path)
            try:
                st = os.stat(resolved) if fd is None else os.fstat(fd)
            except FileNotFoundError:  # a new file: the folder it would be made in (by inode) and its name
                folder, name = os.path.split(resolved)
                try:
                    parent = os.stat(folder)
                except OSError:
                    return ("path", resolved)
                return ("new", (parent.st_dev, parent.st_ino, name))
    except (OSError, UsageError):
        return None
    return ("inode", (st.st_dev, st.st_ino)) if stat.S_ISREG(st.st_mode) else None


def check_distinct(outputs: dict[str, str | None], inputs: list[str | None] = (),
                   named: dict[str, str | None] | None = None) -> None:
    """Refuse (exit 2, before any work) an output that is one of the inputs or another output.

    `outputs` maps an option to its path ({"--output": "out.jsonl", "--save-memory": None}; None is
    skipped); `inputs` are the documents the run reads ('-' is stdin, compared by what descriptor 0
    is open on); `named` are other inputs by option ({"--config": "c.yaml"}), named in the message.
    Files compare by device and inode (hard links, other spellings, symbolic links, `link/..`
    taken as the kernel takes it), files that do not exist yet by their folder's device and inode
    and their name; devices, FIFOs and terminals are written in place, never
    replaced, and may be shared."""
    seen: dict[tuple[str, object], str] = {}
    labelled = [("stdin" if p == "-" else f"input {p}", p) for p in inputs]
    labelled += [(f"{option} {p}", p) for option, p in (named or {}).items()]
    for label, name in labelled:
        if name is None:
            continue
        ident = _identity(name)
        if ident is not None:
            seen.setdefault(ident, label)
    for option, path in outputs.items():
        if path is None:
            continue
        ident = _identity("/dev/stdout" if path == "-" else path)  # an output '-' is stdout
        if ident is None:
            continue
        if ident in seen:
            other = seen[ident]
            what = "is the same file as" if other.split()[0] in outputs else "would replace"
            raise UsageError(f"{option} {path} {what} {other}; give a different file")
        seen[ident] = f"{option} {path}"


# -- writing ------------------------------------------------------------------------------------------------------------

def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGINT, SIGTERM, SIGHUP and SIGQUIT for a few system calls (rename, unlink), so a
    signal cannot land between them; a held signal is delivered right after."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class AtomicOutput:
    """One output file, written whole or not at all (see the module docstring).

        with AtomicOutput(path, "--save-memory", binary=True) as out:
            out.file.write(data)          # or a library that writes by name: save_file(t, out.path)

    Leaving the block normally commits (rename into place); an exception or signal discards
    (the temporary file is removed). Without `with`: `open()`, then `commit()` or `discard()`.
    Write errors (a full disk) become one RunError line naming the option (exit 1)."""

    def __init__(self, path: str, option: str, binary: bool = False, target: OutputTarget | None = None):
        self.target = target or output_target(path, option)
        self.binary = binary
        self._file: IO | None = None
        self._fd: int | None = None  # the temporary file's descriptor, until `file` wraps it
        self._tmp: str | None = None
        self._opened = False

    # -- opening -------------------------------------------------------------------------------
    def open(self) -> "AtomicOutput":
        """Create the temporary file (regular targets) now; special targets open on first use."""
        t = self.target
        if self._opened:
            return self
        self._opened = True
        if t.kind in ("new", "regular"):
            name = t.resolved.name[:160]  # room for the prefix and suffix within NAME_MAX
            try:
                with signals_blocked():
                    self._fd, self._tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=t.resolved.parent)
                self._set_mode()
            except OSError as e:
                self.discard()
                raise self._error(e) from None
        return self

    def _set_mode(self) -> None:
        """An existing file keeps its mode and owner; a new one gets the umask's (mkstemp makes 0600)."""
        assert self._fd is not None
        try:
            st = os.stat(self.target.resolved)
        except FileNotFoundError:
            os.fchmod(self._fd, 0o666 & ~_umask())
            return
        if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            with contextlib.suppress(OSError):  # only root may give a file away
                os.fchown(self._fd, st.st_uid, st.st_gid)
        os.fchmod(self._fd, stat.S_IMODE(st.st_mode))

    @property
    def path(self) -> str:
        """A name to write by (for libraries that take a file name): the temporary file, or the
        special file itself. Do not mix with `file`."""
        self.open()
        if self._tmp is not None:
            return self._tmp
        if self.target.kind == "fd":
            return f"/proc/self/fd/{self.target.fd}"
        return str(self.target.resolved)

    @property
    def file(self) -> IO:
        """The open file: binary, or UTF-8 text with newlines as written."""
        self.open()
        if self._file is None:
            t = self.target
            try:
                if self._fd is not None:
                    fd, self._fd = self._fd, None
                elif t.kind == "fd":
                    assert t.fd is not None
                    fd = os.dup(t.fd)
                else:  # a device, FIFO or terminal: opened in place (a FIFO waits here for its reader)
                    fd = os.open(t.resolved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOCTTY, 0o666)
                raw = os.fdopen(fd, "wb", buffering=0)
                buffered = io.BufferedWriter(raw)
                self._file = buffered if self.binary else io.TextIOWrapper(buffered, encoding="utf-8", newline="")
            except OSError as e:
                raise self._error(e) from None
        return self._file

    def _error(self, e: OSError) -> RunError:
        return RunError(f"{self.target.where}: {e.strerror or e}")

    # -- finishing -----------------------------------------------------------------------------
    def sync(self) -> None:
        """Flush what was written, and sync a temporary file (a full disk fails here, before any rename). On
        failure the temporary file is removed and a RunError raised (a closed pipe: BrokenPipeError)."""
        with self._discarded_on_error():
            if self._file is not None:
                self._file.flush()
                if self._tmp is not None:
                    os.fsync(self._file.fileno())
            elif self._fd is not None and self._tmp is not None:
                os.fsync(self._fd)

    def commit(self) -> None:
        """Finish the output: `sync`, close, and for a temporary file rename it over the target.
        On failure the temporary file is removed and a RunError (a full disk) raised."""
        self.sync()
        with self._discarded_on_error():
            if self._file is not None:
                self._file.close()
            elif self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._tmp is not None:
                with signals_blocked():
                    os.replace(self._tmp, self.target.resolved)
                    self._tmp = None

    @contextlib.contextmanager
    def _discarded_on_error(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            self.discard()
            raise
        except OSError as e:
            self.discard()
            raise self._error(e) from None
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop the output: the temporary file is removed; never raises (it runs while another
        error or a signal is on its way)."""
        with signals_blocked():
            if self._tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
                self._tmp = None
            f, self._file = self._file, None
            if f is not None:
                _close_quietly(f)
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "AtomicOutput":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError) and exc.errno in _WRITE_ERRORS:
            raise self._error(exc) from None  # a full disk while writing: one line naming the option


def _close_quietly(f: IO) -> None:
    """Close, ignoring a flush that fails again (a full disk, a reader gone): io's close releases
    the descriptor even when its flush fails."""
    with contextlib.suppress(OSError, ValueError):
        f.close()
