"""train.py end to end: layouts that must agree, exact resume after SIGKILL, real weights, bad
input."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RUN_ENV, from_scratch, stdlib_docstrings
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, pipeline

import mlm
from mlm.fillmask import fill_mask

ROOT = Path(__file__).resolve().parents[1]
# A model small enough that a run takes seconds on a 2-core CPU; on the CPU even where a GPU is
# present, since the comparisons below are bit for bit.
TINY = [
    *"--device cpu --hidden-size 32 --num-layers 2 --num-heads 2 --intermediate-size 64 "
    "--block-size 32 --eval-blocks 16 --log-every 1 --lr 3e-3 --warmup 2".split()
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(*args, nproc: int = 1) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            *"-m torch.distributed.run --nnodes=1".split(),
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    return launcher + [str(ROOT / "train.py"), *from_scratch(args)]


def run_train(*args, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py (under torchrun with nproc > 1), one thread a process (RUN_ENV); its output kept."""
    cmd = train_cmd(*args, nproc=nproc)
    return subprocess.run(
        cmd, cwd=ROOT, env=RUN_ENV, capture_output=True, text=True, timeout=timeout
    )


# Tests that start torchrun share this xdist group: they run one at a time (pytest -n ... --dist
# loadgroup), so that two rank pairs never compete for the cores or for a free port.
torchrun = pytest.mark.xdist_group("torchrun")


def final_weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@torchrun
def test_layouts_give_the_same_parameters(dataset, tmp_path):
    """1 process x 8, 1 process x 2 micro-batches of 4, 2 Gloo ranks x 4: the same update every
    step."""
    common = ["--data", dataset, *TINY, *"--max-steps 6 --global-batch-size 8 --dropout 0".split()]
    runs = dict(
        zip(
            ("single", "accumulate", "ddp"),
            [
                run_train(*common, "--out", tmp_path / "single"),
                run_train(*common, "--micro-batch-size", "4", "--out", tmp_path / "accumulate"),
                run_train(*common, "--micro-batch-size", "4", "--out", tmp_path / "ddp", nproc=2),
            ],
        )
    )
    for name, result in runs.items():
        assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
    single = final_weights(tmp_path / "single")
    assert_same_weights(final_weights(tmp_path / "accumulate"), single)
    assert_same_weights(final_weights(tmp_path / "ddp"), single)
    # The runs trained (loss moved) and evaluated on identical fixed masks.
    vals = [[m for m in metrics(tmp_path / n) if "val_loss" in m] for n in runs]
    assert vals[0][0]["val_tokens"] == vals[1][0]["val_tokens"] == vals[2][0]["val_tokens"] > 0
    for v in vals[1:]:
        assert abs(v[-1]["val_loss"] - vals[0][-1]["val_loss"]) < 1e-4
    assert vals[0][-1]["val_loss"] < vals[0][0]["val_loss"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    common = [
        "--data",
        dataset,
        *TINY,
        "--max-steps",
        "60",
        "--global-batch-size",
        "8",
        "--save-every",
        "5",
        # default dropout: resume must replay its randomness
        "--keep-last",
        "3",
        "--eval-every",
        "20",
    ]
    reference = run_train(*common, "--out", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(*common, "--out", out),
        cwd=ROOT,
        env=RUN_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "checkpoints").glob("step_*.pt"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    assert saved and not (out / "final").exists(), "the run finished before it was killed"

    # Damage the newest checkpoint as a crash mid-write on another filesystem could: resume must
    # skip it.
    newest = saved[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    resumed = run_train(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping damaged checkpoint" in resumed.stderr
    assert_same_weights(final_weights(out), final_weights(tmp_path / "reference"), atol=0)
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == sorted(steps) and steps[-1] == 60  # no duplicated steps after the resume


@pytest.mark.slow
def test_continue_pretraining_all_minilm_l6_v2(minilm_dir, tmp_path):
    """Real weights: validation perplexity falls; the export loads in transformers with the same
    fill-mask."""
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(stdlib_docstrings(400)))
    out = tmp_path / "run"
    result = run_train(
        "--preset",
        "minilm",
        "--device",
        "cpu",
        "--init",
        minilm_dir,
        "--data",
        corpus,
        "--out",
        out,
        "--max-steps",
        "20",
        "--global-batch-size",
        "8",
        "--block-size",
        "64",
        "--eval-every",
        "10",
        "--eval-blocks",
        "16",
        "--lr",
        "3e-4",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ppl = [m["val_ppl"] for m in metrics(out) if "val_ppl" in m]
    assert len(ppl) >= 3 and ppl[-1] < 0.5 * ppl[0], ppl

    final = out / "final"
    ref, info = AutoModelForMaskedLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    text = "Return the [MASK] of the list."
    ours = fill_mask(*mlm.load_pretrained(final), text)
    theirs = pipeline("fill-mask", model=str(final), device="cpu")(text)
    assert [c["token"] for c in ours] == [c["token"] for c in theirs]
    assert [c["sequence"] for c in ours] == [c["sequence"] for c in theirs]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs)) < 1e-5


def test_metrics_checkpoints_and_exports(dataset, tmp_path):
    out = tmp_path / "run"
    result = run_train(
        "--data",
        dataset,
        *TINY,
        "--max-steps",
        "8",
        "--global-batch-size",
        "4",
        "--eval-every",
        "4",
        "--save-every",
        "2",
        "--keep-last",
        "2",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in evals:
        assert abs(r["val_ppl"] - torch.tensor(r["val_loss"]).exp().item()) < 1e-3 * r["val_ppl"]
    # The last two checkpoints plus the best one survive.
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    best_step = min(evals[1:], key=lambda r: r["val_loss"])["step"]
    assert kept == sorted({f"step_{s:08d}.pt" for s in (6, 8, best_step)})
    # matplotlib is a test dependency
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("final", "best"):
        model, tokenizer = mlm.load_pretrained(out / folder)
        assert tokenizer.vocab_size == model.config.vocab_size
    # The closing summary: perplexity before and after, then the example's top 5 before training
    # (logged at step 0) beside the final model's.
    lines = result.stdout.strip().splitlines()
    first, last = evals[0]["val_ppl"], evals[-1]["val_ppl"]
    assert lines[0].startswith("validation perplexity")
    assert f"{first:,.2f} at step 0 -> {last:,.2f} at step 8" in lines[0]
    text = "Return a [MASK] of the items in the list."
    at = lines.index(text)
    assert lines[at + 1].split() == ["before", "training", "after", "8", "steps"]
    before = next(r["example"] for r in rows if "example" in r)
    after = mlm.fill_mask(*mlm.load_pretrained(out / "final"), text, top_k=5)
    table = [line.split() for line in lines[at + 2 :]]
    assert len(table) == 5
    assert [t[0] for t in table] == [c["token_str"] for c in before]
    assert [t[2] for t in table] == [c["token_str"] for c in after]
    assert [float(t[3]) for t in table] == [round(c["score"], 3) for c in after]


BAD_INPUT = [
    (
        ["--global-batch-size", "6", "--micro-batch-size", "4"],
        "not a multiple of world size 1 x micro batch 4",
    ),
    (["--init", "/does/not/exist"], "--init folder '/does/not/exist' does not exist"),
    (["--preset", "imdb"], "pass --init MODEL_DIR"),
    (["--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16, not 'fp8'"),
    (["--block-size", "4096"], "block_size 4096 exceeds"),
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--config", "/does/not/exist.toml"], "cannot read --config"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(args) for args, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(dataset, tmp_path, args, message):
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_train(
        "--data", dataset, *TINY, "--max-steps", "2", "--out", tmp_path / "run", *args
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_bad_model_setting_is_refused_before_any_work(tmp_path):
    """No tokenizer trained, no corpus tokenized, no folder made: the flag is checked first."""
    env = {**RUN_ENV, "MLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        train_cmd("--family", "nope", "--out", tmp_path / "run"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: unknown model family 'nope'; use one of bert, roberta, distilbert, deberta-v2, "
        "modernbert"
    ]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_out_folder_of_another_run_is_refused(dataset, tmp_path):
    args = ["--data", dataset, *TINY, "--max-steps", "2", "--out", tmp_path / "run"]
    assert run_train(*args).returncode == 0
    again = run_train(*args)
    assert again.returncode == 2 and "already holds a run; pass --resume" in again.stderr
    changed = run_train(*args[:-2], "--block-size", "16", "--out", tmp_path / "run", "--resume")
    assert changed.returncode == 2 and "--resume with different block_size" in changed.stderr


def test_persistent_nan_loss_stops_with_a_message(dataset, tmp_path):
    result = run_train(
        "--data",
        dataset,
        *TINY,
        "--max-steps",
        "40",
        "--lr",
        "1e30",
        "--grad-clip",
        "0",
        "--warmup",
        "0",
        "--out",
        tmp_path / "run",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "loss was NaN/inf for 10 steps in a row" in result.stderr
    assert "step skipped" in result.stderr and "Traceback" not in result.stderr


def test_toml_config_and_flag_precedence(dataset, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("max_steps = 3\nglobal_batch_size = 4\n[model]\nnum_layers = 1\n")
    result = run_train(
        "--data", dataset, *TINY, "--config", toml, "--num-layers", "3", "--out", tmp_path / "run"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3  # the flag beats the file
    assert [m["step"] for m in metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3]
    bad = tmp_path / "bad.toml"
    bad.write_text("max_stepz = 3\n")
    result = run_train("--data", dataset, *TINY, "--config", bad, "--out", tmp_path / "run2")
    assert result.returncode == 2 and "unknown setting 'max_stepz'" in result.stderr


@pytest.mark.slow
def test_compile_trains_like_eager_with_static_masks(dataset, tmp_path):
    """--compile (inductor on the CPU) takes the static-mask path; eager with --static-masking is
    its reference."""
    common = ["--data", dataset, *TINY, *"--max-steps 4 --global-batch-size 8 --dropout 0".split()]
    compiled = run_train(*common, "--compile", "--out", tmp_path / "compiled", timeout=600)
    eager = run_train(*common, "--static-masking", "--out", tmp_path / "eager")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert_same_weights(
        final_weights(tmp_path / "compiled"), final_weights(tmp_path / "eager"), atol=1e-5
    )


def test_varlen_trains_like_the_dense_document_mask(dataset, tmp_path):
    """Per-document attention through nested tensors (--varlen) gives the updates of the dense (T,
    T) mask."""
    common = [
        "--data",
        dataset,
        *TINY,
        *"--max-steps 3 --global-batch-size 4 --doc-attention --dropout 0".split(),
    ]
    runs = dict(
        zip(
            ("dense", "varlen"),
            [
                run_train(*common, "--out", tmp_path / "dense"),
                run_train(*common, "--varlen", "--out", tmp_path / "varlen"),
            ],
        )
    )
    for name, result in runs.items():
        assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
    assert_same_weights(
        final_weights(tmp_path / "varlen"), final_weights(tmp_path / "dense"), atol=1e-5
    )
    dense, varlen = (
        [m["val_loss"] for m in metrics(tmp_path / n) if "val_loss" in m] for n in runs
    )
    assert len(dense) == len(varlen) == 2 and max(abs(a - b) for a, b in zip(dense, varlen)) < 1e-4


def test_dataset_of_another_vocabulary_is_refused(dataset, hf_checkpoints, tmp_path):
    result = run_train(
        "--device",
        "cpu",
        "--init",
        hf_checkpoints["bert"],
        "--data",
        dataset,
        "--max-steps",
        "2",
        "--out",
        tmp_path / "r",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the dataset's vocabulary has 600 tokens but this model/tokenizer has" in result.stderr


@torchrun
def test_world_size_that_does_not_divide_the_global_batch(dataset, tmp_path):
    result = run_train(
        "--data",
        dataset,
        *TINY,
        "--max-steps",
        "2",
        "--global-batch-size",
        "3",
        "--out",
        tmp_path / "run",
        nproc=2,
    )
    assert result.returncode != 0
    for rank in (0, 1):  # each rank's own line comes before torchrun's report
        assert (
            f"error (rank {rank}): global batch 3 is not a multiple of world size 2; "
            "change --global-batch-size"
        ) in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_deberta_v3_recipe_on_a_wikipedia_like_parquet_dump(hf_checkpoints, tmp_path):
    """The users' recipe as a preset: parquet with id/url/title/text, an evaluation and a checkpoint
    every epoch, one checkpoint kept beside the best, and the best weights exported at the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = stdlib_docstrings(120)
    table = pa.table(
        {
            "id": [str(i) for i in range(len(texts))],
            "url": ["https://x"] * len(texts),
            "title": [t[:20] for t in texts],
            "text": texts,
        }
    )
    pq.write_table(table, tmp_path / "wiki-00000.parquet")
    out = tmp_path / "run"
    result = run_train(
        "--preset",
        "deberta-v3",
        "--device",
        "cpu",
        "--init",
        hf_checkpoints["deberta-v2"],
        "--data",
        tmp_path / "wiki-00000.parquet",
        "--out",
        out,
        "--epochs",
        "3",
        "--block-size",
        "32",
        "--global-batch-size",
        "16",
        "--eval-blocks",
        "8",
        "--log-every",
        "1",
        "--lr",
        "1e-3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    steps = max(r["step"] for r in rows if "loss" in r)
    evals = [r["step"] for r in rows if "val_loss" in r]
    # one per epoch, plus the baseline
    assert steps % 3 == 0 and evals == [0, steps // 3, 2 * steps // 3, steps]
    best = min((r for r in rows if "val_loss" in r and r["step"] > 0), key=lambda r: r["val_loss"])[
        "step"
    ]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({f"step_{steps:08d}.pt", f"step_{best:08d}.pt"})
    assert_same_weights(final_weights(out), load_file(out / "best" / "model.safetensors"), atol=0)
    model, info = AutoModelForMaskedLM.from_pretrained(out / "final", output_loading_info=True)
    assert type(model).__name__ == "DebertaV2ForMaskedLM" and not info["missing_keys"]


@pytest.mark.slow
def test_deberta_from_scratch_with_a_unigram_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(stdlib_docstrings()))
    out = tmp_path / "run"
    result = run_train(
        "--family",
        "deberta-v2",
        "--tokenizer-kind",
        "unigram",
        "--vocab-size",
        "700",
        "--data",
        corpus,
        *TINY,
        "--max-steps",
        "4",
        "--global-batch-size",
        "4",
        "--out",
        out,
        "--example",
        "The [MASK] of the list.",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model, info = AutoModelForMaskedLM.from_pretrained(out / "final", output_loading_info=True)
    assert type(model).__name__ == "DebertaV2ForMaskedLM" and not info["missing_keys"]
    text = "Return the number of items."
    assert AutoTokenizer.from_pretrained(out / "final")(text)[
        "input_ids"
    ] == mlm.Tokenizer.from_pretrained(out / "final").encode(text)
