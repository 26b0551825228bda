"""Devices and processes: which device this process uses, and the collectives `train.py` needs.

A single process runs without any of this; under `torchrun` each process reads its place from the
environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins one process group: NCCL on GPUs, Gloo on CPUs.

Every collective waits at most `--dist-timeout` minutes. A rank that dies or hangs then stops the
others with a one-line error instead of NCCL's default half hour. Small host-side agreements (stop
after this step? which micro-batch size?) go through a Gloo group, so asking them never waits for
the GPU."""

from __future__ import annotations

import datetime
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlm.errors import ConfigError, DistributedError


def check_device(device) -> None:
    """A clear error for a device this machine does not have, before any work is done."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use cpu")


@dataclass
class Dist:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: object = None  # the Gloo group for host-side agreements (None: the default group)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def local_master(self) -> bool:
        """The first process on this node: the one that prepares data on the node's own disk."""
        return self.local_rank == 0


def pick_device(device_name: str, world: int, local_rank: int) -> torch.device:
    """ "" is cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" is this process's own GPU."""
    if not device_name:
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    check_device(device_name)
    device = torch.device(device_name)
    if device.type != "cuda":
        return device
    if device.index is not None and world > 1:
        raise ConfigError(
            f"--device {device_name} under torchrun would put every rank on one GPU; pass "
            "--device cuda and each process takes the GPU of its LOCAL_RANK"
        )
    return device if device.index is not None else torch.device("cuda", local_rank)


def setup_distributed(device_name: str = "", timeout_minutes: float = 30.0) -> Dist:
    """This process's rank and device from the torchrun environment, and its process group when
    there are several."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name, world, local_rank)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"this process needs GPU {device.index} (LOCAL_RANK {local_rank}) but the machine "
                "has "
                f"{torch.cuda.device_count()}; start at most that many processes per node "
                "(--nproc_per_node)"
            )
        # kernels launched without a device guard then land on this GPU
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    if timeout_minutes <= 0:
        raise ConfigError(f"--dist-timeout must be positive minutes, not {timeout_minutes}")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return Dist(rank, world, local_rank, device, control)


def all_reduce_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    """Sum x over all ranks, in place; x itself in a single process."""
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def wait_for_others(job: Dist, what: str, fix: str) -> None:
    """A barrier over all ranks that waits at most --dist-timeout, then says what it was waiting
    for."""
    if job.world == 1:
        return
    try:
        dist.barrier(group=job.control)
    except RuntimeError as e:
        raise DistributedError(
            f"rank {job.rank} gave up waiting for {what} ({short(e)}); {fix}"
        ) from None


def short(error: BaseException) -> str:
    """The first line of an error from a collective, without the C++ source location."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return line.split("] ", 1)[-1][:200]


def is_communication_failure(error: BaseException) -> bool:
    """Whether an error comes from a collective whose peers died, hung or timed out (Gloo and NCCL
    say so in RuntimeErrors; newer torch uses DistError subclasses)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        word in text
        for word in (
            "gloo",
            "NCCL",
            "Connection reset",
            "Connection closed",
            "Timed out",
            "timed out",
        )
    )


def agree_max(job: Dist, value: int) -> int:
    """The largest of every rank's value, through the Gloo group: a host-side answer with no GPU
    sync."""
    if job.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=job.control)
    return int(t)


def agree_min(job: Dist, value: int) -> int:
    return -agree_max(job, -value)


def same_on_every_rank(job: Dist, value: str) -> bool:
    """Whether every rank holds the same string (a dataset fingerprint, say)."""
    if job.world == 1:
        return True
    values: list = [None] * job.world
    dist.all_gather_object(values, value, group=job.control)
    return len(set(values)) == 1


class StopSignal:
    """SIGTERM (how SLURM and Kubernetes preempt) and SIGINT (Ctrl-C) ask the run to stop after the
    current step.

    The handler only records the signal; the loop asks `requested(job)` at each step boundary, where
    all ranks agree (a rank that got no signal stops too, at the same step). After the first signal
    the default handlers come back, so a second one ends the process at once: the checkpoint being
    written is then abandoned under its temporary name, and the previous one stays valid."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> StopSignal:
        # Python only delivers signals there
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.restore()

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self, job: Dist) -> int:
        """The signal number any rank got (0: none), the same answer on every rank."""
        return agree_max(job, self.signum)


def bf16_all_reduce_hook(process_group, bucket):
    """A DDP communication hook: each gradient bucket is summed over ranks in bf16 (half the bytes
    on the wire) and averaged back into its own dtype. torch's built-in bf16 hook needs NCCL; this
    one works on Gloo too."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def unpack(done) -> torch.Tensor:
        buffer.copy_(done.value()[0])
        return buffer

    return future.then(unpack)
