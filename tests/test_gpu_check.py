"""The prepared GPU check runs on the CPU too: scripts/gpu_check.sh --dry-run, and scripts/kernel_check.py
at tiny sizes in Triton's interpreter. A person with a GPU runs the real thing once; these keep it from
rotting in between (a renamed flag, a moved script)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(root: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


def commands(stdout: str) -> list[list[str]]:
    """The commands a dry run prints, one per line after '+ ', as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def script_and_flags(argv: list[str]) -> tuple[str | None, list[str]]:
    """The first *.py argument, and the --flags after it (the script's own; torchrun's come before it)."""
    scripts = [i for i, a in enumerate(argv) if a.endswith(".py")]
    if not scripts:
        return None, []
    return argv[scripts[0]], [a.split("=")[0] for a in argv[scripts[0] + 1:] if a.startswith("--")]


@pytest.mark.slow
def test_dry_run_names_existing_scripts_and_flags(tmp_path):
    run = dry_run(ROOT, tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    cmds = commands(run.stdout)
    lines = [" ".join(c) for c in cmds]

    # Every step the GPU check promises is there.
    expected = ["nvidia-smi", "torch.utils.collect_env", "pytest -q -m cuda", "scripts/kernel_check.py --device cuda",
                "TORCH_LOGS=recompiles", "train.py --preset bert-base --compile --dtype bf16",
                "scripts/ddp_check.py --backend nccl --device cuda",
                "bench.py --device cuda --sizes base --seq 128,512 --dtypes bf16 --compile --json"]
    for part in expected:
        assert any(part in line for line in lines), part
    train = [c for c in cmds if "train.py" in c]
    assert [c[c.index("--max-steps") + 1] for c in train] == ["40", "60"] and "--resume" in train[1]
    assert "--vocab" in lines[[i for i, l in enumerate(lines) if "kernel_check" in l][0]]

    # Each script exists; that each takes the flags given to it is the dry run's own check (each script's --help),
    # which the next test shows failing on a flag a script does not take.
    for argv in cmds:
        script, _ = script_and_flags(argv)
        assert script is None or (ROOT / script).is_file(), script


@pytest.mark.slow
def test_dry_run_fails_on_a_flag_the_script_does_not_take(tmp_path):
    # A copy of the repository (links) whose gpu_check.sh passes train.py a flag it does not have.
    for name in ("train.py", "bench.py", "benchmarks", "mlm", "tests", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "scripts").mkdir()
    for name in ("kernel_check.py", "ddp_check.py"):
        (tmp_path / "scripts" / name).symlink_to(ROOT / "scripts" / name)
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert script.count("--max-steps 40") == 1
    (tmp_path / "scripts" / "gpu_check.sh").write_text(script.replace("--max-steps 40", "--max-stepz 40"))
    run = dry_run(tmp_path, tmp_path / "out")
    assert run.returncode == 1
    assert "train.py does not take --max-stepz" in run.stdout


def kernel_check(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "kernel.json"
    cmd = [sys.executable, "scripts/kernel_check.py", "--device", "cpu", "--rows", "8", "--hidden", "8",
           "--reps", "1", "--warmup", "0", "--json", str(out), *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return run, json.loads(out.read_text()) if out.is_file() else {}


@pytest.mark.slow
def test_kernel_check_runs_in_the_interpreter(tmp_path):
    # V=130 pads to 192 columns: a whole tile of 128 and a ragged one.
    run, result = kernel_check(tmp_path, "--vocab", "130", "--dtypes", "bf16,fp16")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert result["env"]["interpreter"] and result["env"]["factor"] == 3.0
    rows = result["results"]
    cases = {(r["dtype"], r["mode"], r["case"]) for r in rows}
    assert cases == {(d, m, c) for d in ("bf16", "fp16") for m in ("inputs", "autocast")
                     for c in ("rows", "all-ignored", "empty")}
    assert all(r["ok"] for r in rows)
    for r in rows:
        if r["case"] == "rows":
            assert r["N"] == 8 and 0 < r["grad_error_ours"] < 0.05 and r["loss_fp32"] > 1
        else:
            assert r["loss_fp32"] == 0 and r["errors"]["loss"]["ours"] == 0 and r["grad_error_ours"] == 0
        assert r["ms_ours"] > 0 and r["peak_mib_ours"] is None  # no peak memory off CUDA
    assert "12 of 12 cases within bounds" in run.stdout


@pytest.mark.slow
def test_kernel_check_fails_outside_the_bound(tmp_path):
    # --factor 0 leaves only the 1e-3 floor, which bf16 gradients exceed: the scored case fails, the empty
    # ones (exact zeros) still pass, and the exit status says so.
    run, result = kernel_check(tmp_path, "--vocab", "97", "--dtypes", "bf16", "--modes", "inputs", "--factor", "0")
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-4000:]
    assert {r["case"]: r["ok"] for r in result["results"]} == {"rows": False, "all-ignored": True, "empty": True}
    assert "FAILED: V=97 bf16 inputs rows" in run.stdout
