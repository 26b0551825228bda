"""Trained tokenizers: byte-identical in every process, loadable by transformers, and (unigram)
sound.

The corpus is real text, the docstrings of a few stdlib modules; the references are
`transformers.AutoTokenizer` on the saved folder, the `tokenizers` trainers, and brute force over
every segmentation of small words."""

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import stdlib_docstrings
from tokenizers import Tokenizer as Backend
from tokenizers import models, normalizers, pre_tokenizers, trainers

from mlm.errors import ConfigError, DataError
from mlm.spm import set_deberta_pipeline
from mlm.tokenizer import TOKENIZER_FILES, Tokenizer
from mlm.tokenizer_train import (
    _digamma,
    build_lattice,
    expected_uses,
    train_tokenizer,
    train_unigram,
    viterbi,
)

REPO = Path(__file__).resolve().parents[1]
KINDS = ("wordpiece", "bpe", "unigram")
SIZE = 800
# Texts the tokenizers must agree on beyond plain prose: special tokens written out, accents, CJK,
# emoji, whitespace runs, a literal "▁", nothing at all.
EDGE_TEXTS = [
    "The capital of France is [MASK].",
    "x[MASK]y and two [MASK] [MASK] masks, <mask> and [mask] too",
    "Héllo, WÖRLD! naïve café, cafe\u0301; 日本語のテキスト 😀👍🏽",
    "  leading and   repeated   spaces\tand\ttabs\nand lines\r\n",
    "a ▁ literal ▁▁ metaspace and ## hashes ##ing",
    "",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return stdlib_docstrings()  # 133 docstrings of argparse, textwrap, json, pathlib, random, csv


@pytest.fixture(scope="module")
def trained(texts) -> dict[str, Tokenizer]:
    """One tokenizer of each kind, trained on the first 100 docstrings (the rest are held out)."""
    return {kind: train_tokenizer(texts[:100], kind, SIZE) for kind in KINDS}


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in TOKENIZER_FILES
    }


# ================================================================================== determinism
TRAIN_AND_HASH = """
import hashlib, json, sys
from mlm.tokenizer_train import train_tokenizer
texts, out = json.load(open(sys.argv[1])), sys.argv[2]
for kind in ("wordpiece", "bpe", "unigram"):
    train_tokenizer(texts, kind, 800).save(f"{out}/{kind}")
"""


@pytest.mark.slow
def test_same_files_in_fresh_processes_with_any_threads_and_document_order(tmp_path, texts):
    """Two fresh interpreters (other hash seeds, one thread vs several, documents reversed) and this
    one write byte-identical files. Untreated, WordPieceTrainer gives a different vocabulary in
    nearly every process."""
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "reversed.json").write_text(json.dumps(texts[::-1]))
    runs = {
        "one-thread": (
            "texts.json",
            {
                "RAYON_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",
                "PYTHONHASHSEED": "1",
            },
        ),
        "threads-reversed": (
            "reversed.json",
            {
                "RAYON_NUM_THREADS": "3",
                "TOKENIZERS_PARALLELISM": "true",
                "OMP_NUM_THREADS": "3",
                "PYTHONHASHSEED": "2",
            },
        ),
    }
    for name, (data, env) in runs.items():
        done = subprocess.run(
            [sys.executable, "-c", TRAIN_AND_HASH, str(tmp_path / data), str(tmp_path / name)],
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    for kind in KINDS:
        train_tokenizer(texts, kind, SIZE).save(tmp_path / "here" / kind)
        here = file_hashes(tmp_path / "here" / kind)
        assert file_hashes(tmp_path / "one-thread" / kind) == here, kind
        assert file_hashes(tmp_path / "threads-reversed" / kind) == here, kind


def test_wordpiece_from_our_word_counts_equals_the_trainer_on_the_texts(texts):
    """Counting words ourselves (normalised, split, each "##c" numbered up front) changes nothing
    but the numbering: the `tokenizers` trainer fed the raw texts, with the same "##c" first, learns
    the same vocabulary."""
    ours = train_tokenizer(texts, "wordpiece", SIZE).get_vocab()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    continuations = sorted(t for t in ours if t.startswith("##") and len(t) == 3)
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=SIZE,
        min_frequency=2,
        special_tokens=specials + continuations,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    assert json.loads(backend.to_str())["model"]["vocab"] == ours


# ================================================================================== transformers
@pytest.mark.parametrize("kind", KINDS)
def test_saved_tokenizer_loads_in_transformers_with_the_same_ids(tmp_path, texts, trained, kind):
    from transformers import AutoTokenizer

    ours = trained[kind]
    ours.save(tmp_path)
    ref, again = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    for text in texts[100:] + EDGE_TEXTS:
        ids = ours.encode(text)
        assert ref(text)["input_ids"] == ids == again.encode(text), text
        assert ref.decode(ids) == ours.decode(ids), text
        assert ref.decode(ids, skip_special_tokens=True) == ours.decode(
            ids, skip_special_tokens=True
        ), text
    assert len(ref) == ours.vocab_size == SIZE
    assert [
        ref.mask_token_id,
        ref.pad_token_id,
        ref.cls_token_id,
        ref.sep_token_id,
        ref.unk_token_id,
    ] == [
        ours.mask_token_id,
        ours.pad_token_id,
        ours.cls_token_id,
        ours.sep_token_id,
        ours.unk_token_id,
    ]
    assert again.files() == ours.files()
    # Only the five real special tokens are added tokens; WordPiece's "##c" are plain vocabulary.
    added = json.loads(ours.files()["tokenizer.json"])["added_tokens"]
    assert sorted((a["id"], a["content"], a["special"]) for a in added) == [
        (i, ours.convert_ids_to_tokens([i])[0], True) for i in range(5)
    ]


def test_unigram_is_a_deberta_tokenizer_with_its_special_ids(tmp_path, trained):
    from transformers import AutoTokenizer

    ours = trained["unigram"]
    assert ours.kind == "unigram"
    in_order = [ours.pad_token, ours.cls_token, ours.sep_token, ours.unk_token, ours.mask_token]
    assert (
        in_order
        == ours.convert_ids_to_tokens(range(5))
        == ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    )
    ours.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "DebertaV2Tokenizer" and config["do_lower_case"] is False
    assert type(AutoTokenizer.from_pretrained(tmp_path)).__name__ == "DebertaV2Tokenizer"
    # Metaspace words: a token starts a word exactly when it starts with "▁", as whole-word masking
    # reads it.
    enc = ours.encode_batch(["unbelievable parsers, ok"])[0]
    for token, start in zip(enc.tokens, ours.word_starts(enc)):
        assert start == (token.startswith("▁") or token in ("[CLS]", "[SEP]")), (token, start)


def test_unigram_lowercase_is_saved_and_applied(tmp_path, texts):
    from transformers import AutoTokenizer

    lower = train_tokenizer(texts[:60], "unigram", 400, lowercase=True)
    assert lower.encode("Hello WORLD, Path") == lower.encode("hello world, path")
    lower.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["do_lower_case"] is True
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for text in texts[60:70] + EDGE_TEXTS:
        assert ref(text)["input_ids"] == lower.encode(text), text


# ============================================================================== the unigram trainer
def test_unigram_spells_every_training_character_and_has_the_size_asked(texts, trained):
    ours = trained["unigram"]
    splitter = Backend(models.Unigram())
    set_deberta_pipeline(splitter, do_lower_case=False, split_by_punct=False, add_prefix_space=True)
    chars = {c for text in texts[:100] for c in splitter.normalizer.normalize_str(text)} - {" "} | {
        "▁"
    }
    assert chars <= set(ours.get_vocab())
    assert all(ours.unk_token_id not in ours.encode(text) for text in texts[:100])
    assert ours.vocab_size == SIZE
    assert train_tokenizer(texts[:100], "unigram", 333).vocab_size == 333


def test_unigram_stops_at_what_a_tiny_corpus_allows():
    pieces = train_unigram({"▁abc": 5, "▁abd": 3, "▁b": 1}, 1000)
    # Seeds: the characters, and the substrings seen twice or more that are followed by two
    # different characters: "ab" and "▁ab" (by c and d), not "▁a" or "abc" (always by b, by the
    # word's end).
    assert sorted(p for p, _ in pieces) == sorted(["▁", "a", "b", "c", "d", "ab", "▁ab"])
    assert len(set(p for p, _ in pieces)) == len(pieces)
    with pytest.raises(
        ConfigError, match="5 distinct characters, more than the 4 pieces asked for"
    ):
        train_unigram({"▁abc": 5, "▁abd": 3}, 4)


def test_unigram_segments_held_out_text_like_the_tokenizers_trainer(texts, trained):
    """Tokens per word on held-out docstrings: within 15% of `tokenizers`' UnigramTrainer at the
    same size. (On the 3,500-docstring default corpus at 4096: ours 1.734, UnigramTrainer 1.685,
    sentencepiece 1.718.)"""
    backend = Backend(models.Unigram())
    set_deberta_pipeline(backend, do_lower_case=False, split_by_punct=False, add_prefix_space=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=SIZE,
        special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
        unk_token="[UNK]",
        show_progress=False,
    )
    backend.train_from_iterator(texts[:100], trainer)
    held_out = texts[100:]
    words = sum(len(text.split()) for text in held_out)
    ours = (
        sum(len(trained["unigram"].encode(text, add_special_tokens=False)) for text in held_out)
        / words
    )
    theirs = (
        sum(len(e.ids) for e in backend.encode_batch(held_out, add_special_tokens=False)) / words
    )
    assert ours < 1.15 * theirs, (ours, theirs)


def segmentations(word: str, pieces: set[str]):
    """Every way to spell word with pieces."""
    if not word:
        yield []
    for end in range(1, len(word) + 1):
        if word[:end] in pieces:
            for rest in segmentations(word[end:], pieces):
                yield [word[:end], *rest]


def test_forward_backward_and_viterbi_equal_brute_force():
    counts = {"▁abab": 3, "▁ab": 5, "▁ba": 2, "▁aab": 1, "▁b": 4, "▁abba": 2, "▁baab": 1}
    lattice = build_lattice(counts, min_frequency=1)
    index = {p: i for i, p in enumerate(lattice.pieces)}
    # no ties
    logp = np.log(np.random.default_rng(0).dirichlet(np.ones(len(index)))) - lattice.lengths
    expected, best = np.zeros(len(index)), {}
    for word, count in counts.items():
        splits = list(segmentations(word, set(index)))
        scores = np.array([sum(logp[index[p]] for p in split) for split in splits])
        z = np.logaddexp.reduce(scores)
        for split, score in zip(splits, scores):
            for piece in split:
                expected[index[piece]] += count * math.exp(score - z)
        best[word] = splits[int(scores.argmax())]
    np.testing.assert_allclose(expected_uses(lattice.words, logp), expected, rtol=1e-12, atol=1e-12)

    words = sorted(counts, key=lambda w: (-len(w), w))  # the lattice's order: longest first
    string, row, k = viterbi(lattice.words, logp)
    found = {}
    # rows run left to right in a word
    for s, r, kk in sorted(zip(string, row, k), key=lambda e: e[1]):
        found.setdefault(words[s], []).append(lattice.pieces[lattice.words.ids[r, kk]])
    assert found == best


def test_digamma():
    euler = 0.5772156649015329
    np.testing.assert_allclose(
        _digamma(np.array([1.0, 0.5])), [-euler, -euler - 2 * math.log(2)], rtol=1e-10
    )
    x = np.random.default_rng(0).uniform(0.01, 50, 100)
    np.testing.assert_allclose(_digamma(x + 1), _digamma(x) + 1 / x, rtol=1e-10, atol=1e-10)


# =============================================================================== errors and the CLI
def test_errors_for_people():
    with pytest.raises(ConfigError, match="wordpiece, bpe or unigram, not 'sentencepiece'"):
        train_tokenizer(["text"], "sentencepiece")
    with pytest.raises(ConfigError, match="pass --vocab-size 6 or more"):
        train_tokenizer(["text"], "unigram", 5)
    with pytest.raises(ConfigError, match="7 distinct characters.*pass --vocab-size 12 or more"):
        train_tokenizer(["some text"], "unigram", 9)  # ▁ s o m e t x, and the 5 special tokens
    for kind in KINDS:
        with pytest.raises(DataError, match="no documents in the texts given"):
            train_tokenizer([], kind, 300)


def load_prepare():
    spec = importlib.util.spec_from_file_location("prepare_cli", REPO / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_trains_a_unigram_tokenizer(tmp_path, texts, capsys):
    from mlm.dataset import load_dataset_meta

    (tmp_path / "corpus.txt").write_text("\n\n".join(texts[:60]), encoding="utf-8")
    prepare = load_prepare()
    out = tmp_path / "ds"
    prepare.main(
        [
            "--data",
            str(tmp_path / "corpus.txt"),
            *"--train-tokenizer unigram --vocab-size 500 --out".split(),
            str(out),
            "--quiet",
        ]
    )
    assert "unigram tokenizer, vocabulary 500" in capsys.readouterr().out
    assert load_dataset_meta(out)["tokenizer_kind"] == "unigram"
    assert (
        Tokenizer.from_pretrained(out).files()
        == train_tokenizer(texts[:60], "unigram", 500).files()
    )
    with pytest.raises(
        ConfigError, match="--cased applies to wordpiece; unigram always keeps case"
    ):
        prepare.main(["--train-tokenizer", "unigram", "--cased", "--out", str(tmp_path / "x")])
