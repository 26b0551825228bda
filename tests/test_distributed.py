"""GPU and multi-node readiness, checked on the CPU: device choice under torchrun, node-local data
preparation, the background input pipeline, and a training step that never waits for the device."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RUN_ENV, stdlib_docstrings
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

import mlm.distributed
from mlm.config import TrainConfig
from mlm.distributed import Dist, pick_device, setup_distributed
from mlm.errors import ConfigError


# ------------------------------------------------------------------------------------------ devices
def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(
        ConfigError,
        match="--device cuda:0 under torchrun would put every rank on one GPU; pass --device cuda",
    ):
        pick_device("cuda:0", world=2, local_rank=1)


def test_more_local_ranks_than_gpus_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda device: pytest.fail("set_device before the check")
    )
    with pytest.raises(
        ConfigError, match=r"needs GPU 1 \(LOCAL_RANK 1\) but the machine has 1; start at most"
    ):
        setup_distributed("")


def test_cuda_without_an_index_is_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cuda", world=4, local_rank=3) == torch.device("cuda", 3)
    assert pick_device("", world=4, local_rank=2) == torch.device("cuda", 2)
    assert pick_device("cpu", world=4, local_rank=2) == torch.device("cpu")


@pytest.mark.cuda
def test_each_process_sets_its_own_gpu():
    job = setup_distributed("cuda")
    assert job.device == torch.device("cuda", 0) and torch.cuda.current_device() == 0


# ------------------------------------------------------------------------------- the input pipeline
@pytest.mark.slow
def test_prefetching_changes_no_bit(dataset, tmp_path):
    """The background thread builds the same batches: masks are seeded by position, not by call
    order."""
    common = [
        "--data",
        dataset,
        *TINY,
        *"--max-steps 6 --global-batch-size 8 --micro-batch-size 4".split(),
    ]
    for done in (
        run_train(*common, "--no-prefetch", "--out", tmp_path / "inline"),
        run_train(*common, "--prefetch", "--out", tmp_path / "thread"),
    ):
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(
        final_weights(tmp_path / "thread"), final_weights(tmp_path / "inline"), atol=0
    )


class SyncCounter:
    """Counts the ways a tensor's value is read on the host: on a GPU each is a wait for the
    device."""

    READS = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.active, self.count = False, 0
        for name in self.READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            self.count += self.active
            return original(tensor, *args, **kwargs)

        return read

    def around(self, fn):
        def counted(*args, **kwargs):
            self.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = False

        return counted


def test_the_training_step_reads_the_device_once_per_step(dataset, tmp_path, monkeypatch):
    """train_step leaves loss and norm on the device; apply_update reads once whether the step was
    finite (to skip it through the optimizer's public step), and only the report every --log-every
    steps reads the loss and norm back."""
    sys.path.insert(0, str(ROOT))
    import train

    counter = SyncCounter(monkeypatch)
    per_function = {}

    def counting(name: str, fn):
        def counted(*args):
            before = counter.count
            result = counter.around(fn)(*args)
            per_function.setdefault(name, []).append(counter.count - before)
            return result

        return counted

    for name in ("train_step", "apply_update"):
        monkeypatch.setattr(train, name, counting(name, getattr(train, name)))
    reads_per_report = []
    real_step = train.Meter.step

    def meter_step(self, done, *args):
        before = counter.count
        counter.active = True
        try:
            real_step(self, done, *args)
        finally:
            counter.active = False
        reads_per_report.append((done, counter.count - before))

    monkeypatch.setattr(train.Meter, "step", meter_step)
    cfg = train.parse_config(
        [
            *("--preset", "tiny"),
            "--data",
            str(dataset),
            *TINY,
            *"--max-steps 9 --log-every 4 --global-batch-size 4 --out".split(),
            str(tmp_path / "run"),
            "--no-prefetch",
        ]
    )
    train.train(cfg, Dist())
    assert per_function == {"train_step": [0] * 9, "apply_update": [1] * 9}
    assert [done for done, n in reads_per_report if n] == [4, 8, 9]  # the reports, and only they
    assert [m["step"] for m in metrics(tmp_path / "run") if "loss" in m] == [4, 8, 9]


def test_a_finished_run_stops_its_prefetch_thread(dataset, tmp_path):
    """The background thread that builds the next step's batch ends with the run, not with the
    process."""
    sys.path.insert(0, str(ROOT))
    import threading

    import train

    cfg = train.parse_config(
        [
            *("--preset", "tiny"),
            "--data",
            str(dataset),
            *TINY,
            *"--max-steps 3 --global-batch-size 4 --out".split(),
            str(tmp_path / "run"),
            "--prefetch",
        ]
    )
    started = []
    real_start = threading.Thread.start

    def start(thread):
        started.append(thread)
        real_start(thread)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(threading.Thread, "start", start)
        train.train(cfg, Dist())
    prefetchers = [t for t in started if t.name == "mlm-prefetch"]
    assert prefetchers and not any(t.is_alive() for t in prefetchers)


# ----------------------------------------------------------------------------------------- nodes
@pytest.mark.slow
@torchrun
def test_nodes_with_their_own_disks_each_prepare_the_same_data(dataset, tmp_path):
    """Two torchrun nodes whose --out folders differ (as two machines' local disks would): each
    node's first rank tokenizes the corpus into its own folder, the bytes agree, and the ranks check
    they read one dataset."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(stdlib_docstrings()))
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            *"-m torch.distributed.run --nnodes=2".split(),
            f"--node_rank={node}",
            *"--nproc_per_node=1 --master_addr=127.0.0.1".split(),
            f"--master_port={port}",
            str(ROOT / "train.py"),
            *("--preset", "tiny"),
            "--data",
            str(corpus),
            "--tokenizer",
            str(dataset),
            *map(str, TINY),
            *"--max-steps 3 --global-batch-size 4 --out".split(),
            str(tmp_path / f"node{node}"),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=RUN_ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    for name in ("train.tokens", "train.docs", "val.tokens", "meta.json"):
        a, b = (tmp_path / f"node{n}" / "data" / name for n in (0, 1))
        if name == "meta.json":  # the same but for how long each took
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            ja.pop("seconds"), jb.pop("seconds")
            assert ja == jb
        else:
            assert a.read_bytes() == b.read_bytes(), name
    assert (tmp_path / "node0" / "final").is_dir() and not (tmp_path / "node1" / "final").exists()


def test_ranks_that_read_different_data_stop(dataset, monkeypatch):
    """The last check of prepare_data: a fingerprint that differs between ranks is an error naming
    the fix."""
    from mlm import pipeline
    from mlm.errors import DataError

    assert mlm.distributed.same_on_every_rank(Dist(), "x")  # one process always agrees with itself
    monkeypatch.setattr(pipeline, "same_on_every_rank", lambda job, value: False)
    plan = pipeline.DataPlan.of(TrainConfig(data=[str(dataset)]), Path("unused"))
    with pytest.raises(
        DataError,
        match="the ranks read different datasets from .*; prepare it once with prepare.py",
    ):
        pipeline.prepare_data(plan, Dist())


@pytest.mark.slow
@torchrun
def test_bf16_gradient_all_reduce_trains_close_to_fp32(dataset, tmp_path):
    """--ddp-bf16-grads halves the all-reduce traffic; the update moves by bf16 rounding of the
    summed gradients only (Gloo, 2 ranks)."""
    common = ["--data", dataset, *TINY, *"--max-steps 3 --global-batch-size 8 --dropout 0".split()]
    for done in (
        run_train(*common, "--out", tmp_path / "fp32", nproc=2),
        run_train(*common, "--ddp-bf16-grads", "--out", tmp_path / "bf16", nproc=2),
    ):
        assert done.returncode == 0, done.stderr[-3000:]
    fp32, bf16 = final_weights(tmp_path / "fp32"), final_weights(tmp_path / "bf16")
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)  # the hook was used
    assert_same_weights(bf16, fp32, atol=3e-3)
