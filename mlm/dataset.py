"""A prepared dataset: documents tokenized into flat arrays on disk, and opening one again.

Step 2 of the recipe in mlm/data.py: each document is tokenized with its special tokens, `[CLS] doc
[SEP]` or `<s> doc </s>`, exactly as `run_mlm.py` does before `group_texts`, and its ids are
appended to flat arrays on disk, the documents split into train/val by a hash of their index.

A prepared dataset folder:
  train.tokens  val.tokens   (N,) token ids, flat: uint16 when the vocabulary fits, else uint32
  train.docs    val.docs     (n_docs + 1,) int64 offset of each document's first token, then N
  train.words   val.words    (N,) uint8, 1 where a token starts a word (for whole-word masking)
  meta.json                  dtype, counts, vocabulary and tokenizer fingerprints, source
  tokenizer.json, tokenizer_config.json, special_tokens_map.json: the tokenizer that made the ids
Every file is written under a temporary name and renamed into place (mlm.io.AtomicFile), meta.json
last, so a folder without it never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mlm.corpus import Corpus, default_corpus
from mlm.errors import ConfigError, DataError
from mlm.io import AtomicFile
from mlm.masking import row_seeds_for
from mlm.tokenizer import ROLES, Tokenizer, tokenizer_sha256, vocab_sha256

FORMAT_VERSION = 1
SPLITS = ("train", "val")
ARRAYS = ("tokens", "docs", "words")  # one file of each per split: <split>.<array>
CACHE_ENV = "MLM_CACHE"
# row_seeds_for epoch of the train/val split (training epochs are >= 0, eval masks -1)
SPLIT_STREAM = -2


# ============================================================================= tokenizing to disk
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever the ids fit (BERT's 30522, RoBERTa's
    50265)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_is_val(seed: int, doc_index: np.ndarray, val_fraction: float) -> np.ndarray:
    """Whether each document goes to validation: a hash of (seed, doc index) below val_fraction.

    Stateless, so the split of document i never depends on batching, other documents, or the
    machine. The hash is the one that seeds masks (`mlm.masking.row_seeds_for`), on a stream of its
    own."""
    z = row_seeds_for(
        seed, torch.from_numpy(np.asarray(doc_index, dtype=np.int64)), epoch=SPLIT_STREAM
    )
    uniform = ((z >> 11) & ((1 << 53) - 1)).double() / 2**53  # [0, 1) from the top 53 bits
    return (uniform < val_fraction).numpy()


def encode_documents(
    tokenizer: Tokenizer, docs: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids with special tokens, word-start flags and lengths for a batch of documents.

    Returns ids (N,) int64, words (N,) uint8, lengths (n_docs,) int64, where N = lengths.sum(). The
    Rust library encodes the batch on all cores; turning its output into arrays is one pass per
    field."""
    encodings = tokenizer.encode_batch(docs, add_special_tokens=True)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(
        (i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum())
    )
    # Word ids are per document, None at special tokens; NaN stands in for None (NaN != anything).
    word = np.array([w for e in encodings for w in e.word_ids], dtype=np.float64)
    starts = np.ones(len(word), dtype=bool)
    # a token continues a word when its word id equals the last one's
    starts[1:] = ~(word[1:] == word[:-1])
    boundaries = np.cumsum(lengths)[:-1]
    # every document starts a word, whatever its ids say
    starts[boundaries[boundaries < len(starts)]] = True
    return ids, starts.astype(np.uint8), lengths


class _SplitWriter:
    """Appends documents to one split's three files, kept under temporary names until `commit`."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.dtype = dtype
        self.files: dict[str, AtomicFile] = {}
        try:
            for kind in ARRAYS:
                self.files[kind] = AtomicFile(folder / f"{split}.{kind}")
        except BaseException:
            self.discard()
            raise
        self.n_docs = 0
        self.n_tokens = 0
        # the first document starts at 0
        self.files["docs"].write(np.zeros(1, dtype=np.int64).tobytes())

    def append(self, ids: np.ndarray, words: np.ndarray, lengths: np.ndarray) -> None:
        self.files["tokens"].write(ids.astype(self.dtype).tobytes())
        self.files["words"].write(words.astype(np.uint8).tobytes())
        self.files["docs"].write((self.n_tokens + np.cumsum(lengths, dtype=np.int64)).tobytes())
        self.n_docs += len(lengths)
        self.n_tokens += len(ids)

    def pop_last(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Take the last document back out (ids, words, lengths), shortening the files."""
        for f in self.files.values():
            f.file.flush()
        tmp = {kind: f.tmp for kind, f in self.files.items()}
        start, end = np.fromfile(tmp["docs"], dtype=np.int64, count=2, offset=(self.n_docs - 1) * 8)
        ids = np.fromfile(
            tmp["tokens"], dtype=self.dtype, count=end - start, offset=start * self.dtype.itemsize
        )
        words = np.fromfile(tmp["words"], dtype=np.uint8, count=end - start, offset=start)
        for kind, size in (
            ("tokens", start * self.dtype.itemsize),
            ("words", start),
            ("docs", self.n_docs * 8),
        ):
            self.files[kind].file.truncate(size)
            self.files[kind].file.seek(size)
        self.n_docs -= 1
        self.n_tokens = int(start)
        return ids, words, np.array([end - start], dtype=np.int64)

    def commit(self) -> None:
        for f in self.files.values():
            f.commit()

    def discard(self) -> None:
        for f in self.files.values():
            f.discard()


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(
    inputs: Corpus | str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    text_field: str = "text",
    doc_split: str = "blank",
    val_fraction: float = 0.01,
    seed: int = 0,
    batch_docs: int = 2000,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus into a dataset folder (see the module docstring) and return its meta.json.

    Documents stream through in batches of `batch_docs`, so memory stays bounded whatever the corpus
    size. Document i goes to validation when a hash of (seed, i) falls below val_fraction; with
    val_fraction > 0 and at least two documents, validation gets at least one (the last document).
    Files are written under temporary names and renamed at the end; on any error they are removed,
    and so is the folder if this call created it.
    """
    corpus = (
        inputs
        if isinstance(inputs, Corpus)
        else Corpus(inputs, text_field=text_field, doc_split=doc_split)
    )
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction must be in [0, 1), not {val_fraction}; 0.01 keeps 1% of documents"
        )
    if batch_docs < 1:
        raise ConfigError(f"batch_docs must be at least 1, not {batch_docs}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, not {seed}")

    out = Path(out_dir)
    created = _make_folder(out)
    dtype = token_dtype(tokenizer.vocab_size)
    writers: dict[str, _SplitWriter] = {}
    started = time.perf_counter()
    try:
        for split in SPLITS:
            writers[split] = _SplitWriter(out, split, dtype)
        n_docs = _tokenize_into(
            writers, corpus, tokenizer, val_fraction, seed, batch_docs, progress
        )

        stats = corpus.stats
        if n_docs == 0 or writers["train"].n_tokens + writers["val"].n_tokens == 0:
            why = (
                f", {stats.skipped} records without text in field {corpus.text_field!r}"
                if stats.skipped
                else ""
            )
            raise DataError(
                f"no documents in {corpus.description}{why}; check --data and --text-field"
            )
        # A split that came out empty borrows the last document of the other, so both are usable.
        if writers["train"].n_docs == 0:
            writers["train"].append(*writers["val"].pop_last())
        if val_fraction > 0 and writers["val"].n_docs == 0 and n_docs >= 2:
            writers["val"].append(*writers["train"].pop_last())

        meta = _meta(
            tokenizer, corpus, writers, dtype, val_fraction, seed, time.perf_counter() - started
        )
        _commit(out, writers, tokenizer, meta)
        return meta
    except BaseException:
        for writer in writers.values():
            writer.discard()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _make_folder(out: Path) -> bool:
    """Create the output folder if need be; True when this call created it (so a failure removes
    it)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{str(out)!r} is a file; pass a folder for --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {str(out)!r} ({e.strerror}); pass another --out") from None
    return created


def _tokenize_into(
    writers: dict[str, _SplitWriter],
    corpus: Corpus,
    tokenizer: Tokenizer,
    val_fraction: float,
    seed: int,
    batch_docs: int,
    progress: bool,
) -> int:
    """Encode the corpus a batch of documents at a time, each document appended to its split's
    files. Returns the number of documents read."""
    n_docs = 0
    started = time.perf_counter()
    with tqdm(
        unit=" docs", desc="tokenizing", disable=not progress, file=sys.stderr, mininterval=0.5
    ) as bar:
        for docs in _batches(corpus, batch_docs):
            ids, words, lengths = encode_documents(tokenizer, docs)
            is_val = split_is_val(seed, np.arange(n_docs, n_docs + len(docs)), val_fraction)
            token_is_val = np.repeat(is_val, lengths)  # (N,) each token follows its document
            writers["val"].append(ids[token_is_val], words[token_is_val], lengths[is_val])
            writers["train"].append(ids[~token_is_val], words[~token_is_val], lengths[~is_val])
            n_docs += len(docs)
            bar.update(len(docs))
            tokens = writers["train"].n_tokens + writers["val"].n_tokens
            bar.set_postfix_str(
                f"{tokens / (time.perf_counter() - started):,.0f} tokens/s", refresh=False
            )
    return n_docs


def _meta(
    tokenizer: Tokenizer,
    corpus: Corpus,
    writers: dict[str, _SplitWriter],
    dtype: np.dtype,
    val_fraction: float,
    seed: int,
    seconds: float,
) -> dict:
    """meta.json: what the arrays hold, which tokenizer made them, where the text came from and how
    it read."""
    stats = corpus.stats
    return {
        "format": "mlm-tokens",
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "special_ids": {role: getattr(tokenizer, f"{role}_token_id") for role in ROLES},
        "all_special_ids": list(tokenizer.special_ids),
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_sha256": vocab_sha256(tokenizer),
        "source": corpus.description,
        "text_field": corpus.text_field if corpus.files else None,
        "doc_split": corpus.doc_split if corpus.files else None,
        "docs": sum(w.n_docs for w in writers.values()),
        "tokens": sum(w.n_tokens for w in writers.values()),
        "splits": {s: {"docs": w.n_docs, "tokens": w.n_tokens} for s, w in writers.items()},
        "bad_bytes": stats.bad_bytes,
        "bad_lines": stats.bad_lines,
        "bad_bytes_file": stats.bad_bytes_file,
        "skipped_records": stats.skipped,
        "files": stats.files,
        "val_fraction": val_fraction,
        "seed": seed,
        "seconds": round(seconds, 3),
    }


def _commit(out: Path, writers: dict[str, _SplitWriter], tokenizer: Tokenizer, meta: dict) -> None:
    """Put the arrays, the tokenizer and meta.json in place, in that order: the folder reads as a
    dataset only once all of it is there."""
    staged: list[AtomicFile] = []
    try:
        for name, text in {
            **tokenizer.files(),
            "meta.json": json.dumps(meta, indent=2) + "\n",
        }.items():
            staged.append(AtomicFile(out / name, "w"))
            staged[-1].write(text)
        # The old meta.json goes first: from here until the new one lands the folder reads as
        # incomplete.
        (out / "meta.json").unlink(missing_ok=True)
        for writer in writers.values():
            writer.commit()
        for file in staged:  # meta.json is the last of them
            file.commit()
    except BaseException:
        for file in staged:
            file.discard()
        raise


# ================================================================================ opening a dataset
def load_dataset_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a prepared folder, after checking the arrays on disk are all there and whole."""
    folder = Path(data_dir)
    hint = f"run `python prepare.py --out {folder}` to make it"
    if not folder.is_dir():
        raise DataError(f"dataset folder {str(folder)!r} does not exist; {hint}")
    path = folder / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{str(folder)!r} is not a prepared dataset, or its preparation did not finish (no "
            f"meta.json); {hint}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg}); {hint} again") from None
    if meta.get("format") != "mlm-tokens" or meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path} is not an mlm dataset of format version {FORMAT_VERSION}; {hint} again"
        )
    try:
        itemsize = {"tokens": np.dtype(meta["dtype"]).itemsize, "docs": 8, "words": 1}
        counts = {split: meta["splits"][split] for split in SPLITS}
        # read later: a missing one is damage now
        for key in ("vocab_size", "special_ids", "all_special_ids"):
            meta[key]
    except (KeyError, TypeError) as e:
        raise DataError(
            f"{path} lacks {e} or is malformed: the dataset is damaged; {hint} again"
        ) from None
    for split in SPLITS:
        expected = {
            "tokens": counts[split]["tokens"],
            "docs": counts[split]["docs"] + 1,
            "words": counts[split]["tokens"],
        }
        for kind in ARRAYS:
            file = folder / f"{split}.{kind}"
            size = file.stat().st_size if file.is_file() else None
            want = expected[kind] * itemsize[kind]
            if size != want:
                found = "is missing" if size is None else f"has {size} bytes, expected {want}"
                raise DataError(
                    f"{file} {found}: the dataset is incomplete or damaged; {hint} again"
                )
        # The document offsets must run from 0 to the token count: a cheap check that catches
        # mixed-up files.
        offsets = np.fromfile(folder / f"{split}.docs", dtype=np.int64)
        if (
            offsets[0] != 0
            or offsets[-1] != counts[split]["tokens"]
            or (offsets[1:] < offsets[:-1]).any()
        ):
            raise DataError(
                f"{folder / (split + '.docs')} does not match {split}.tokens: the dataset is "
                "damaged; "
                f"{hint} again"
            )
    return meta


@dataclass
class TokenArrays:
    """One split's arrays, memory-mapped (read-only): nothing is loaded until it is indexed."""

    tokens: np.ndarray  # (N,) uint16 | uint32
    docs: np.ndarray  # (n_docs + 1,) int64
    words: np.ndarray  # (N,) uint8


def open_split(data_dir: str | os.PathLike, split: str, meta: dict | None = None) -> TokenArrays:
    if split not in SPLITS:
        raise ConfigError(f"split must be train or val, not {split!r}")
    meta = meta or load_dataset_meta(data_dir)
    folder = Path(data_dir)

    def mapped(kind: str, dtype) -> np.ndarray:
        path = folder / f"{split}.{kind}"
        if path.stat().st_size == 0:  # mmap refuses empty files
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    return TokenArrays(
        mapped("tokens", np.dtype(meta["dtype"])),
        mapped("docs", np.int64),
        mapped("words", np.uint8),
    )


def check_vocab(meta: dict | str | os.PathLike, tokenizer_or_vocab_size: Tokenizer | int) -> None:
    """Raise DataError unless the dataset's token ids mean the same to this tokenizer or model.

    A Tokenizer must have the dataset's exact token → id table; a bare vocab_size (a model config's)
    must equal the dataset's, since ids from a different vocabulary would train silently on
    nonsense."""
    if not isinstance(meta, dict):
        meta = load_dataset_meta(meta)
    fix = "prepare the data again with this model's tokenizer (prepare.py --tokenizer MODEL_DIR)"
    if isinstance(tokenizer_or_vocab_size, Tokenizer):
        vocab_size = tokenizer_or_vocab_size.vocab_size
        if (
            vocab_size == meta["vocab_size"]
            and vocab_sha256(tokenizer_or_vocab_size) == meta["vocab_sha256"]
        ):
            return
        if vocab_size == meta["vocab_size"]:
            raise DataError(
                "the dataset was tokenized with another vocabulary of the same size "
                f"({vocab_size}); {fix}"
            )
    else:
        vocab_size = int(tokenizer_or_vocab_size)
        if vocab_size == meta["vocab_size"]:
            return
    raise DataError(
        f"the dataset's vocabulary has {meta['vocab_size']} tokens but this model/tokenizer has "
        f"{vocab_size}; {fix}"
    )


def default_dataset(
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    make: bool = True,
    val_fraction: float = 0.01,
    seed: int = 0,
) -> Path:
    """The default corpus prepared for this tokenizer and split, made once and then reused
    (make=False: only its path).

    The folder is `<cache>/stdlib-py3.11-<tokenizer sha256[:12]>-val0.02-seed0`, where cache is
    cache_dir, else $MLM_CACHE, else ~/.cache/mlm: the Python version because the standard library
    differs between versions, the fingerprint because ids differ between tokenizers, the split's
    settings because they choose the documents held out.
    """
    cache = Path(
        cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlm"
    ).expanduser()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    split = f"val{val_fraction:g}-seed{seed}"
    folder = cache / f"stdlib-py{version}-{tokenizer_sha256(tokenizer)[:12]}-{split}"
    if not make:
        return folder
    try:
        load_dataset_meta(folder)
        return folder
    except DataError:
        pass
    prepare(
        default_corpus(), folder, tokenizer, val_fraction=val_fraction, seed=seed, progress=progress
    )
    return folder
