"""Corpus runs sharded over processes and machines with torch.distributed (launched by torchrun).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in every process it starts. Documents are
dealt round-robin: in round r, rank k computes document r * world_size + k, with a memory
of its own (fresh per document), then every rank reports its result and rank 0 receives
them in document order. So rank 0 can write each round as soon as it is complete, and its
output is the one a single process writes (the numbers of a document do not depend on
which process computed it). A failure or a stop signal on any rank travels in the same
exchange, so every rank stops at the same round with the same error.

Process groups: gloo on CPU, nccl on GPU (each process on the GPU numbered by its
LOCAL_RANK). Only Python objects are exchanged (`all_gather_object`, `gather_object`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

from .errors import SegcliError, Stopped, UsageError


@dataclass(frozen=True)
class World:
    rank: int  # this process, 0 .. size-1 (0 writes the output)
    size: int  # processes in the run
    local_rank: int  # this process on its machine (picks its GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """Indices of the documents this process computes (round-robin)."""
        return range(self.rank, n, self.size)


def detect() -> World | None:
    """The world torchrun set up, or None for a single process (WORLD_SIZE unset or 1)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if size <= 1:
        return None
    if not 0 <= rank < size:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank, size, local)


MAIN_FAILS_FIRST_S = 10.0  # how long another rank waits for rank 0 to report an error they all found


def let_main_fail_first() -> None:
    """On a rank other than 0 that found the error every rank finds (its options): give rank 0 the time to say it
    and exit, so torchrun's first failure is rank 0's and its SIGTERM ends this rank quietly (the default action,
    no second line); a rank 0 that does not exit in MAIN_FAILS_FIRST_S leaves this one to exit all the same."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(MAIN_FAILS_FIRST_S)


def current_rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def init(world: World, device_type: str, timeout_s: float = 1800) -> None:
    """Join the process group (MASTER_ADDR/MASTER_PORT come from torchrun)."""
    import torch  # here, not at the top: the CLI imports this module for every command, torchrun or not
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run without torchrun")
    if device_type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {world.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                             "start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(world.local_rank)  # torch.device('cuda') now means this process's GPU
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size,
                                timeout=timedelta(seconds=timeout_s))


def shutdown(timeout_s: float = 60) -> None:
    """Leave the process group once every rank has come to leave it.

    Without the barrier a rank that finishes first tears its connections down while a peer's gloo
    threads still use them, and that peer can abort at exit ("terminate called without an active
    exception", seen once in six runs of tests/engine/test_distributed.py). The barrier is bounded (gloo's
    monitored barrier) so a peer that died cannot hang the others; if it fails they leave anyway. NCCL has
    no bounded barrier (a plain one would wait out the group's 30-minute timeout for a dead peer), so
    GPU groups leave without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        except Exception:  # noqa: BLE001 - a dead or failed peer: nothing left to wait for
            pass
    dist.destroy_process_group()


@dataclass
class Failure:
    """What stopped a rank: an error (message and exit code) or a signal, sent to every rank."""

    message: str
    exit_code: int
    signum: int | None = None  # a stop signal (SIGINT/SIGTERM) rather than an error
    index: int = -1  # the document it happened on


class PeerFailure(SegcliError):
    """Raised on ranks other than 0 when the run stops for a failure rank 0 reports:
    they exit with the same code and write nothing (rank 0 writes the one error line)."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure
        self.exit_code = failure.exit_code


def all_gather(world: World, obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(world: World, obj: Any) -> list[Any] | None:
    import torch.distributed as dist

    out: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def first_failure(statuses: list[Any]) -> Failure | None:
    failures = [s for s in statuses if isinstance(s, Failure)]
    return min(failures, key=lambda f: f.index) if failures else None


def agree(world: World, failure: Failure | None) -> Failure | None:
    """Every rank learns the first failure (in document order) of any rank, or None."""
    return first_failure(all_gather(world, failure))


def rounds(world: World, n: int, work: Callable[[int], Any]) -> Iterator[tuple[int, Any]]:
    """Compute documents round-robin; on rank 0 yield (index, result) in document order.

    `work(i)` returns a picklable result or a `Failure`. Other ranks yield nothing. Every
    rank stops at the round where any rank failed: rank 0 yields the results before the
    failing document and then returns the failure via `StopRound`.
    """
    for start in range(0, n, world.size):
        i = start + world.rank
        result = work(i) if i < n else None
        failure = agree(world, result if isinstance(result, Failure) else None)
        results = gather_to_main(world, None if isinstance(result, Failure) else result)
        if world.is_main:
            for k, r in enumerate(results or []):
                if start + k >= n or (failure is not None and start + k >= failure.index):
                    break
                yield start + k, r
        if failure is not None:
            raise StopRound(failure)


class StopRound(Exception):
    """A rank failed or was stopped; carries the agreed `Failure`."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


class Agreement:
    """Setup steps every rank runs: a failure on any rank stops every rank with the same error
    (rank 0 raises it, the others raise `PeerFailure` and exit quietly with its code). Single process
    (world None): errors as usual."""

    def __init__(self, world: World | None):
        self.world = world

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.world is None:
            return fn(*args)
        failure, out = None, None
        try:
            out = fn(*args)
        except SegcliError as e:
            failure = Failure(str(e), e.exit_code, index=self.world.rank)
        raise_failure(self.world, agree(self.world, failure))
        return out


class AgreedError(SegcliError):
    """A failure every rank agreed on, raised on rank 0 with that failure's exit code."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.exit_code = failure.exit_code


def raise_failure(world: World, failure: Failure | None, done: int = 0) -> None:
    """Raise the agreed failure: on rank 0 as the error (or `Stopped` for a signal), elsewhere `PeerFailure`."""
    if failure is None:
        return
    if not world.is_main:
        raise PeerFailure(failure)
    if failure.signum is not None:
        raise Stopped(failure.signum, f"stopped after {done} documents; no summary")
    raise AgreedError(failure)
