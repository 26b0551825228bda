"""The data path: token arrays on disk, packing into blocks, and the order of blocks (reading:
test_corpus.py).

The references are the `tokenizers` library itself (token ids, word ids),
`transformers.AutoTokenizer` (trained tokenizers), and HF's `group_texts` layout (concatenate every
document's ids, cut into blocks)."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlm import pipeline
from mlm.config import parse_config
from mlm.corpus import Corpus, default_corpus
from mlm.data import BatchPlan, PackedBlocks, blocks_at, check_block_size, stream_positions
from mlm.dataset import (
    check_vocab,
    default_dataset,
    load_dataset_meta,
    open_split,
    prepare,
    split_is_val,
)
from mlm.errors import ConfigError, DataError
from mlm.masking import preview
from mlm.tokenizer import DEFAULT_SPECIALS, Tokenizer, build_wordpiece, tokenizer_sha256
from mlm.tokenizer_train import train_tokenizer

REPO = Path(__file__).resolve().parents[1]

DOCS = [
    "The cat sat on the mat.",
    "Tokenizers split words into pieces: unbelievably, antidisestablishmentarianism!",
    "A short one.",
    "Numbers like 3.14159 and 2,718 appear too; so do e-mail@addresses.com and [MASK] tokens.",
    "Héllo wörld — accents, dashes and “quotes”.",
    "The end of the small corpus, with one more sentence to make it longer than the others here.",
    "Python's standard library is large.",
    "Blocks cross document boundaries when texts are grouped.",
]


@pytest.fixture(scope="module")
def bert(minilm_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def small_texts() -> list[str]:
    """A few hundred real docstrings: enough to train small vocabularies."""
    return list(itertools.islice(default_corpus(), 400))


@pytest.fixture(scope="module")
def bpe(small_texts) -> Tokenizer:
    return train_tokenizer(small_texts, "bpe", 600)


@pytest.fixture(scope="module")
def bert_dataset(tmp_path_factory, bert) -> Path:
    """DOCS, all in train (val_fraction=0), so train holds every document in order."""
    out = tmp_path_factory.mktemp("ds") / "bert"
    prepare(Corpus.from_texts(DOCS), out, bert, val_fraction=0.0, progress=False)
    return out


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ================================================================================== token arrays
def test_token_arrays_equal_tokenizers_encoding(bert_dataset, bert):
    meta = load_dataset_meta(bert_dataset)
    arrays = open_split(bert_dataset, "train")
    assert arrays.tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert meta["splits"]["train"] == {"docs": len(DOCS), "tokens": len(arrays.tokens)}
    assert meta["splits"]["val"] == {"docs": 0, "tokens": 0}
    offset = 0
    for i, doc in enumerate(DOCS):
        # [CLS] doc [SEP], as run_mlm.py does
        encoding = bert.backend.encode(doc, add_special_tokens=True)
        assert encoding.ids[0] == bert.cls_token_id and encoding.ids[-1] == bert.sep_token_id
        start, end = arrays.docs[i], arrays.docs[i + 1]
        assert start == offset and end == offset + len(encoding.ids)
        assert arrays.tokens[start:end].tolist() == encoding.ids
        assert arrays.words[start:end].astype(bool).tolist() == bert.word_starts(encoding)
        offset = end
    assert arrays.docs[-1] == len(arrays.tokens)
    # The folder describes itself: its tokenizer, and the fingerprints that tie ids to it.
    saved = Tokenizer.from_pretrained(bert_dataset)
    assert saved.encode(DOCS[1]) == bert.encode(DOCS[1])
    assert tokenizer_sha256(saved) == tokenizer_sha256(bert) == meta["tokenizer_sha256"]
    check_vocab(meta, bert)
    check_vocab(bert_dataset, bert.vocab_size)


def test_bpe_word_starts_follow_word_ids(tmp_path, bpe):
    prepare(Corpus.from_texts(DOCS), tmp_path / "ds", bpe, val_fraction=0.0, progress=False)
    arrays = open_split(tmp_path / "ds", "train")
    encodings = bpe.backend.encode_batch(DOCS)
    assert arrays.tokens.tolist() == [i for e in encodings for i in e.ids]
    assert arrays.words.astype(bool).tolist() == [s for e in encodings for s in bpe.word_starts(e)]
    assert encodings[0].ids[0] == bpe.cls_token_id  # <s> doc </s>


def test_split_is_by_document_and_deterministic(tmp_path, bert):
    texts = [f"document number {i} says something {'long ' * (i % 7)}" for i in range(300)]

    def split(seed, name):
        meta = prepare(
            Corpus.from_texts(texts),
            tmp_path / name,
            bert,
            val_fraction=0.2,
            seed=seed,
            batch_docs=37,
            progress=False,
        )
        parts = {}
        for s in ("train", "val"):
            a = open_split(tmp_path / name, s)
            parts[s] = [
                bert.decode(a.tokens[a.docs[i] : a.docs[i + 1]], skip_special_tokens=True)
                for i in range(len(a.docs) - 1)
            ]
        return meta, parts

    meta, parts = split(0, "a")
    expected_val = split_is_val(0, np.arange(len(texts)), 0.2)
    assert parts["val"] == [t.strip() for t, v in zip(texts, expected_val) if v]
    assert parts["train"] == [t.strip() for t, v in zip(texts, expected_val) if not v]
    assert 30 < len(parts["val"]) < 90  # about 20% of 300
    assert split(0, "b")[1] == parts  # same seed, same split, whatever the batch size
    assert split(1, "c")[1]["val"] != parts["val"]


def test_at_least_one_val_document(tmp_path, bert):
    meta = prepare(
        Corpus.from_texts(["one doc", "two doc"]),
        tmp_path / "ds",
        bert,
        val_fraction=1e-9,
        progress=False,
    )
    assert meta["splits"]["val"]["docs"] == 1 and meta["splits"]["train"]["docs"] == 1
    load_dataset_meta(tmp_path / "ds")  # sizes on disk agree with meta after moving the document


def test_failed_prepare_leaves_nothing_that_looks_complete(tmp_path, bert):
    def broken():
        yield "a fine document"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare(Corpus.from_texts(broken), tmp_path / "new", bert, batch_docs=1, progress=False)
    assert not (tmp_path / "new").exists()  # we made the folder, so it goes

    prepare(Corpus.from_texts(DOCS), tmp_path / "old", bert, progress=False)
    with pytest.raises(DataError, match="no documents"):
        prepare(Corpus.from_texts(["   ", ""]), tmp_path / "old", bert, progress=False)
    assert sorted(p.name for p in (tmp_path / "old").iterdir() if ".tmp" in p.name) == []
    load_dataset_meta(tmp_path / "old")  # the previous dataset is untouched


def test_incomplete_or_missing_folder_errors(tmp_path, bert_dataset, bert, bpe):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_meta(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no meta.json"):
        load_dataset_meta(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in bert_dataset.iterdir():
        (broken / p.name).write_bytes(p.read_bytes()[: -2 if p.name == "train.tokens" else None])
    with pytest.raises(DataError, match="train.tokens has .* bytes, expected"):
        PackedBlocks(broken, "train", 8)
    with pytest.raises(
        DataError, match="vocabulary has 30522 tokens but this model/tokenizer has 600"
    ):
        check_vocab(bert_dataset, bpe)
    with pytest.raises(DataError, match="30522 tokens but this model/tokenizer has 50265"):
        check_vocab(bert_dataset, 50265)
    vocab = bert.get_vocab()
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]  # same size, different meaning
    specials = DEFAULT_SPECIALS["wordpiece"]
    with pytest.raises(DataError, match="another vocabulary of the same size"):
        check_vocab(bert_dataset, Tokenizer(build_wordpiece(vocab, specials), specials))


def test_default_dataset_is_made_once_and_reused(tmp_path, bert, monkeypatch):
    import mlm.dataset

    calls = []

    def tiny_corpus():
        calls.append(1)
        return Corpus.from_texts(DOCS, "tiny")

    monkeypatch.setattr(mlm.dataset, "default_corpus", tiny_corpus)
    monkeypatch.setenv("MLM_CACHE", str(tmp_path / "cache"))
    first = default_dataset(bert, progress=False)
    assert first.parent == tmp_path / "cache" and first.name.startswith("stdlib-py")
    assert default_dataset(bert, progress=False) == first and len(calls) == 1
    # another split of the documents is another folder, not the cached one under a wrong name
    other = default_dataset(bert, progress=False, val_fraction=0.05, seed=1)
    assert other != first and len(calls) == 2
    assert load_dataset_meta(other)["splits"] != load_dataset_meta(first)["splits"]


# ================================================================================== packing
def group_texts(docs_ids: list[list[int]], block_size: int) -> list[list[int]]:
    """HF run_mlm.py's layout: every document's ids end to end, cut into whole blocks, the rest
    dropped."""
    flat = [i for ids in docs_ids for i in ids]
    whole = len(flat) // block_size * block_size
    return [flat[i : i + block_size] for i in range(0, whole, block_size)]


@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
def test_packing_equals_group_texts(bert_dataset, bert, block_size):
    docs_ids = [bert.encode(d) for d in DOCS]
    expected = group_texts(docs_ids, block_size)
    blocks = PackedBlocks(bert_dataset, "train", block_size)
    assert len(blocks) == len(expected)
    batch = blocks.get(np.arange(len(blocks)))
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (
        len(expected),
        block_size,
    )
    assert batch["input_ids"].tolist() == expected
    assert batch["attention_mask"].eq(1).all()
    # A permuted request returns the same rows permuted.
    order = np.random.default_rng(0).permutation(len(blocks))
    assert torch.equal(blocks.get(order)["input_ids"], batch["input_ids"][torch.from_numpy(order)])


def test_pad_mode_keeps_every_token_and_numbers_documents(bert_dataset, bert):
    docs_ids = [bert.encode(d) for d in DOCS]
    flat = [i for ids in docs_ids for i in ids]
    doc_of = [d for d, ids in enumerate(docs_ids) for _ in ids]
    T = 7
    blocks = PackedBlocks(bert_dataset, "train", T, remainder="pad")
    assert len(blocks) == -(-len(flat) // T)
    batch = blocks.get(range(len(blocks)))
    real = batch["attention_mask"].flatten().bool()
    assert real.sum() == len(flat) and batch["input_ids"].flatten()[real].tolist() == flat
    assert batch["input_ids"].flatten()[~real].eq(bert.pad_token_id).all()

    doc_ids = batch["doc_ids"]
    assert doc_ids.dtype == torch.int32 and doc_ids.flatten()[~real].eq(-1).all()
    for b in range(len(blocks)):  # numbered from 0 within each block
        row = [doc_of[p] for p in range(b * T, min((b + 1) * T, len(flat)))]
        assert doc_ids[b, : len(row)].tolist() == [d - row[0] for d in row]

    words = open_split(bert_dataset, "train").words.astype(bool)
    starts = batch["word_starts"].flatten()[real].numpy()
    assert not words[::T].all()  # some block opens mid-word ...
    expected = words.copy()
    expected[::T] = True  # ... and that fragment is a word of its own
    assert (starts == expected).all() and not batch["word_starts"].flatten()[~real].any()
    special = batch["special_mask"].flatten()
    assert torch.equal(
        special[real], torch.isin(torch.tensor(flat), torch.tensor(bert.special_ids))
    )
    assert special[~real].all()


def test_block_size_and_remainder_errors(bert_dataset):
    message = (
        "block_size 1024 exceeds the model's max_position_embeddings 512; "
        "pass --block-size 512 or less"
    )
    with pytest.raises(ConfigError, match=message):
        PackedBlocks(bert_dataset, "train", 1024, max_positions=512)
    check_block_size(512, 512)
    with pytest.raises(DataError, match="less than one block"):
        PackedBlocks(bert_dataset, "train", 100_000)
    with pytest.raises(ConfigError, match="remainder"):
        PackedBlocks(bert_dataset, "train", 8, remainder="wrap")
    with pytest.raises(IndexError, match=r"block index out of range \[0, "):
        PackedBlocks(bert_dataset, "train", 8).get([10_000])


# ================================================================================== block order
def test_every_block_once_per_epoch_and_epochs_differ():
    N, seed = 103, 5
    blocks, epochs = blocks_at(np.arange(3 * N), N, seed)
    for e in range(3):
        assert (
            sorted(blocks[e * N : (e + 1) * N]) == list(range(N))
            and (epochs[e * N : (e + 1) * N] == e).all()
        )
    assert not np.array_equal(blocks[:N], blocks[N : 2 * N])
    assert not np.array_equal(blocks_at(np.arange(N), N, seed + 1)[0], blocks[:N])


@pytest.mark.parametrize("micro", [None, 2])
def test_ranks_disjoint_complete_and_independent_of_world_size(micro):
    N, G, seed = 50, 8, 3
    steps = 20  # 160 positions: more than three epochs, with batches straddling epoch ends
    single = BatchPlan(N, G, 1, 0, micro, seed)
    reference = [np.concatenate([b for b, _ in single.rows(s)]) for s in range(steps)]
    for W in (1, 2, 4):
        plans = [BatchPlan(N, G, W, r, micro, seed) for r in range(W)]
        for s in range(steps):
            parts = [plan.rows(s) for plan in plans]
            positions = np.concatenate([p for rank in parts for _, p in rank])
            blocks = np.concatenate([b for rank in parts for b, _ in rank])
            # disjoint and complete, in rank order
            assert positions.tolist() == stream_positions(s, G).tolist()
            assert blocks.tolist() == reference[s].tolist()  # the same global batch for every W
            if micro:
                assert all(len(b) == micro for rank in parts for b, _ in rank)
    # Over one epoch's stretch of the stream each block appears once.
    first_epoch = np.concatenate(reference)[:N]
    assert sorted(first_epoch) == list(range(N))


def test_resume_from_step_continues_the_stream():
    plan = BatchPlan(37, 6, seed=1)
    uninterrupted = [plan.rows(s) for s in range(15)]
    resumed = BatchPlan(37, 6, seed=1)  # a fresh process, starting at step 9
    for s in range(9, 15):
        for (b1, p1), (b2, p2) in zip(uninterrupted[s], resumed.rows(s)):
            assert np.array_equal(b1, b2) and np.array_equal(p1, p2)


def test_batch_plan_errors():
    with pytest.raises(
        ConfigError, match="global batch 12 is not a multiple of world size 2 x micro batch 4 = 8"
    ):
        BatchPlan(100, 12, world_size=2, rank=0, micro_batch=4)
    with pytest.raises(ConfigError, match="not a multiple of world size 4"):
        BatchPlan(100, 6, world_size=4, rank=0)
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        BatchPlan(100, 8, world_size=2, rank=2)


# ================================================================================== tokenizers
@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_trained_tokenizer_loads_in_transformers_with_same_ids(tmp_path, small_texts, kind, bpe):
    from transformers import AutoTokenizer

    tokenizer = bpe if kind == "bpe" else train_tokenizer(small_texts, "wordpiece", 800)
    assert tokenizer.kind == kind and tokenizer.vocab_size <= 800
    if kind == "wordpiece":
        assert [
            tokenizer.pad_token_id,
            tokenizer.unk_token_id,
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            tokenizer.mask_token_id,
        ] == [0, 1, 2, 3, 4]
    else:
        assert [
            tokenizer.cls_token_id,
            tokenizer.pad_token_id,
            tokenizer.sep_token_id,
            tokenizer.unk_token_id,
            tokenizer.mask_token_id,
        ] == [0, 1, 2, 3, 4]
    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    texts = (
        small_texts[:20]
        + DOCS
        + [f"a {tokenizer.mask_token} b", f"Upper CASE {tokenizer.mask_token}."]
    )
    for text in texts:
        assert hf(text)["input_ids"] == tokenizer.encode(text), text
    assert hf.mask_token_id == tokenizer.mask_token_id and hf.pad_token_id == tokenizer.pad_token_id


# ================================================================================= the command line
def run_prepare(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_cli_prepare_then_preview(tmp_path):
    write(tmp_path / "corpus" / "a.txt", "\n\n".join(DOCS * 3))
    write(tmp_path / "corpus" / "b.jsonl", "\n".join(json.dumps({"text": d}) for d in DOCS))
    out = tmp_path / "ds"
    done = run_prepare(
        "--data",
        tmp_path / "corpus",
        "--train-tokenizer",
        "wordpiece",
        "--vocab-size",
        300,
        "--out",
        out,
        "--quiet",
        "--val-fraction",
        0.1,
    )
    assert done.returncode == 0, done.stderr
    assert (
        f"Prepared {len(DOCS) * 4} documents" in done.stdout
        and "no undecodable bytes" in done.stdout
    )
    meta = load_dataset_meta(out)
    assert meta["docs"] == len(DOCS) * 4 and meta["splits"]["val"]["docs"] >= 1

    shown = run_prepare("--preview", out, "--block-size", 32, "-n", 2)
    assert shown.returncode == 0, shown.stderr
    rows = [line for line in shown.stdout.splitlines() if line.startswith(">>> ")]
    assert len(rows) == 2 and "targets:" in shown.stdout

    # With train.py's own flags, the masks training would use: the first blocks of step 0, whatever
    # the global batch, masked by the pipeline with those settings.
    flags = ["--block-size", 32, "--seed", 3, "--mlm-probability", 0.4, "--whole-word-mask"]
    shown = run_prepare("--preview", out, "-n", 3, *flags)
    assert shown.returncode == 0, shown.stderr
    cfg = parse_config([*map(str, flags), "--data", str(out), "--global-batch-size", "8"])
    tokenizer = Tokenizer.from_pretrained(out)
    blocks = PackedBlocks(out, "train", 32)
    plan = BatchPlan(len(blocks), 8, seed=3)
    step0 = pipeline.assemble(
        0, plan, blocks, pipeline.Masking.of(cfg, tokenizer), seed=3, doc_attention=False
    )[0]
    assert (
        shown.stdout.strip()
        == preview(
            tokenizer.decode, step0.input_ids, step0.labels, mask_token=tokenizer.mask_token, n=3
        ).strip()
    )
    # the flags count
    assert shown.stdout != run_prepare("--preview", out, "-n", 3, *flags[:4]).stdout


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, case, minilm_dir):
    data = (
        write(tmp_path / "empty.txt", "\n\n  \n") if case == "empty" else tmp_path / "missing.txt"
    )
    done = run_prepare(
        "--data", data, "--tokenizer", minilm_dir, "--out", tmp_path / "out", "--quiet"
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert ("no documents" if case == "empty" else "no such file") in done.stderr
    assert not (tmp_path / "out").exists()
