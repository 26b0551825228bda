"""fill_mask and infer.py against `transformers.pipeline("fill-mask")` on the same folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES
from transformers import pipeline

import mlm
from mlm.fillmask import fill_mask

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "The parser returns a [MASK] of the arguments.",
    "Return the <mask> value, and the [MASK] of it.",  # two masks, both spellings
    "[MASK]",
    "A much longer text, so that the batch needs padding: the [MASK] is written to the file and "
    "then closed.",
]


def hf_fill(folder, text, **kwargs):
    fill = pipeline("fill-mask", model=str(folder), device="cpu")
    mask = fill.tokenizer.mask_token
    return fill(text.replace("[MASK]", mask).replace("<mask>", mask), **kwargs)


def assert_same_result(ours, ref):
    assert type(ours) is type(ref) and len(ours) == len(ref)
    if ref and isinstance(ref[0], list):
        for a, b in zip(ours, ref):
            assert_same_result(a, b)
        return
    for a, b in zip(ours, ref):
        assert list(a) == ["score", "token", "token_str", "sequence"] == list(b)
        assert (a["token"], a["token_str"], a["sequence"]) == (
            b["token"],
            b["token_str"],
            b["sequence"],
        )
        assert abs(a["score"] - b["score"]) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fill_mask_equals_pipeline(hf_checkpoints, family):
    model, tokenizer = mlm.load_pretrained(hf_checkpoints[family])
    results = mlm.fill_mask(model, tokenizer, TEXTS, top_k=4)  # the public name; one padded batch
    assert len(results) == len(TEXTS)
    for text, result in zip(TEXTS, results):
        assert_same_result(result, hf_fill(hf_checkpoints[family], text, top_k=4))
    assert isinstance(results[1][0], list) and len(results[1]) == 2  # one list per mask


def test_single_string_and_small_batches(hf_checkpoints):
    model, tokenizer = mlm.load_pretrained(hf_checkpoints["bert"])
    assert_same_result(
        fill_mask(model, tokenizer, TEXTS[0]), hf_fill(hf_checkpoints["bert"], TEXTS[0])
    )
    one_by_one = fill_mask(model, tokenizer, TEXTS, batch_size=1)
    for a, b in zip(one_by_one, fill_mask(model, tokenizer, TEXTS, batch_size=3)):
        assert_same_result(a, b)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_targets(hf_checkpoints, family):
    model, tokenizer = mlm.load_pretrained(hf_checkpoints[family])
    # the last is not a vocabulary word: its first token stands in
    targets = ["the", "value", "zzzq"]
    ours = fill_mask(model, tokenizer, TEXTS[0], top_k=10, targets=targets)
    ref = hf_fill(hf_checkpoints[family], TEXTS[0], top_k=10, targets=targets)
    assert len(ours) <= 3
    assert_same_result(ours, ref)


def test_text_without_mask_is_an_input_error(hf_checkpoints):
    model, tokenizer = mlm.load_pretrained(hf_checkpoints["bert"])
    with pytest.raises(mlm.InputError, match="text 2 has no mask token"):
        fill_mask(model, tokenizer, ["a [MASK]", "no mask here"])


def run_infer(*args, stdin=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_json_matches_pipeline(hf_checkpoints):
    folder = hf_checkpoints["roberta"]
    out = run_infer("--model", folder, "--json", "--top-k", "3", TEXTS[0])
    assert out.returncode == 0, out.stderr
    assert_same_result(json.loads(out.stdout), hf_fill(folder, TEXTS[0], top_k=3))

    # several texts: a list of results
    out = run_infer("--model", folder, "--json", TEXTS[0], TEXTS[1])
    got = json.loads(out.stdout)
    assert len(got) == 2
    assert_same_result(got[1], hf_fill(folder, TEXTS[1]))


def test_cli_reads_stdin_and_files_and_prints_a_table(hf_checkpoints, tmp_path):
    folder = hf_checkpoints["bert"]
    out = run_infer("--model", folder, stdin=TEXTS[0] + "\n" + TEXTS[2] + "\n")
    assert out.returncode == 0, out.stderr
    best = fill_mask(*mlm.load_pretrained(folder), TEXTS[0])[0]
    assert TEXTS[0] in out.stdout and best["sequence"] in out.stdout and " 5. " in out.stdout
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = run_infer("--model", folder, "--file", texts, "--json", "--targets", "the,value")
    assert out.returncode == 0, out.stderr
    assert [len(r) for r in json.loads(out.stdout)] == [2, 2, 2, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{bert}", "no mask in this text"], "has no mask token"),
        (["--model", "/does/not/exist", "a [MASK]"], "does not exist"),
        (["--model", "{bert}", "--top-k", "0", "a [MASK]"], "top_k must be at least 1"),
        (["--model", "{bert}", "--file", "/does/not/exist.txt"], "cannot read --file"),
        (
            ["--model", "{bert}", "--file", "{latin1}"],
            "latin1.txt' is not UTF-8 text (line 2 has byte 0xe9)",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(hf_checkpoints, tmp_path, args, message):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("The [MASK] is open.\nThe café is [MASK].\n".encode("latin-1"))
    out = run_infer(*[a.format(bert=hf_checkpoints["bert"], latin1=latin1) for a in args])
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
