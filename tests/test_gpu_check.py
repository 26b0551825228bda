"""The prepared GPU check keeps working without a GPU: scripts/gpu_check.sh --dry-run checks every
script and flag it runs, its time plan and its outputs; on the CPU the script's own bookkeeping runs
for real (summary lines, the logs' tarball, the budget, the missing GPU); scripts/gpu_summary.py
reads hand-written step outputs; scripts/kernel_check.py runs at tiny sizes in Triton's interpreter.
A GPU loan runs the real thing now and then; these keep it from rotting in between (a renamed flag,
a moved script, a figure misread)."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

_spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_summary)


def gpu_check(root: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh"), *map(str, args)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def commands(stdout: str) -> list[list[str]]:
    """The commands a dry run prints, one per line after '+ ', as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def summary(out: Path) -> dict[str, list[str]]:
    """summary.tsv's lines by step: [status, seconds, figures], the last one of a step run twice."""
    lines = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    return {
        line[0]: line[1:] for line in lines if not line[0].startswith("#") and line[0] != "step"
    }


def linked_copy(tmp_path: Path) -> Path:
    """The repository as links, with a gpu_check.sh of its own to change."""
    for name in ("train.py", "bench.py", "benchmarks", "mlm", "tests", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "scripts").mkdir()
    for name in ("kernel_check.py", "ddp_check.py", "gpu_summary.py"):
        (tmp_path / "scripts" / name).symlink_to(ROOT / "scripts" / name)
    (tmp_path / "scripts" / "gpu_check.sh").write_text(SCRIPT.read_text())
    return tmp_path


# ------------------------------------------------------------------------------------- the dry run
@pytest.mark.slow
def test_dry_run_names_existing_scripts_and_flags(tmp_path):
    # No PYTHON: the commands run under python3, here this interpreter under that name.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n'
    )
    (tmp_path / "bin" / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    out = tmp_path / "out"
    run = gpu_check(ROOT, "--dry-run", "--out", out, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not out.exists()  # a dry run writes nothing
    cmds = commands(run.stdout)
    lines = [" ".join(c) for c in cmds]

    # Every step, in the order of the plan: the headline ones first.
    expected = [
        "env_facts",
        "python3 -m pytest -q -m cuda -n 0 -rfEs -p no:cacheprovider "
        "--continue-on-collection-errors",
        "python3 bench.py --device cuda --only train --seq 128 --dtypes bf16 --compile "
        f"--sizes base --json {out}/bench_bert.json",
        "python3 scripts/kernel_check.py --device cuda --rows 8192 --hidden 768 "
        f"--vocab 128100,30522 --dtypes bf16,fp16 --json {out}/kernel_check.json",
        f"--sizes deberta-v3-base --json {out}/bench_deberta.json",
        "TORCH_LOGS=recompiles",
        "python3 -m torch.distributed.run --standalone --nproc_per_node=1 scripts/ddp_check.py "
        "--backend nccl --device cuda --timeout-min 0.5",
        "--max-steps 60 --resume",
    ]
    found = [next(i for i, line in enumerate(lines) if part in line) for part in expected]
    assert found == sorted(found), lines
    assert not any(c[0] in ("git", "python") for c in cmds)  # no git step; the image has python3

    # The smoke: bert-base's shape and vocabulary, compiled, prefetching, no checkpoint before the
    # end, its run folder outside the outputs.
    train = [c for c in cmds if "train.py" in c]
    assert [c[c.index("--max-steps") + 1] for c in train] == ["40", "60"]
    for c in train:
        assert {"--compile", "--prefetch"} <= set(c) and c[c.index("--preset") + 1] == "bert-base"
        assert c[c.index("--save-every") + 1] == "0" and c[c.index("--device") + 1] == "cuda"
        assert not c[c.index("--out") + 1].startswith(str(out))
        assert "--tokenizer" in c or c[c.index("--vocab-size") + 1] == "30522"

    # The plan fits the default budget; the outputs fit the device tool, all directly in --out.
    plan = dict(
        line.split()[:2]
        for line in run.stdout.splitlines()
        if line.endswith(" s") and line.startswith("  ") and "ends by" in line
    )
    assert sum(map(int, plan.values())) <= 480
    assert list(plan)[:3] == ["env", "cuda_tests", "bench_bert"]
    outputs = next(line for line in run.stdout.splitlines() if line.startswith("outputs:"))
    files = outputs.split(": ", 2)[2].split()
    assert "summary.tsv" in files and "logs.tar.gz" in files and len(files) + 1 <= 8
    assert "modernbert" in run.stdout  # run where bench.py has that size, said skipped where not


@pytest.mark.slow
def test_dry_run_fails_on_a_flag_the_script_does_not_take(tmp_path):
    root = linked_copy(tmp_path)
    script = root / "scripts" / "gpu_check.sh"
    assert script.read_text().count("--max-steps 40") == 1
    script.write_text(script.read_text().replace("--max-steps 40", "--max-stepz 40"))
    run = gpu_check(root, "--dry-run", "--out", tmp_path / "out")
    assert run.returncode == 1
    assert "train.py does not take --max-stepz" in run.stdout


@pytest.mark.slow
def test_dry_run_fails_on_a_plan_over_the_budget(tmp_path):
    run = gpu_check(ROOT, "--dry-run", "--out", tmp_path / "out", "--budget", "100")
    assert run.returncode == 1
    assert "over the budget of 100 s" in run.stdout


# ------------------------------------------------------------------------------- a run on the CPU
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_a_run_without_a_gpu_fails_and_still_reports(tmp_path):
    out = tmp_path / "out"
    run = gpu_check(
        ROOT, "--out", out, "--only", "env,cuda_tests,bench_bert,train_resume", "--budget", "60"
    )
    assert run.returncode == 1, run.stdout + run.stderr
    steps = summary(out)
    assert steps["env"][0] == "ok" and "cuda available False" in steps["env"][2]
    # pytest would skip every cuda test and exit 0: the script fails the step itself.
    assert steps["cuda_tests"][0] == "failed" and "no CUDA" in steps["cuda_tests"][2]
    # 60 s leave bench_bert less than half its bound.
    assert steps["bench_bert"][0] == "skipped" and "s left" in steps["bench_bert"][2]
    assert steps["train_resume"][0] == "skipped" and steps["total"][0] == "failed"
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.tsv"]

    # A second call into the same folder appends its lines and keeps the first call's logs.
    again = gpu_check(ROOT, "--out", out, "--only", "train_resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "no checkpoint of train_smoke" in summary(out)["train_resume"][2]
    assert "cuda_tests" in summary(out) and summary(out)["total"][0] == "ok"
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/env.log" in tar.getnames()


def test_stage_copies_the_tokenizer_files(tmp_path, minilm_dir):
    root = linked_copy(tmp_path)
    run = gpu_check(root, "--stage")
    assert run.returncode == 0, run.stdout + run.stderr
    staged = root / "gpu_check_stage" / "tokenizer"
    assert sorted(p.name for p in staged.iterdir()) == sorted(
        ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    )
    assert len((staged / "vocab.txt").read_text().splitlines()) == 30522  # bert-base-uncased's
    # The device tool's carry takes ignored paths only.
    assert "gpu_check_stage/" in (ROOT / ".gitignore").read_text().splitlines()


# --------------------------------------------------------------------------- the figures: training
# About bert-base's training FLOPs per token at 128 tokens: mfu = tokens/s x this / peak.
FLOPS_PER_TOKEN = 7.0e8


def train_line(step: int, tokens_per_s: float, loss: float) -> dict:
    """A training line of metrics.jsonl as train.py's Meter.step writes it, peak known."""
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-4,
        "grad_norm": 1.5,
        "epoch": step / 100,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * FLOPS_PER_TOKEN / 989e12,
        "hfu": tokens_per_s * 0.93 * FLOPS_PER_TOKEN / 989e12,
    }


def eval_line(step: int, loss: float) -> dict:
    return {
        "step": step,
        "val_loss": loss,
        "val_ppl": 2.718**loss,
        "val_acc": 0.05,
        "val_tokens": 1200,
    }


# 40 steps logged every 10, then resumed from the step-40 checkpoint to 60: the baseline evaluation,
# a line per interval, the final evaluation; each process's first line holds its compilation.
RESUMED = [
    eval_line(0, 10.41),
    train_line(10, 5_200, 10.38),
    train_line(20, 600_000, 9.95),
    train_line(30, 640_000, 9.51),
    train_line(40, 620_000, 9.20),
    eval_line(40, 9.12),
    train_line(50, 8_100, 9.01),
    train_line(60, 660_000, 8.80),
    eval_line(60, 8.71),
]


def harmonic(*rates: float) -> float:
    return len(rates) / sum(1 / r for r in rates)


def test_throughput_is_over_the_intervals_after_each_process_first_line():
    # The first interval of each process (5,200 and 8,100 tokens/s: compilation) is left out. Read
    # as figures since the start, as they once were, these lines gave the resumed part a negative
    # rate.
    intervals = gpu_summary.clean_intervals(RESUMED)
    assert [(r["step"] - n, r["step"]) for n, r in intervals] == [
        (10, 20),
        (20, 30),
        (30, 40),
        (50, 60),
    ]
    assert gpu_summary.throughput(intervals) == pytest.approx(harmonic(600e3, 640e3, 620e3, 660e3))

    resumed = gpu_summary.clean_intervals(RESUMED, since=40)  # the resumed process alone
    assert [r["step"] for _, r in resumed] == [60]
    assert gpu_summary.throughput(resumed) == pytest.approx(660e3)


def test_a_short_last_interval_weighs_by_its_steps_and_an_evaluation_is_left_out():
    # --max-steps 35, --log-every 10, --eval-every 20: the evaluation after step 20 falls into the
    # interval 20-30, and the last interval is 5 steps.
    records = [
        eval_line(0, 10.4),
        train_line(10, 5_000, 10.3),
        train_line(20, 600_000, 9.9),
        eval_line(20, 9.8),
        train_line(30, 300_000, 9.6),
        train_line(35, 400_000, 9.5),
    ]
    intervals = gpu_summary.clean_intervals(records)
    assert [(n, r["step"]) for n, r in intervals] == [(10, 20), (5, 35)]
    # 15 steps over their seconds: 15 / (10 / 600k + 5 / 400k), not the mean of the two figures.
    assert gpu_summary.throughput(intervals) == pytest.approx(15 / (10 / 600e3 + 5 / 400e3))


def test_train_figures_quote_mfu_against_both_peaks():
    figures = gpu_summary.train_figures(RESUMED, tokens_per_step=256 * 128)
    rate = harmonic(600e3, 640e3, 620e3, 660e3)
    assert figures["tokens_per_s"] == f"{rate:,.0f} (over steps 10-20, 20-30, 30-40, 50-60)"
    mfu = rate * FLOPS_PER_TOKEN / 989e12
    assert (
        figures["mfu"]
        == f"{100 * mfu:.1f}% of 989 TFLOP/s, {100 * mfu * 989 / 790:.1f}% of 790 measured"
    )
    assert figures["hfu"].startswith(f"{100 * mfu * 0.93:.1f}% of 989")
    # The first line's interval is the run's start: 10 steps of 32,768 tokens at 5,200 tokens/s.
    assert figures["first_log"].startswith(f"step 10 after {10 * 32768 / 5200:.1f} s")
    assert figures["loss"] == "10.380 -> 8.800" and figures["val_loss"] == "8.710 at step 60"

    resumed = gpu_summary.train_figures(RESUMED, since=40, tokens_per_step=256 * 128)
    assert resumed["tokens_per_s"] == "660,000 (over steps 50-60)"
    assert resumed["first_log"].startswith(f"step 50 after {10 * 32768 / 8100:.1f} s")


def test_train_figures_without_a_clean_interval_say_so():
    figures = gpu_summary.train_figures([eval_line(0, 10.4), train_line(10, 5_000, 10.3)])
    assert figures["tokens_per_s"].startswith("n/a (1 training line(s) after step 0")
    assert "mfu" not in figures and figures["loss"] == "10.300 -> 10.300"


# As torch writes it under TORCH_LOGS=recompiles, each line behind the logger's prefix.
PREFIX = "V1204 19:10:22.796000 12400 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]"
RECOMPILE_LOG = "".join(
    f"{PREFIX} {line}\n"
    for line in (
        "Recompiling function forward in /repo/mlm/model.py:412",
        "    triggered by the following guard failure(s):",
        "    - 0/0: tensor 'input_ids' size mismatch at index 0. expected 256, actual 64",
    )
)


def test_recompiles_are_counted_from_torch_logs():
    assert gpu_summary.recompiles("no recompiles here\n") == "0"
    assert gpu_summary.recompiles(RECOMPILE_LOG) == (
        "1 (first: forward at /repo/mlm/model.py:412, 0/0: tensor 'input_ids' size mismatch at "
        "index 0. expected 256, actual 64)"
    )


# ------------------------------------------------------------------------ the figures: the others
def bench_row(
    metric: str, unit: str, ours: float, hf: float, higher_is_better: bool, **fields
) -> dict:
    """A row of bench.py --json's results (benchmarks/common.py's Row, with its gain)."""
    row = {
        "section": "train",
        "size": "base",
        "seq": 128,
        "dtype": "bf16",
        "metric": metric,
        "unit": unit,
        "ours": ours,
        "hf": hf,
        "higher_is_better": higher_is_better,
        "device": "cuda",
        "batch": 64,
        "variant": None,
        "extra": {},
        "target": None,
        "met": None,
        **fields,
    }
    row["gain"] = ours / hf if higher_is_better else hf / ours
    return row


BENCH = {
    "environment": {"device_name": "NVIDIA H200"},
    "parity_max_abs_logit_diff": {"base": 2.4e-05},
    "results": [
        bench_row(
            "throughput",
            "tokens/s",
            612_000.0,
            281_000.0,
            True,
            target=">= 2x HF tokens/s (H100)",
            met=True,
        ),
        bench_row(
            "MFU",
            "%",
            0.436,
            0.200,
            True,
            extra={"peak_tflops": 989.0},
            target=">= 45% MFU (H100)",
            met=False,
        ),
        bench_row("HFU", "%", 0.402, 0.200, True, extra={"peak_tflops": 989.0}),
        bench_row("peak memory", "GiB", 9.8, 14.1, False),
    ],
}


def test_bench_figures():
    figures = gpu_summary.bench_figures(BENCH, measured_tflops=790.0)
    assert figures["base seq 128 bf16"] == (
        "tokens_per_s ours 612,000 hf 281,000 (2.18x, >= 2x HF tokens/s (H100): met), "
        "MFU ours 43.6% hf 20.0% of 989 TFLOP/s, 54.6% / 25.0% of 790 measured, "
        ">= 45% MFU (H100): NOT MET, "
        "HFU ours 40.2% hf 20.0% of 989 TFLOP/s, 50.3% / 25.0% of 790 measured, "
        "peak_memory ours 9.8 GiB hf 14.1 GiB"
    )
    assert figures["parity"] == "base 2.4e-05"


def kernel_row(
    V: int, dtype: str, case: str, ok: bool = True, loss=(2e-3, 1.9e-3), grad=(4e-3, 3e-3)
):
    """A result of scripts/kernel_check.py --json."""
    scored = case == "rows"
    zero = {"ours": 0.0, "reference": 0.0}
    return {
        "V": V,
        "dtype": dtype,
        "mode": "inputs",
        "case": case,
        "N": 0 if case == "empty" else 8192,
        "D": 768,
        "ok": ok,
        "loss_fp32": 11.2 if scored else 0.0,
        "errors": {"loss": {"ours": loss[0], "reference": loss[1]} if scored else zero},
        "grad_error_ours": grad[0] if scored else 0.0,
        "grad_error_reference": grad[1] if scored else 0.0,
        "ms_ours": 9.1,
        "ms_reference": 14.2,
        "peak_mib_ours": 420.0,
        "peak_mib_reference": 12_500.0,
    }


def test_kernel_figures():
    rows = [
        kernel_row(128100, "bf16", "rows"),
        kernel_row(128100, "bf16", "empty"),
        kernel_row(30522, "fp16", "rows", ok=False, loss=(5e-3, 1e-3), grad=(9e-3, 2e-3)),
    ]
    figures = gpu_summary.kernel_figures({"env": {}, "results": rows})
    assert figures["cases_ok"] == "2/3"
    assert (
        figures["bf16 max error"]
        == "loss 2.0e-03 (reference 1.9e-03), grad 4.0e-03 (reference 3.0e-03)"
    )
    assert (
        figures["fp16 max error"]
        == "loss 5.0e-03 (reference 1.0e-03), grad 9.0e-03 (reference 2.0e-03)"
    )
    assert (
        figures["V=128100 bf16 inputs"] == "9.10 ms vs reference 14.20 ms, peak 420 MiB vs 12,500"
    )
    assert figures["failed"] == "V=30522 fp16 inputs rows"


def test_ddp_figures():
    result = {
        "ok": True,
        "backend": "nccl",
        "device": "cuda:0",
        "world": 1,
        "dtype": "fp32",
        "tolerance": 1e-4,
        "steps": [
            {"worst_error": 1.2e-6, "worst_of": "encoder.0.qkv.weight"},
            {"worst_error": 3.4e-6, "worst_of": "head.bias"},
        ],
    }
    assert gpu_summary.pairs(gpu_summary.ddp_figures(result)) == (
        "ok=True; worst_error=3.40e-06 (head.bias); tolerance=1e-04; "
        "run=1 rank(s), nccl on cuda:0; dtype=fp32"
    )


@pytest.mark.parametrize(
    "log, ok, expected",
    [
        ("........ [100%]\n8 passed, 474 deselected in 41.20s\n", True, "passed=8; failed=0"),
        # A CPU-only torch: every cuda test skipped, pytest's exit 0. No proof of anything.
        ("ssssssss [100%]\n8 skipped, 474 deselected in 4.65s\n", False, "skipped=8"),
        ("\n482 deselected in 3.10s\n", False, "no test passed"),
        (
            "FAILED tests/test_masking.py::test_rows - AssertionError\n"
            "1 failed, 7 passed in 12.0s\n",
            True,
            "failed_tests=tests/test_masking.py::test_rows",
        ),
        # --continue-on-collection-errors: the module that failed to import is named, the rest ran.
        (
            "ERROR tests/test_spm.py - ModuleNotFoundError: No module named 'sentencepiece'\n"
            "7 passed, 474 deselected, 1 error in 9.12s\n",
            True,
            "error=1; errors_in=tests/test_spm.py (ModuleNotFoundError: No module named "
            "'sentencepiece')",
        ),
        ("collecting ... \n", False, "no closing line"),
    ],
)
def test_pytest_figures(log, ok, expected):
    figures, passed = gpu_summary.pytest_figures(log)
    assert passed is ok and expected in gpu_summary.pairs(figures)


def test_env_figures():
    log = (
        "cores: 16\ndriver: NVIDIA H200, 570.124.06, 143771 MiB\npython: 3.12.3\n"
        "torch: 2.11.0+cu130 | CUDA 13.0 | cuda available True\n"
        "gpu: NVIDIA H200, 140 GiB, sm_90, 1 GPU(s)\n"
        "triton: 3.6.0\ntransformers: 5.17.0\ncode: 9b3d17403b7d\ngit: no .git: copied tree\n"
    )
    figures = gpu_summary.env_figures(log)
    assert figures["gpu"] == "NVIDIA H200, 140 GiB, sm_90, 1 GPU(s)" and figures["cores"] == "16"
    assert figures["git"] == "no .git: copied tree" and figures["code"] == "9b3d17403b7d"


def summarize(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prints_one_line_and_fails_where_the_exit_status_hid_it(tmp_path):
    metrics, log = tmp_path / "metrics.jsonl", tmp_path / "train.log"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in RESUMED))
    log.write_text("bert model, 109.5M parameters, 2801 train blocks of 128\n" + RECOMPILE_LOG)
    run = summarize(
        "train", log, "--metrics", metrics, "--tokens-per-step", 32768, "--tokenizer", "staged"
    )
    assert run.returncode == 0 and run.stdout.count("\n") == 1 and "\t" not in run.stdout
    rate = harmonic(600e3, 640e3, 620e3, 660e3)
    assert run.stdout.startswith(
        f"tokens_per_s={rate:,.0f} (over steps 10-20, 20-30, 30-40, 50-60)"
    )
    assert "recompiles=1 (first: forward" in run.stdout
    assert "params=109.5M; tokenizer=staged" in run.stdout

    (tmp_path / "pytest.log").write_text("8 skipped, 474 deselected in 4.65s\n")
    assert summarize("pytest", tmp_path / "pytest.log").returncode == 1

    # Missing or broken files: still one line, saying so, and no verdict of its own.
    missing = summarize("bench", log, "--json", tmp_path / "none.json", "--rc", 1)
    assert (
        missing.returncode == 0 and "json=none" in missing.stdout and "last_line=" in missing.stdout
    )
    (tmp_path / "broken.json").write_text("{")
    broken = summarize("kernel", log, "--json", tmp_path / "broken.json")
    assert broken.returncode == 0 and broken.stdout.startswith(
        "figures unreadable (JSONDecodeError"
    )


# ------------------------------------------------------------------------------ kernel_check.py
def kernel_check(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "kernel.json"
    cmd = [
        sys.executable,
        *"scripts/kernel_check.py --device cpu --rows 8 --hidden 8 --reps 1 --warmup 0 "
        "--json".split(),
        str(out),
        *args,
    ]
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
    assert cases == {
        (d, m, c)
        for d in ("bf16", "fp16")
        for m in ("inputs", "autocast")
        for c in ("rows", "all-ignored", "empty")
    }
    assert all(r["ok"] for r in rows)
    for r in rows:
        if r["case"] == "rows":
            assert r["N"] == 8 and 0 < r["grad_error_ours"] < 0.05 and r["loss_fp32"] > 1
        else:
            assert (
                r["loss_fp32"] == 0
                and r["errors"]["loss"]["ours"] == 0
                and r["grad_error_ours"] == 0
            )
        assert r["ms_ours"] > 0 and r["peak_mib_ours"] is None  # no peak memory off CUDA
    assert "12 of 12 cases within bounds" in run.stdout
    # What the summary makes of it: the same JSON through gpu_summary.py.
    assert gpu_summary.kernel_figures(result)["cases_ok"] == "12/12"


@pytest.mark.slow
def test_kernel_check_fails_outside_the_bound(tmp_path):
    # --factor 0 leaves only the 1e-3 floor, which bf16 gradients exceed: the scored case fails, the
    # empty ones (exact zeros) still pass, and the exit status says so.
    run, result = kernel_check(
        tmp_path, "--vocab", "97", "--dtypes", "bf16", "--modes", "inputs", "--factor", "0"
    )
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-4000:]
    assert {r["case"]: r["ok"] for r in result["results"]} == {
        "rows": False,
        "all-ignored": True,
        "empty": True,
    }
    assert "FAILED: V=97 bf16 inputs rows" in run.stdout
