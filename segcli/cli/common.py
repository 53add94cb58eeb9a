"""Pieces every command shares: the stderr console, option types, error handling."""

from __future__ import annotations

import contextlib
import enum
import functools
import platform
import signal
import sys
import threading
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from .. import __version__
from ..distributed import PeerFailure
from ..errors import SegcliError
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


ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model directory or hub id (default: the bundled model).")]
SegmentSizeOpt = Annotated[Optional[int], typer.Option("--segment-size", "-s", help="Tokens per segment, n_s.")]
MemorySizeOpt = Annotated[Optional[int], typer.Option(help="FIFO memory pairs n_c (fifo, sink, compressive).")]
SinkOpt = Annotated[Optional[int], typer.Option(help="Sink pairs kept for ever (sink).")]
RateOpt = Annotated[Optional[int], typer.Option(help="Pairs mean-pooled into one compressed slot (compressive).")]
CompressedOpt = Annotated[Optional[int], typer.Option(help="Compressed slots n_cm (compressive).")]
DeviceOpt = Annotated[Optional[Device], typer.Option(help="auto picks CUDA when a GPU is present.")]
DTypeOpt = Annotated[Optional[DType], typer.Option(help="auto: float32 on CPU, bfloat16 on CUDA.")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file of options; CLI options override it.")]
FormatOpt = Annotated[Optional[Format], typer.Option("--format", "-f", help="Output format (default: table on a terminal, jsonl in a pipe).")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write results to FILE (atomically) instead of stdout.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages on stderr.")]
DebugOpt = Annotated[bool, typer.Option(help="Show tracebacks on errors.")]
ErrorsOpt = Annotated[Optional[Errors], typer.Option(help="Invalid UTF-8: strict (error, exit 2) or replace (U+FFFD).")]
MaxTokensOpt = Annotated[Optional[int], typer.Option(help="Score only the first N tokens of each document.")]
RevisionOpt = Annotated[Optional[str], typer.Option(help="Hub revision (Hugging Face models).")]
TrustOpt = Annotated[Optional[bool], typer.Option("--trust-remote-code/--no-trust-remote-code", help="Allow a hub model's own code (off by default).")]


class Interrupted(Exception):
    """A SIGINT or SIGTERM stopped the run; exits 128 + the signal number (130, 143)."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum)
        self.signum, self.detail = signum, detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        return f"segcli: interrupted by {name}{'; ' + self.detail if self.detail else ''}"


class StopSignals:
    """SIGINT and SIGTERM handling for a run.

    Outside `deferred()` a signal raises `Interrupted` at once (model loading,
    reading files). Inside it, the first signal only sets a flag that the segment
    loop polls between segments (`stop = StopSignals(); stream.segments(doc, stop)`),
    so the current segment and its records are written whole; `immediate()` marks
    blocking waits (reading stdin) where a signal must still stop at once. A second
    signal always stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

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
        first = self.signum is None
        self.signum = signum
        if not self._defer or not first:
            raise Interrupted(signum)

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
    """One plain line on stderr: no rich markup or highlighting, never wrapped."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int) -> None:
    say(f"segcli: error: {message}")
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """One stderr line and the contract's exit code per error; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Interrupted as e:
            if debug:
                raise
            say(e.message())
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
            err_console.print("segcli: interrupted", markup=False)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            fail(f"{type(e).__name__}: {first} (rerun with --debug for the traceback)", 1)

    return wrapper


def quiet_broken_pipe() -> None:
    """The reader went away (`| head`): stop quietly, exit 0."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
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
