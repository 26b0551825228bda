"""bench.py runs every section end to end on the tiniest config and writes the JSON it promises.

Speed is not asserted: timings depend on the machine and its load. What is checked is that each
section measured both sides, that the numbers are positive and finite, that the same weights give
the same logits, and that the targets table judges rows as it says."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bench.py imports the benchmarks/ package beside it, as `python bench.py` finds it
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_every_section_writes_positive_results(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "bench.py"),
        *"--device cpu --sizes tiny --seq 32 --batch 2 --dtypes fp32,bf16 --steps 1 --warmup 0 "
        "--breakdown --calls 1 --calls-warmup 0 --collator-blocks 4 --collator-reps 1 "
        "--collator-burst 2 --tokenize-reps 1 --corpus-docs 40 --json".split(),
        str(out),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "met?" in done.stdout  # the table was printed

    report = json.loads(out.read_text())
    env = report["environment"]
    for key in ("device_name", "cpu", "torch", "transformers", "date", "command"):
        assert env[key], key
    assert env["device"] == "cpu"
    # Both models came from one folder: their logits agree to float rounding.
    assert report["parity_max_abs_logit_diff"]["tiny"] < 1e-4

    rows = report["results"]
    seen = {(r["section"], r["dtype"], r["metric"]) for r in rows}
    metrics = ("throughput", "forward", "backward", "optimizer") + (
        ("peak memory",) if sys.platform == "linux" else ()
    )
    expected = {("train", d, m) for d in ("fp32", "bf16") for m in metrics}
    expected |= {
        ("infer", "fp32", "throughput"),
        ("infer", "bf16", "throughput"),
        ("fillmask", "fp32", "latency"),
        ("collator", None, "throughput"),
        ("tokenize", None, "time"),
        ("kernels", "fp32", "time"),
    }
    assert expected <= seen, expected - seen
    for r in rows:
        for key in ("ours", "hf", "gain"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["section"], r["metric"], key, r[key])
    assert {r["variant"] for r in rows if r["section"] == "collator"} == {"row seeds", "generator"}
    fill = next(r for r in rows if r["section"] == "fillmask")
    assert fill["extra"]["same_top_tokens"] is True  # same weights, same tokenizer: same answers
    train = next(r for r in rows if r["section"] == "train" and r["metric"] == "throughput")
    assert (
        len(train["extra"]["step_seconds"]["ours"])
        == len(train["extra"]["step_seconds"]["hf"])
        == 1
    )
    tokenize = next(r for r in rows if r["section"] == "tokenize")
    assert tokenize["extra"]["docs"] == 40 and tokenize["extra"]["tokens"] > 40


def test_targets_judge_the_right_rows():
    bench = load_bench()
    row = bench.Row(
        section="train",
        size="base",
        seq=128,
        dtype="bf16",
        metric="throughput",
        unit="tokens/s",
        ours=130.0,
        hf=100.0,
        higher_is_better=True,
        device="cpu",
    )
    slow = bench.Row(
        section="fillmask",
        size="base",
        seq=23,
        dtype="fp32",
        metric="latency",
        unit="ms",
        ours=30.0,
        hf=40.0,
        higher_is_better=False,
        device="cpu",
    )
    untargeted = bench.Row(
        section="train",
        size="tiny",
        seq=128,
        dtype="fp32",
        metric="throughput",
        unit="tokens/s",
        ours=1.0,
        hf=2.0,
        higher_is_better=True,
        device="cpu",
    )
    bench.judge([row, slow, untargeted])
    assert row.met is True and math.isclose(row.gain, 1.3)  # 1.3x >= 1.25x
    # needs latency <= 0.5x, i.e. gain >= 2
    assert slow.met is False and math.isclose(slow.gain, 40 / 30)
    assert untargeted.met is None and untargeted.target is None
    mfu = bench.Row(
        section="train",
        size="base",
        seq=128,
        dtype="bf16",
        metric="MFU",
        unit="%",
        ours=0.5,
        hf=0.2,
        higher_is_better=True,
        device="cuda",
    )
    bench.judge([mfu])
    assert mfu.met is True
    # The collator target is like for like: HF's collator against ours with a generator, not with
    # row seeds.
    collators = [
        bench.Row(
            section="collator",
            size=None,
            seq=128,
            dtype=None,
            metric="throughput",
            unit="blocks/s",
            ours=41.0,
            hf=1.0,
            higher_is_better=True,
            variant=v,
        )
        for v in ("generator", "row seeds")
    ]
    bench.judge(collators)
    assert collators[0].met is True and collators[1].target is None


def test_every_target_names_a_section_size_and_dtype_that_exist():
    # A misspelt key would make a target match no row, and so silently never be judged.
    bench = load_bench()
    for target in bench.TARGETS:
        assert target.section in bench.SECTIONS, target
        assert target.size in (None, *bench.SIZES), target
        assert target.dtype in (None, "fp32", "bf16", "fp16"), target
        assert target.device in (None, "cpu", "cuda"), target


def test_repetition_defaults_are_the_ones_help_promises():
    bench = load_bench()
    from benchmarks.common import batch_for, steps_for, warmup_for
    from mlm.model import ModelConfig

    tiny = ModelConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512)
    small = ModelConfig(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048)
    base = ModelConfig()
    cpu = bench.parse_args(["--device", "cpu"])
    assert (batch_for(cpu, 128), batch_for(cpu, 512)) == (8, 2)  # 1024 tokens' worth
    # under 10M params: 10
    assert (steps_for(cpu, tiny), steps_for(cpu, small), steps_for(cpu, base)) == (10, 5, 5)
    assert warmup_for(cpu) == 1
    # compiling takes more
    assert warmup_for(bench.parse_args(["--device", "cpu", "--compile"])) == 1 + 3
    given = bench.parse_args(["--device", "cpu", "--batch", "3", "--steps", "7", "--warmup", "0"])
    assert (batch_for(given, 128), steps_for(given, tiny), warmup_for(given)) == (3, 7, 0)
    assert cpu.sizes == ["tiny", "base"] and cpu.only == list(bench.SECTIONS)
    # A model folder replaces the random sizes, and the sections default to those that load a model.
    folder = bench.parse_args(["--device", "cpu", "--model", "some/folder"])
    assert folder.sizes == [] and folder.only == ["train", "infer", "fillmask"]


def test_model_folders_bench_end_to_end(hf_checkpoints, tmp_path):
    """`bench.py --model DIR` on each family's tiny folder: every row measured on both sides, same
    weights, same fill-mask answers on the folder's own tokenizer, MFU and HFU from a given peak."""
    out = tmp_path / "models.json"
    command = [
        sys.executable,
        str(ROOT / "bench.py"),
        *"--device cpu --seq 32 --batch 2 --dtypes fp32 --steps 1 --warmup 0 --calls 1 "
        "--calls-warmup 0 --peak-tflops 1 --json".split(),
        str(out),
    ]
    for folder in hf_checkpoints.values():
        command += ["--model", str(folder)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(out.read_text())
    names = [Path(folder).name for folder in hf_checkpoints.values()]
    assert sorted(report["environment"]["models"]) == sorted(names)
    metrics = ("throughput", "MFU", "HFU") + (("peak memory",) if sys.platform == "linux" else ())
    for name in names:
        assert report["parity_max_abs_logit_diff"][name] < 1e-4, name
        rows = {(r["section"], r["metric"]): r for r in report["results"] if r["size"] == name}
        expected = {("train", m) for m in metrics}
        expected |= {("infer", "throughput"), ("infer", "MFU"), ("fillmask", "latency")}
        assert expected <= set(rows), (name, expected - set(rows))
        for r in rows.values():
            for key in ("ours", "hf", "gain"):
                assert math.isfinite(r[key]) and r[key] > 0, (name, r["metric"], key, r[key])
            assert r["extra"]["hf_attention"], name
        assert rows[("fillmask", "latency")]["extra"]["same_top_tokens"] is True, name
        mfu, hfu = rows[("train", "MFU")], rows[("train", "HFU")]
        # Our head ran on the masked rows only, HF's on all: HFU counts less work for us than for
        # HF.
        fraction = hfu["extra"]["head_rows_fraction"]
        assert 0 < fraction["ours"] < 0.5 and fraction["hf"] == 1.0
        assert hfu["ours"] / hfu["hf"] < mfu["ours"] / mfu["hf"]
        # transformers' HFU is its MFU but where its work differs from the model's: DeBERTa scores
        # its whole position table (here shorter than the sequence), ModernBERT's local layers
        # every key rather than the window's
        family = report["environment"]["models"][name]["family"]
        if family == "modernbert":
            assert hfu["hf"] > mfu["hf"]
        elif family != "deberta-v2":
            assert math.isclose(hfu["hf"], mfu["hf"])
        # on the CPU, the share of its measured GEMM rate each side's hardware FLOPs reach
        roofline = rows[("train", "GEMM roofline")]
        assert 0 < roofline["ours"] < 1.5 and roofline["extra"]["measured_gemm_tflops"] > 0


def test_seq_beyond_the_models_limit_is_a_one_line_error(hf_checkpoints, tmp_path):
    command = [
        sys.executable,
        str(ROOT / "bench.py"),
        *"--device cpu --seq 32,1000 --model".split(),
        str(hf_checkpoints["bert"]),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert (
        done.stderr.count("\n") == 1
        and "--seq 1000" in done.stderr
        and "limit of 64" in done.stderr
    )


def test_deberta_shape_is_offered_only_when_mlm_loads_deberta():
    bench = load_bench()
    from mlm.model import FAMILIES

    if "deberta-v2" in FAMILIES:
        assert bench.parse_args(["--device", "cpu", "--sizes", "deberta-v3-base"]).sizes == [
            "deberta-v3-base"
        ]
    else:
        with pytest.raises(SystemExit) as exit:
            bench.parse_args(["--device", "cpu", "--sizes", "deberta-v3-base"])
        assert exit.value.code == 2


def test_synchronizer_waits_for_the_benched_gpu_not_the_current_one(monkeypatch):
    import torch

    from benchmarks.common import synchronizer

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    synchronizer(torch.device("cuda", 1))()
    synchronizer(torch.device("cpu"))()
    assert waited == [torch.device("cuda", 1)]


def test_a_compiled_training_step_scores_max_predictions_rows_of_static_masks():
    """As train.py does under --compile: a fixed number of rows per sequence (one graph, no host
    sync for the number of masked rows), from masks with exactly that many targets per row."""
    import argparse

    import torch

    from benchmarks import vs_hf

    calls = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, labels, max_predictions=None):
            calls.append(max_predictions)
            return self.w * 1.0

    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.zeros(2, 40, dtype=torch.long), torch.zeros(2, 40, dtype=torch.long))]
    for compiled, expected in ((True, 6), (False, None)):
        args = argparse.Namespace(compile=compiled, breakdown=False)
        step = vs_hf.train_step(
            args, torch.device("cpu"), "fp32", model, optimizer, batches, is_hf=False
        )
        step(0)
        assert calls[-1] == expected  # round(0.15 x 40)
    ckpt = argparse.Namespace(
        token_ids=torch.arange(5, 300), mask_id=4, vocab_size=300, special_ids=[0, 1, 2, 3, 4]
    )
    ((ids, labels),) = vs_hf.random_batches(ckpt, 1, 3, 40, torch.device("cpu"), static=True)
    assert (labels != -100).sum(dim=1).tolist() == [6, 6, 6]
