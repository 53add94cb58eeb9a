"""Pieces every command shares: the stderr console, option types, error handling."""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import platform
import signal
import sys
import threading
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from .. import __version__
from ..config import RunConfig, default_threads
from ..distributed import PeerFailure
from ..errors import MAX_MESSAGE, SegcliError, UsageError, one_line  # noqa: F401  (MAX_MESSAGE: for tests)
from ..memory import POLICY_NAMES

err_console = Console(stderr=True, highlight=False)

Policy = enum.Enum("Policy", {n: n for n in POLICY_NAMES}, type=str)  # type: ignore[misc]


class Format(str, enum.Enum):
    table = "table"
    jsonl = "jsonl"
    json = "json"
    csv = "csv"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Errors(str, enum.Enum):
    strict = "strict"
    replace = "replace"


_DEFAULTS = RunConfig()


def default(name: str) -> str:
    """`[default: X]` for a help text: the RunConfig default of an option whose CLI default is None (not given,
    so that a YAML config can set it)."""
    v = getattr(_DEFAULTS, name)
    return f"[default: {'off' if v is False else v}]"


ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="DIR|ID", help="Model directory or hub id. [default: the bundled model]")]
SegmentSizeOpt = Annotated[Optional[int], typer.Option(
    "--segment-size", "-s", metavar="N", help=f"Tokens per segment, n_s. {default('segment_size')}")]
MemorySizeOpt = Annotated[Optional[int], typer.Option(
    metavar="N", help=f"Memory pairs n_c (fifo, sink, compressive, tova, h2o, snapkv, keynorm). {default('memory_size')}")]
SinkOpt = Annotated[Optional[int], typer.Option(metavar="N", help=f"Sink pairs kept for ever (sink). {default('sink_tokens')}")]
RateOpt = Annotated[Optional[int], typer.Option(
    metavar="N", help=f"Pairs mean-pooled into one compressed slot (compressive). {default('compress_rate')}")]
RecentOpt = Annotated[Optional[int], typer.Option(
    metavar="N", help="Newest pairs always kept, r <= n_c (h2o). [default: n_c / 2]")]
WindowOpt = Annotated[Optional[int], typer.Option(
    metavar="N", help=f"Last queries that score the memory, newest pairs kept (snapkv). {default('window')}")]
POLICY_HELP = f"Memory policy: {', '.join(POLICY_NAMES)} (segcli policies describes them). {default('memory')}"
PolicyOpt = Annotated[Optional[str], typer.Option(metavar="POLICY", help=POLICY_HELP)]  # checked by RunConfig.validate


class LayerBudget(str, enum.Enum):
    uniform = "uniform"
    pyramid = "pyramid"


LayerBudgetOpt = Annotated[Optional[LayerBudget], typer.Option(
    help="Slots per layer: uniform (n_c each) or pyramid (PyramidKV's linear schedule, same total; fifo, sink, "
         f"compressive, tova, h2o, snapkv, keynorm). {default('layer_budget')}")]
CompressedOpt = Annotated[Optional[int], typer.Option(
    metavar="N", help=f"Compressed slots n_cm (compressive). {default('compressed_size')}")]
DeviceOpt = Annotated[Optional[Device], typer.Option(help=f"auto picks CUDA when a GPU is present. {default('device')}")]
DTypeOpt = Annotated[Optional[DType], typer.Option(help=f"auto: float32 on CPU, bfloat16 on CUDA. {default('dtype')}")]
ConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", "-c", metavar="FILE", help="YAML file of options; CLI options override it.")]
FormatOpt = Annotated[Optional[Format], typer.Option(
    "--format", "-f", help="Output format. [default: table on a terminal, jsonl in a pipe]")]
OutputOpt = Annotated[Optional[str], typer.Option(
    "--output", "-o", metavar="FILE", help="Write results to FILE (atomically) instead of stdout.")]
SeedOpt = Annotated[Optional[int], typer.Option(metavar="N", help=f"Random seed. {default('seed')}")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors, and the libraries' warnings.")]
DEBUG_ENV = "SEGCLI_DEBUG"  # set by --debug: library code shows what it would otherwise keep quiet
ErrorsOpt = Annotated[Optional[Errors], typer.Option(
    help=f"Invalid UTF-8: strict (error, exit 2) or replace (U+FFFD). {default('errors')}")]
MaxTokensOpt = Annotated[Optional[int], typer.Option(
    metavar="N", help="Score only the first N tokens of each document. [default: all]")]
RevisionOpt = Annotated[Optional[str], typer.Option(metavar="REV", help="Hub revision (Hugging Face models).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    metavar="N", help="CPU threads for torch's intra-op work. [default: $OMP_NUM_THREADS when set, else the CPU cores "
                      f"this process may use minus one, at least 1: {default_threads()} here]")]
TrustOpt = Annotated[Optional[bool], typer.Option(
    "--trust-remote-code/--no-trust-remote-code", help="Allow a hub model's own code. [default: off]",
    show_default=False)]


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(BaseException):
    """A SIGINT, SIGTERM, SIGHUP or SIGQUIT stopped the run; exits 128 + the signal number (130,
    143, 129, 131).

    A BaseException, as KeyboardInterrupt is: libraries' `except Exception` must not catch it
    (huggingface_hub's lazy import catches Exception, prints `Error importing ...` on stdout and
    re-raises; transformers' loaders turn it into another error)."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum)
        self.signum, self.detail = signum, detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        return f"segcli: interrupted by {name}{'; ' + self.detail if self.detail else ''}"


_DEFERRED: list[int | None] = [None]  # a signal StopSignals deferred during this command (command_signals resets it)
_WRITING = [False]  # inside output_write(): the first signal stops at once too


_COMMITTED = [False]  # every output of the command is in place: a signal now changes nothing (exit 0 stands)


def outputs_committed() -> None:
    """Called (signals held) once every output of the command is in place: a signal from now on, or one held
    while they were put in place, is ignored; the command has finished and says so with exit 0."""
    _COMMITTED[0] = True
    _DEFERRED[0] = None


def pending_signal() -> int | None:
    """The signal a StopSignals deferred during this command, or None. A command that finishes with one pending
    ends as interrupted, not with exit 0."""
    return _DEFERRED[0]


@contextlib.contextmanager
def output_write() -> Iterator[None]:
    """A write that may block on someone else (a terminal held by ^S): the first signal raises Interrupted here even
    inside `StopSignals.deferred()`, since the write could otherwise wait for ever."""
    old, _WRITING[0] = _WRITING[0], True
    try:
        yield
    finally:
        _WRITING[0] = old


STOP_GRACE = 2.0  # seconds a write may still wait for a pipe's reader once a stop signal is pending


def wait_writable(fd: int) -> None:
    """Wait until the pipe `fd` has room for PIPE_BUF bytes (a write of that much then goes in whole, without
    blocking). Its reader may have stopped reading, so the first signal ends the wait (Interrupted, nothing
    written) even inside `StopSignals.deferred()`; with a signal already pending, the wait lasts at most
    STOP_GRACE seconds."""
    import select

    poll = select.poll()  # not select.select: any descriptor number
    poll.register(fd, select.POLLOUT)
    with output_write():
        if _DEFERRED[0] is not None:
            if not poll.poll(STOP_GRACE * 1000):
                raise Interrupted(_DEFERRED[0])
        else:
            poll.poll()


class StopSignals:
    """SIGINT, SIGTERM, SIGHUP and SIGQUIT handling for a run.

    Outside `deferred()` a signal raises `Interrupted` at once (model loading,
    reading files). Inside it, the first signal only sets a flag that the segment
    loop polls between segments (`stop = StopSignals(); stream.segments(doc, stop)`),
    so the current segment and its records are written whole; `immediate()` marks
    blocking waits (reading stdin) where a signal must still stop at once; so is every
    wait to write a pipe, terminal or FIFO (`wait_writable`, `output_write`: a reader that
    stopped reading blocks it for ever). A second signal always stops at once. A signal deferred but
    never polled (it came after the last segment) still ends the command with 128 + n
    (`pending_signal`, checked before an output is put in place and when the command
    returns): a signalled run never exits 0.
    """

    SIGNALS = HANDLED_SIGNALS

    def __init__(self) -> None:
        self.signum: int | None = None
        self._defer = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if _COMMITTED[0]:
            return
        first = self.signum is None
        self.signum = signum
        if not self._defer or not first or _WRITING[0]:
            raise Interrupted(signum)
        _DEFERRED[0] = signum  # nobody may have polled it yet: the command's end does (command_signals, Writer.close)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        old, self._defer = self._defer, True
        try:
            yield
        finally:
            self._defer = old

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        if self.signum is not None:
            raise Interrupted(self.signum)
        old, self._defer = self._defer, False
        try:
            yield
        finally:
            self._defer = old


def value(x: Any) -> Any:
    return x.value if isinstance(x, enum.Enum) else x


def say(message: str) -> None:
    """One plain line on stderr (`one_line`): no rich markup or highlighting, never wrapped. A
    stderr that is gone (a hung-up terminal, `2>&-`) loses the line, not the exit code."""
    with contextlib.suppress(OSError, ValueError):
        err_console.print(one_line(message), markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int) -> None:
    say(f"segcli: error: {message}")
    raise typer.Exit(code)


# -- closed stdin, stdout, stderr (`<&-`, `>&-`, `2>&-`) ------------------------------------------------------------------

class ClosedStdin:
    """sys.stdin when descriptor 0 was closed: reading it is a UsageError (exit 2), not an AttributeError."""

    segcli_closed = True
    MESSAGE = "stdin is closed; give the document as a file, or run without `<&-`"

    @property
    def buffer(self):
        raise UsageError(self.MESSAGE)

    def read(self, *args):
        raise UsageError(self.MESSAGE)

    readline = read1 = read

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise UsageError(self.MESSAGE)

    def close(self) -> None:
        pass


def guard_std_streams() -> None:
    """Descriptors 0, 1, 2 that are closed get a harmless stand-in (the read end of an empty pipe:
    reads see end of file, writes fail), so the files segcli opens never land on them (a model
    file as fd 0, the output as fd 1 where a library's print would go). sys.stdin becomes
    ClosedStdin; sys.stdout stays None and output.stdout_stream() refuses it (exit 2); a closed
    stderr loses the messages only. Idempotent; runs at the start of every command."""
    import os

    from ..files import CLOSED_AT_START

    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        closed = stream is None or getattr(stream, "segcli_closed", False)  # Python found it closed at start-up
        try:
            os.fstat(fd)
        except OSError:  # closed now; sys.<name> may still be a stand-in of its own (a test runner's)
            r, w = os.pipe()
            if r != fd:
                os.dup2(r, fd, inheritable=False)
                os.close(r)
            if w != fd:
                os.close(w)
        if closed:
            CLOSED_AT_START.add(fd)
            if name == "stdin":
                sys.stdin = ClosedStdin()  # type: ignore[assignment]


# -- signals outside a run ----------------------------------------------------------------------------------------------

def _raise_interrupted(signum: int, frame) -> None:
    if not _COMMITTED[0]:
        raise Interrupted(signum)


OWN_PROCESS = False  # True when segcli is the program (main()), not a command called in-process (a test, a notebook)


def pass_on(signum: int) -> None:
    """After a signal stopped a command cleanly (outputs discarded, the one line said, handlers restored):
    in-process, hand it to the handler that was there before, so the embedding program stops as it would
    have without segcli (pytest under `timeout` ran on for minutes when segcli turned SIGTERM into one
    test's exit code 143; Ctrl-C stopped one test, not the suite). segcli itself exits 128 + n instead."""
    if OWN_PROCESS or threading.current_thread() is not threading.main_thread():
        return
    signal.raise_signal(signum)


@contextlib.contextmanager
def command_signals() -> Iterator[None]:
    """For a whole command: a handled signal raises Interrupted, so cleanups (temporary files)
    run and handle_errors prints the one line; StopSignals refines this inside a run. A signal
    StopSignals deferred and nobody polled (it came after the last segment) raises Interrupted
    when the command returns. The previous handlers come back afterwards (start-up's, see
    segcli/__main__.py)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in HANDLED_SIGNALS}
    _DEFERRED[0], _COMMITTED[0] = None, False
    try:
        yield
        if _DEFERRED[0] is not None:  # deferred after the last poll (the end of a run): still a stopped command
            raise Interrupted(_DEFERRED[0])
    finally:
        _DEFERRED[0], _COMMITTED[0] = None, False
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def torch_threads_restored(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads as they were before the command (--threads sets them; a caller that runs
    commands in-process, a test, keeps its own)."""
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if threads is not None and torch is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def handle_errors(fn: Callable) -> Callable:
    """One stderr line and the contract's exit code per error; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        with debug_env(debug):
            return _handled(fn, debug, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def debug_env(debug: bool) -> Iterator[None]:
    """Under --debug, SEGCLI_DEBUG=1 for the command: library warnings (while loading a model) are shown, not kept
    quiet (backends.folder_checks); the environment as it was afterwards (a command run in-process)."""
    old = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        yield
    finally:
        if debug:
            if old is None:
                os.environ.pop(DEBUG_ENV, None)
            else:
                os.environ[DEBUG_ENV] = old


def _handled(fn: Callable, debug: bool, /, *args, **kwargs):
    """`fn`, with one stderr line and the contract's exit code per error."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        guard_std_streams()
        with command_signals(), torch_threads_restored(threads):
            return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort):
        raise
    except Interrupted as e:
        if debug:
            raise
        say(e.message())
        pass_on(e.signum)
        raise typer.Exit(e.exit_code) from None
    except PeerFailure as e:  # another rank of a torchrun run failed; rank 0 prints the error
        raise typer.Exit(e.exit_code) from None
    except SegcliError as e:
        if debug:
            raise
        fail(str(e), e.exit_code)
    except BrokenPipeError:
        quiet_broken_pipe()
    except KeyboardInterrupt:
        if debug:
            raise
        say("segcli: interrupted by SIGINT")
        raise typer.Exit(130) from None
    except RecursionError:
        if debug:
            raise
        fail("RecursionError: something is nested too deeply (rerun with --debug for the traceback)", 1)
    except MemoryError as e:
        if debug:
            raise
        detail = f" ({str(e).splitlines()[0]})" if str(e) else ""
        fail(f"out of memory{detail}; try a smaller --memory-size, --segment-size or --max-tokens "
             "(rerun with --debug for the traceback)", 1)
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        fail(f"{type(e).__name__}: {first} (rerun with --debug for the traceback)", 1)


def quiet_broken_pipe() -> None:
    """The reader went away (`| head`): stop quietly, exit 0. Whatever is still buffered for
    stdout goes nowhere (else Python's flush at exit would fail again, and print about it)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    raise typer.Exit(0)


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {
        "segcli": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }
