"""train.py under the failures of real clusters: preemption signals, out-of-memory, full disks, dead
ranks, damaged data. Each failure is injected into a real run (a signal, or a patch applied by a
small harness script before train.py starts) and the run must end as the README promises: one line,
the right exit code, a valid checkpoint, and a resume that ends bit for bit where an uninterrupted
run does."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RUN_ENV, from_scratch
from test_train import (
    ROOT,
    TINY,
    assert_same_weights,
    final_weights,
    free_port,
    metrics,
    run_train,
    torchrun,
)

COMMON = [*TINY, *"--max-steps 24 --global-batch-size 8 --save-every 10 --eval-every 12".split()]

# Applied before train.py runs, in the training process itself: MLM_INJECT names what goes wrong.
HARNESS = r"""
import builtins, errno, os, runpy, sys
import torch
inject, rank = os.environ["MLM_INJECT"], int(os.environ.get("RANK", 0))
# out of memory whenever a micro-batch has more rows than this (on one rank)
if inject.startswith("oom-above:"):
    limit, only_rank = (int(x) for x in inject.split(":")[1:])
    import mlm.model
    forward = mlm.model.MaskedLM.forward
    def tight(self, input_ids, *args, **kwargs):
        if rank == only_rank and input_ids.shape[0] > limit:
            raise torch.OutOfMemoryError(f"injected: {input_ids.shape[0]} rows > {limit}")
        return forward(self, input_ids, *args, **kwargs)
    mlm.model.MaskedLM.forward = tight
# a full disk (or no permission) when the bytes of a matching file reach it
elif inject.startswith("fsync:"):
    _, code, pattern = inject.split(":", 2)
    fsync = os.fsync
    def failing(fd):
        if pattern in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return fsync(fd)
    os.fsync = failing
elif inject.startswith("append:"):  # metrics.jsonl cannot grow past its first lines
    pattern, budget = inject.split(":")[1], [int(inject.split(":")[2])]
    real_open = builtins.open
    def tight_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(pattern) and "a" in mode:
            budget[0] -= 1
            if budget[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)
    builtins.open = tight_open
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def env(**extra) -> dict:
    return {**RUN_ENV, **extra}


def command(*args, nproc: int = 1, harness: Path | None = None) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            *"-m torch.distributed.run --nnodes=1".split(),
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    script = [str(harness), str(ROOT / "train.py")] if harness else [str(ROOT / "train.py")]
    return launcher + script + from_scratch(args)


def run(
    *args, nproc: int = 1, inject: str | None = None, tmp: Path | None = None, timeout: int = 300
):
    harness = None
    if inject:
        harness = tmp / "harness.py"
        harness.write_text(HARNESS)
    extra = {"MLM_INJECT": inject} if inject else {}
    return subprocess.run(
        command(*args, nproc=nproc, harness=harness),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env(**extra),
        timeout=timeout,
    )


def start(*args, nproc: int = 1, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        command(*args, nproc=nproc),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl shows a training line at `step` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-3000:]}"
        try:
            if any(m.get("step", 0) >= step and "loss" in m for m in metrics(out)):
                return
        except (FileNotFoundError, ValueError):  # not written yet, or a line being written
            pass
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def stop_line(stderr: str) -> tuple[str, int]:
    """The line that says where the run stopped, and that step."""
    line = next(
        line[line.index("stopped by") :] for line in stderr.splitlines() if "stopped by" in line
    )
    return line, int(line.split("after step ")[1].split(";")[0])


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end equal to (dropout on: resume replays its
    draws)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run("--data", dataset, *COMMON, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def resume_equals(reference: Path, out: Path, *args) -> None:
    resumed = run(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(out), final_weights(reference), atol=0)
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == list(range(1, 25)), steps  # every step once, none twice


# --------------------------------------------------------------------------------------- preemption
@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_step_and_resume_is_bit_identical(
    dataset, reference, tmp_path, signum, code
):
    out = tmp_path / "run"
    proc = start("--data", dataset, *COMMON, "--out", out)
    wait_for_step(out, 3, proc)
    sent = time.time()
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, stderr[-3000:]
    assert time.time() - sent < 30 and "Traceback" not in stderr
    line, step = stop_line(stderr)
    assert (
        f"stopped by {signal.Signals(signum).name} after step {step}" in line and "--resume" in line
    )
    assert (out / "checkpoints" / f"step_{step:08d}.pt").is_file() and step < 24
    resume_equals(reference, out, "--data", dataset, *COMMON)


@pytest.mark.slow
def test_a_second_signal_during_the_save_leaves_the_last_checkpoint_valid(
    dataset, reference, tmp_path
):
    out = tmp_path / "run"
    proc = start("--data", dataset, *COMMON, "--out", out)
    wait_for_step(out, 11, proc)  # step 10's checkpoint exists by now
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # the default handler is back: the process ends wherever it is
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not [
        p
        for p in (out / "checkpoints").iterdir()
        if not p.name.endswith(".pt") and ".tmp-" not in p.name
    ]
    resume_equals(reference, out, "--data", dataset, *COMMON)


def rank_pid(out: Path, rank: int, timeout: float = 120) -> int:
    """The process id of the train.py process with this RANK whose command line names `out`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            launcher = b"--nproc_per_node=2" in cmdline  # torchrun itself, not one of its workers
            if str(out).encode() in cmdline and f"RANK={rank}".encode() in environ and not launcher:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process found")


@torchrun
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_torchrun_ranks_stop_at_the_same_step_when_one_gets_the_signal(dataset, tmp_path):
    common = ["--data", dataset, *COMMON, "--dropout", "0"]
    out = tmp_path / "ddp"
    proc = start(*common, "--out", out, nproc=2)
    wait_for_step(out, 3, proc)
    os.kill(rank_pid(out, 1), signal.SIGTERM)  # only rank 1 is told
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0
    line, step = stop_line(stderr)
    assert line.startswith("stopped by SIGTERM")
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step_{step:08d}.pt"
    assert max(m["step"] for m in metrics(out) if "loss" in m) == step  # rank 0 stopped there too
    resumed = run(*common, "--out", out, "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single = run(*common, "--out", tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_weights(final_weights(out), final_weights(tmp_path / "single"), atol=1e-6)


@torchrun
# --------------------------------------------------------------------------------- out of memory
@pytest.mark.slow
def test_auto_micro_batch_halves_on_out_of_memory_and_keeps_the_global_batch(dataset, tmp_path):
    common = ["--data", dataset, *TINY, *"--max-steps 6 --global-batch-size 8 --dropout 0".split()]
    auto = run(
        *common,
        "--micro-batch-size",
        "auto",
        "--out",
        tmp_path / "auto",
        inject="oom-above:4:0",
        tmp=tmp_path,
    )
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "out of memory with micro-batches of 8: trying 4" in auto.stderr
    assert (
        "micro-batch size 4 (2 per step on each rank), chosen by --micro-batch-size auto"
        in auto.stderr
    )
    assert {"step": 0, "micro_batch_size": 4} in metrics(tmp_path / "auto")
    state = torch.load(sorted((tmp_path / "auto" / "checkpoints").iterdir())[-1], weights_only=True)
    assert state["micro_batch"] == 4
    fixed = run(*common, "--micro-batch-size", "4", "--out", tmp_path / "fixed")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "auto"), final_weights(tmp_path / "fixed"), atol=0)

    # Two ranks, only rank 0 short of memory: both settle on its size, and train the same global
    # batch.
    ddp = run(
        *common,
        "--micro-batch-size",
        "auto",
        "--out",
        tmp_path / "ddp",
        nproc=2,
        inject="oom-above:2:0",
        tmp=tmp_path,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert {"step": 0, "micro_batch_size": 2} in metrics(tmp_path / "ddp")
    assert_same_weights(
        final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fixed"), atol=1e-6
    )


def test_out_of_memory_without_auto_says_what_to_do(dataset, tmp_path):
    result = run(
        "--data",
        dataset,
        *TINY,
        "--max-steps",
        "2",
        "--global-batch-size",
        "8",
        "--out",
        tmp_path / "r",
        inject="oom-above:4:0",
        tmp=tmp_path,
    )
    assert result.returncode == 1
    assert error_line(result.stderr) == (
        "error: out of memory at step 0 with micro-batches of 8; resume with "
        "--micro-batch-size 4 (or auto, which finds one before training)"
    )


# ---------------------------------------------------------------------------------- full disks
@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(dataset, reference, tmp_path):
    out = tmp_path / "run"
    full = run(
        "--data",
        dataset,
        *COMMON,
        "--out",
        out,
        inject="fsync:ENOSPC:step_00000020.pt",
        tmp=tmp_path,
    )
    assert full.returncode == 1, full.stderr[-3000:]
    assert error_line(full.stderr) == (
        f"error: cannot write {out}/checkpoints/step_00000020.pt: No space left on "
        "device; free some space or make the folder writable (or choose another "
        "--out), then run again"
    )
    kept = sorted((out / "checkpoints").iterdir())
    # whole, and no temporary file left beside it
    assert [p.name for p in kept] == ["step_00000010.pt"]
    assert torch.load(kept[0], weights_only=True)["step"] == 10
    resume_equals(reference, out, "--data", dataset, *COMMON)


@pytest.mark.parametrize(
    "inject, path",
    [
        ("fsync:EACCES:final/model.safetensors", "final/model.safetensors"),  # the export
        ("append:metrics.jsonl:3", "metrics.jsonl"),  # the metrics, after three lines
    ],
)
def test_unwritable_outputs_are_one_line_and_exit_1(dataset, tmp_path, inject, path):
    out = tmp_path / "run"
    result = run(
        "--data",
        dataset,
        *TINY,
        "--max-steps",
        "4",
        "--global-batch-size",
        "4",
        "--out",
        out,
        inject=inject,
        tmp=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert line.startswith(f"error: cannot write {out}/{path}: ") and "then run again" in line
    assert not list(out.rglob("*.tmp-*"))


# ----------------------------------------------------------------------------------- dead ranks
def launch_two_ranks(args: list, tmp_path: Path) -> list[subprocess.Popen]:
    """Two ranks started by hand (no torchrun agent to clean up after them), as two nodes would
    be."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        rank_env = env(
            RANK=str(rank),
            LOCAL_RANK="0",
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *from_scratch(args)],
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


@torchrun
@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_the_other_rank_stops_with_one_line_when_a_rank_dies_or_hangs(dataset, tmp_path, how):
    out = tmp_path / how
    args = [
        "--data",
        dataset,
        *TINY,
        *"--max-steps 100000 --global-batch-size 8 --out".split(),
        out,
        *"--dist-timeout 0.1".split(),
    ]  # 6 seconds
    rank0, rank1 = launch_two_ranks(args, tmp_path)
    try:
        wait_for_step(out, 2, rank0)
        started = time.time()
        rank1.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        stderr = rank0.communicate(timeout=120)[1]
        assert time.time() - started < 60
        assert rank0.returncode == 1, stderr[-3000:]
        assert error_line(stderr).startswith("error (rank 0): lost contact with another rank (")
        assert error_line(stderr).endswith(
            "it died, hung or was stopped; see its log, then resume with --resume"
        )
    finally:
        for proc in (rank0, rank1):
            proc.kill()
            proc.communicate()


# ---------------------------------------------------------------------------------- damaged data
@pytest.mark.parametrize(
    "damage, message",
    [
        ("swap docs", "train.docs does not match train.tokens: the dataset is damaged"),
        ("ids beyond the vocabulary", "beyond its vocabulary of 600: the dataset is damaged"),
    ],
)
def test_a_damaged_dataset_is_refused_before_training(dataset, tmp_path, damage, message):
    import shutil

    import numpy as np

    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    if damage == "swap docs":  # same size, wrong offsets: another split's documents
        offsets = np.fromfile(copy / "train.docs", dtype=np.int64)
        (offsets[::-1].copy()).tofile(copy / "train.docs")
    else:  # the tokens of a tokenizer with a bigger vocabulary, same length
        tokens = np.fromfile(copy / "train.tokens", dtype=np.uint16)
        tokens[::7] = 60_000
        tokens.tofile(copy / "train.tokens")
    result = run("--data", copy, *TINY, "--max-steps", "2", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert message in error_line(result.stderr)


def test_storage_errors_name_the_cause(tmp_path):
    """The conversion itself: an OSError of a full or read-only disk becomes the one-line
    StorageError."""
    from mlm.errors import StorageError
    from mlm.io import atomic_write

    target = tmp_path / "file"
    real_fsync = os.fsync

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.fsync = no_space
    try:
        with pytest.raises(StorageError, match=f"cannot write {target}: No space left on device"):
            atomic_write(target, "x")
    finally:
        os.fsync = real_fsync
    assert not list(tmp_path.iterdir())


def test_exit_without_teardown_flushes_what_was_printed_and_keeps_the_code():
    """How a distributed run ends (see mlm.errors.exit_without_teardown): os._exit, yet no output is
    lost. Piped, stdout is block-buffered: without the flushes the partial line and the record still
    held by a buffered log handler would be lost. The code comes through, and atexit hooks do not
    run (no teardown)."""
    script = (
        "import atexit, logging, logging.handlers, sys\n"
        "from mlm.errors import exit_without_teardown\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "log = logging.getLogger('probe'); log.propagate = False\n"
        "log.addHandler(logging.handlers.MemoryHandler(100, "
        "target=logging.StreamHandler(sys.stderr)))\n"
        "print('a line without its newline', end='')\n"
        "log.warning('a record still in the buffer')\n"
        "exit_without_teardown(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # set on some machines
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 3
    assert run.stdout == "a line without its newline"
    assert run.stderr == "a record still in the buffer\n"


# ------------------------------------------------------------------------------- the same command
@pytest.mark.slow
def test_two_fresh_runs_that_train_their_tokenizer_end_with_the_same_bits(tmp_path):
    """No --tokenizer: each run trains its WordPiece vocabulary on the corpus, in a process of its
    own."""
    from conftest import stdlib_docstrings

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(stdlib_docstrings()))
    args = [
        "--data",
        corpus,
        *TINY,
        *"--vocab-size 700 --max-steps 5 --global-batch-size 4".split(),
    ]
    for done in (
        run_train(*args, "--out", tmp_path / "a"),
        run_train(*args, "--out", tmp_path / "b"),
    ):
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = (tmp_path / name for name in ("a", "b"))
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (
        b / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    assert_same_weights(final_weights(a), final_weights(b), atol=0)
