"""`infer.py --eval` and mlm/evaluate.py: masked-LM loss, perplexity and accuracy over a corpus.

The references: transformers' AutoModelForMaskedLM scoring the same masked blocks (every family mlm
loads, and all-MiniLM-L6-v2's real weights), and train.py's own validation (the same blocks, masks
and sums)."""

import importlib.util
import json
import math
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, stdlib_docstrings

import mlm
from mlm import data as mdata
from mlm import dataset as mdataset
from mlm import pipeline
from mlm.config import TrainConfig
from mlm.corpus import Corpus
from mlm.data import Batch
from mlm.distributed import Dist
from mlm.errors import run_cli
from mlm.evaluate import full_logits, labelled_logits, score_blocks, summarize
from mlm.masking import mask_eval_blocks

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """infer.py or train.py as a module, whatever the working directory."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


infer = load_script("infer")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return stdlib_docstrings(120)


@pytest.fixture(scope="module")
def corpus_jsonl(tmp_path_factory, texts) -> Path:
    path = tmp_path_factory.mktemp("eval") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)),
        encoding="utf-8",
    )
    return path


def run_eval(capsys, *args) -> dict:
    """infer.main in this process (the CLI minus the interpreter start-up); the --json object it
    prints."""
    capsys.readouterr()
    infer.main(["--device", "cpu", "--json", *map(str, args)])
    return json.loads(capsys.readouterr().out)


def assert_agrees_with_reference(result: dict) -> None:
    ref = result["reference"]
    assert result["tokens"] > 0
    assert abs(result["loss"] - ref["loss"]) < 1e-4, (result, ref)
    assert abs(result["accuracy"] - ref["accuracy"]) < 1e-4, (result, ref)
    assert math.isclose(result["perplexity"], ref["perplexity"], rel_tol=1e-4)


# ================================================================================= the scoring loop
@pytest.fixture(scope="module")
def bert_val(hf_checkpoints, tmp_path_factory, texts):
    """The tiny bert checkpoint and a prepared folder of the texts with a validation split."""
    model, tokenizer = mlm.load_pretrained(hf_checkpoints["bert"])
    out = tmp_path_factory.mktemp("prepared") / "data"
    mdataset.prepare(
        Corpus.from_texts(texts), out, tokenizer, val_fraction=0.3, seed=1, progress=False
    )
    return model, tokenizer, out


def validation_set(
    data_dir: Path, tokenizer, block_size: int, n: int, seed: int, whole_word_mask=False
) -> Batch:
    """The first n val blocks, masked once from seed: train.py's validation set for these
    settings."""
    cfg = TrainConfig(
        block_size=block_size, eval_blocks=n, seed=seed, whole_word_mask=whole_word_mask
    )
    return pipeline.validation_set(cfg, data_dir, pipeline.Masking.of(cfg, tokenizer))


def test_score_blocks_is_train_py_evaluate_and_adds_up_over_shares(bert_val):
    train = load_script("train")
    model, tokenizer, data_dir = bert_val
    val = validation_set(data_dir, tokenizer, block_size=48, n=11, seed=5, whole_word_mask=True)
    theirs = train.evaluate(model, val, Dist(), 4, nullcontext())

    ours = score_blocks(model, val, batch_size=4)
    assert summarize(ours) == pytest.approx(
        {
            "loss": theirs["val_loss"],
            "perplexity": theirs["val_ppl"],
            "accuracy": theirs["val_acc"],
            "tokens": theirs["val_tokens"],
        },
        rel=1e-12,
    )
    # Two ranks' shares, summed, are the whole (what all_reduce does). Other micro-batches change
    # only the float rounding of the batched matmuls.
    halves = score_blocks(model, val, rows=range(0, 5), batch_size=2) + score_blocks(
        model, val, rows=range(5, 11)
    )
    torch.testing.assert_close(halves, ours, rtol=1e-6, atol=0)
    # The model is scored without dropout and given back in the mode it came in.
    model.train()
    torch.testing.assert_close(score_blocks(model, val, batch_size=4), ours, rtol=1e-12, atol=0)
    assert model.training
    model.eval()


def test_cli_split_val_reproduces_train_py_validation(bert_val, capsys):
    train = load_script("train")
    model, tokenizer, data_dir = bert_val
    expected = train.evaluate(
        model, validation_set(data_dir, tokenizer, 40, 7, seed=3), Dist(), 32, nullcontext()
    )
    model_dir = data_dir.parent / "model"
    mlm.save_pretrained(model, tokenizer, model_dir)
    got = run_eval(
        capsys,
        "--model",
        model_dir,
        "--eval",
        data_dir,
        "--split",
        "val",
        "--seed",
        3,
        "--block-size",
        40,
        "--max-blocks",
        7,
    )
    assert got["loss"] == pytest.approx(expected["val_loss"], rel=1e-12)
    assert (
        got["accuracy"] == expected["val_acc"]
        and got["tokens"] == expected["val_tokens"]
        and got["blocks"] == 7
    )

    # --split all: the train blocks, then the val blocks numbered on from them.
    meta = mdataset.load_dataset_meta(data_dir)
    every = run_eval(capsys, "--model", model_dir, "--eval", data_dir, "--block-size", 40)
    assert every["blocks"] == sum(
        math.ceil(meta["splits"][s]["tokens"] / 40) for s in ("train", "val")
    )
    assert every["input_tokens"] == meta["tokens"]


# ========================================================================= parity with transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_agrees_with_transformers(family, hf_checkpoints, corpus_jsonl, capsys):
    model_dir = hf_checkpoints[family]
    result = run_eval(
        capsys,
        "--model",
        model_dir,
        "--eval",
        corpus_jsonl,
        "--reference",
        "transformers",
        "--max-blocks",
        6,
        "--batch-size",
        4,
    )
    assert_agrees_with_reference(result)
    limit = mlm.load_pretrained(model_dir)[0].config.max_tokens
    assert result["blocks"] == 6 and result["block_size"] == min(128, limit)
    # the corpus fills more than six blocks
    assert result["input_tokens"] == 6 * result["block_size"]


@pytest.mark.slow
def test_minilm_real_weights_with_one_fresh_head(minilm_dir, corpus_jsonl, capsys):
    """all-MiniLM-L6-v2 is a bare encoder: both libraries would draw a fresh MLM head from their own
    random numbers. The reference takes ours (seeded by --seed), so the comparison is of the real
    encoder weights."""
    args = ("--model", minilm_dir, "--eval", corpus_jsonl, "--max-blocks", 3, "--batch-size", 3)
    result = run_eval(capsys, *args, "--reference", "transformers")
    assert_agrees_with_reference(result)
    # the head repeats
    assert run_eval(capsys, *args) == {k: v for k, v in result.items() if k != "reference"}
    assert run_eval(capsys, *args, "--seed", 1)["loss"] != pytest.approx(result["loss"], abs=1e-3)

    # Stronger than the means: the logits at every masked position, ours against transformers'.
    torch.manual_seed(0)
    model, tokenizer = mlm.load_pretrained(minilm_dir)
    reference = infer.load_reference(str(minilm_dir), model, torch.float32, "cpu")
    prepared = corpus_jsonl.parent / "prepared-minilm"
    mdataset.prepare(corpus_jsonl, prepared, tokenizer, val_fraction=0.0, progress=False)
    blocks = mdata.PackedBlocks(prepared, "train", 128, remainder="pad").get(range(2))
    ids, labels = mask_eval_blocks(
        blocks["input_ids"],
        seed=0,
        attention_mask=blocks["attention_mask"],
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=tokenizer.vocab_size,
        special_ids=tokenizer.special_ids,
    )
    batch = Batch(ids, labels, blocks["attention_mask"])
    with torch.no_grad():
        ours, targets = labelled_logits(model, batch)  # (N, V), (N,)
        theirs, their_targets = full_logits(reference, batch)
    assert torch.equal(targets, their_targets) and len(targets) > 20
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.5  # logits that vary: the head passes the encoder's differences on


# ==================================================================================== what it reads
def test_the_same_text_in_any_form_scores_the_same(
    hf_checkpoints, texts, corpus_jsonl, tmp_path, capsys
):
    datasets = pytest.importorskip("datasets")
    model_dir = hf_checkpoints["distilbert"]
    args = ("--model", model_dir, "--max-blocks", 5, "--doc-split", "line")
    from_jsonl = run_eval(capsys, "--eval", corpus_jsonl, *args)

    (tmp_path / "docs.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    prepared = tmp_path / "prepared"
    mdataset.prepare(
        corpus_jsonl,
        prepared,
        mlm.Tokenizer.from_pretrained(model_dir),
        val_fraction=0.0,
        progress=False,
    )
    for data in (tmp_path / "docs.txt", tmp_path / "saved", prepared):
        other = run_eval(capsys, "--eval", data, *args)
        assert {k: other[k] for k in ("loss", "accuracy", "tokens")} == {
            k: from_jsonl[k] for k in ("loss", "accuracy", "tokens")
        }, data

    wwm = run_eval(
        capsys, "--eval", corpus_jsonl, *args, "--whole-word-mask", "--mlm-probability", 0.3
    )
    assert (
        wwm["whole_word_mask"]
        and wwm["mlm_probability"] == 0.3
        and wwm["tokens"] > from_jsonl["tokens"]
    )


def test_human_summary(hf_checkpoints, corpus_jsonl, capsys):
    infer.main(
        [
            "--model",
            str(hf_checkpoints["bert"]),
            "--eval",
            str(corpus_jsonl),
            *"--max-blocks 2 --device cpu --reference transformers".split(),
        ]
    )
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert (
        len(lines) == 3
        and "loss" in lines[0]
        and "perplexity" in lines[0]
        and "accuracy" in lines[0]
    )
    assert "masked tokens in 2 blocks of 64" in lines[1] and lines[2].strip().startswith(
        "transformers: loss"
    )
    assert "scoring" in err  # the progress bar, on stderr


# ======================================================================================== bad input
def fail(capsys, *args) -> str:
    """Run the CLI as `python infer.py` would (run_cli); expect exit 2 and return the error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: infer.main(["--device", "cpu", *map(str, args)]))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar, one line
    assert last.startswith("error: ")
    return last


def test_bad_input_is_one_line_and_exit_2(
    hf_checkpoints, bert_val, corpus_jsonl, tmp_path, capsys, monkeypatch
):
    bert, roberta = hf_checkpoints["bert"], hf_checkpoints["roberta"]
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    assert "no documents" in fail(capsys, "--model", bert, "--eval", tmp_path / "empty.txt")
    assert "no config.json" in fail(capsys, "--model", tmp_path, "--eval", corpus_jsonl)
    assert "exceeds the model's usable positions 64" in fail(
        capsys, "--model", bert, "--eval", corpus_jsonl, "--block-size", 65
    )
    # tokenized for bert
    assert "vocabulary" in fail(capsys, "--model", roberta, "--eval", bert_val[2])
    assert "--split val needs a folder made by prepare.py" in fail(
        capsys, "--model", bert, "--eval", corpus_jsonl, "--split", "val"
    )
    assert "pass texts to fill in without --eval" in fail(
        capsys, "a [MASK]", "--model", bert, "--eval", corpus_jsonl
    )
    assert "--max-blocks must be at least 1" in fail(
        capsys, "--model", bert, "--eval", corpus_jsonl, "--max-blocks", 0
    )
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert "needs the transformers package" in fail(
        capsys, "--model", bert, "--eval", corpus_jsonl, "--reference", "transformers"
    )


def test_cli_process_error_has_no_traceback(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "infer.py"),
            "--model",
            str(tmp_path),
            "--eval",
            str(tmp_path / "a.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines() == [done.stderr.strip()]
        and "no config.json" in done.stderr
    )
