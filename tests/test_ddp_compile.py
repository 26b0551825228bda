"""DDP(torch.compile(model)) with no_sync accumulation gives eager's gradients: 2 Gloo ranks on the
CPU.

The check itself is scripts/ddp_check.py, which scripts/gpu_check.sh also runs with NCCL on a GPU:
one piece of code for both. Here it runs under torchrun as train.py does, 2 ranks x 2 micro-batches
of rows with different numbers of masked tokens, Inductor, gradient_as_bucket_view=True, and two
steps so that the second runs on the buckets DDP rebuilds after the first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # with the other torchrun tests, one at a time (test_train.py)
def test_ddp_compiled_no_sync_gradients_match_eager(tmp_path):
    out = tmp_path / "ddp.json"
    # --standalone: torchrun picks a free port itself. One thread and one compile worker per rank:
    # two ranks share this 2-core machine with whatever else runs.
    cmd = [
        sys.executable,
        *"-m torch.distributed.run --standalone --nproc_per_node=2".split(),
        str(ROOT / "scripts" / "ddp_check.py"),
        *"--backend gloo --steps 2 --json".split(),
        str(out),
    ]
    # the plain-PyTorch loss on the CPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    result = json.loads(out.read_text())
    assert result["ok"] and result["world"] == 2 and result["micro_batches"] == 2
    assert result["compile_backend"] == "inductor"
    # fp32 on both sides: what differs is only the order of float sums (Inductor's fusions, DDP's
    # all-reduce), measured ~1e-6 of the largest gradient; 1e-4 leaves room and still catches a
    # wrong weighting of the micro-batches (~0.3) or a rank's gradients counted twice or not at all.
    assert result["tolerance"] == 1e-4
    assert [step["worst_error"] <= 1e-4 for step in result["steps"]] == [True, True]
    # the second step ran on rebuilt buckets
    assert len(result["steps"][1]["bucket_sizes"].split(",")) >= 2
