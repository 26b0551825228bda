"""Data: text on disk → token arrays on disk → packed blocks of `block_size` tokens, in a seeded order.

This is Hugging Face's `run_mlm.py` recipe rebuilt by hand; steps 2-4 are the sections of this module:

  1. Read documents from txt / jsonl / json / parquet files, folders and globs,   mlm.corpus.Corpus
     streaming. With no data at all, the standard library's docstrings.          mlm.corpus.default_corpus
     (Or first train a tokenizer on them.)                                       mlm.tokenizer_train.train_tokenizer
  2. Tokenize each document with its special tokens, `[CLS] doc [SEP]` or         prepare
     `<s> doc </s>`, exactly as `run_mlm.py` does before `group_texts`, and
     append the ids to flat arrays on disk, split into train/val by document.
  3. Concatenate a split's tokens and cut them into blocks (`group_texts`).       PackedBlocks
  4. Visit blocks in an order that depends on (seed, epoch), never on the         BatchPlan
     world size.

A prepared dataset folder:
  train.tokens  val.tokens   token ids, flat: uint16 when the vocabulary fits, else uint32  (N,)
  train.docs    val.docs     int64 offset of each document's first token, then N           (n_docs + 1,)
  train.words   val.words    uint8, 1 where a token starts a word (for whole-word masking)  (N,)
  meta.json                  dtype, counts, vocabulary and tokenizer fingerprints, source
  tokenizer.json, tokenizer_config.json, special_tokens_map.json: the tokenizer that made the ids
Every file is written under a temporary name and renamed into place (mlm.io.AtomicFile), meta.json last,
so a folder without it never looks complete.

Shapes: B blocks (rows), T tokens per block.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

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
REMAINDERS = ("drop", "pad")
CACHE_ENV = "MLM_CACHE"
SPLIT_STREAM = -2  # row_seeds_for epoch of the train/val split (training epochs are >= 0, eval masks -1)


# ================================================================================= 2. tokenizing to disk
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever the ids fit (BERT's 30522, RoBERTa's 50265)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_is_val(seed: int, doc_index: np.ndarray, val_fraction: float) -> np.ndarray:
    """Whether each document goes to validation: a hash of (seed, doc index) below val_fraction.

    Stateless, so the split of document i never depends on batching, other documents, or the machine.
    The hash is the one that seeds masks (`mlm.masking.row_seeds_for`), on a stream of its own.
    """
    z = row_seeds_for(seed, torch.from_numpy(np.asarray(doc_index, dtype=np.int64)), epoch=SPLIT_STREAM)
    uniform = ((z >> 11) & ((1 << 53) - 1)).double() / 2**53  # [0, 1) from the top 53 bits
    return (uniform < val_fraction).numpy()


def encode_documents(tokenizer: Tokenizer, docs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids with special tokens, word-start flags and lengths for a batch of documents.

    Returns ids (N,) int64, words (N,) uint8, lengths (n_docs,) int64, where N = lengths.sum(). The Rust
    library encodes the batch on all cores; turning its output into arrays is one pass per field.
    """
    encodings = tokenizer.encode_batch(docs, add_special_tokens=True)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
    # Word ids are per document, None at special tokens; NaN stands in for None (NaN != anything).
    word = np.array([w for e in encodings for w in e.word_ids], dtype=np.float64)
    starts = np.ones(len(word), dtype=bool)
    starts[1:] = ~(word[1:] == word[:-1])  # a token continues a word when its word id equals the last one's
    boundaries = np.cumsum(lengths)[:-1]
    starts[boundaries[boundaries < len(starts)]] = True  # every document starts a word, whatever its ids say
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
        self.files["docs"].write(np.zeros(1, dtype=np.int64).tobytes())  # the first document starts at 0

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
        ids = np.fromfile(tmp["tokens"], dtype=self.dtype, count=end - start, offset=start * self.dtype.itemsize)
        words = np.fromfile(tmp["words"], dtype=np.uint8, count=end - start, offset=start)
        for kind, size in (("tokens", start * self.dtype.itemsize), ("words", start), ("docs", self.n_docs * 8)):
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
    corpus = inputs if isinstance(inputs, Corpus) else Corpus(inputs, text_field=text_field, doc_split=doc_split)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), not {val_fraction}; 0.01 keeps 1% of documents")
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
        n_docs = _tokenize_into(writers, corpus, tokenizer, val_fraction, seed, batch_docs, progress)

        stats = corpus.stats
        if n_docs == 0 or writers["train"].n_tokens + writers["val"].n_tokens == 0:
            why = f", {stats.skipped} records without text in field {corpus.text_field!r}" if stats.skipped else ""
            raise DataError(f"no documents in {corpus.description}{why}; check --data and --text-field")
        # A split that came out empty borrows the last document of the other, so both are usable.
        if writers["train"].n_docs == 0:
            writers["train"].append(*writers["val"].pop_last())
        if val_fraction > 0 and writers["val"].n_docs == 0 and n_docs >= 2:
            writers["val"].append(*writers["train"].pop_last())

        meta = _meta(tokenizer, corpus, writers, dtype, val_fraction, seed, time.perf_counter() - started)
        _commit(out, writers, tokenizer, meta)
        return meta
    except BaseException:
        for writer in writers.values():
            writer.discard()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _make_folder(out: Path) -> bool:
    """Create the output folder if need be; True when this call created it (so a failure removes it)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{str(out)!r} is a file; pass a folder for --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {str(out)!r} ({e.strerror}); pass another --out") from None
    return created


def _tokenize_into(
    writers: dict[str, _SplitWriter], corpus: Corpus, tokenizer: Tokenizer,
    val_fraction: float, seed: int, batch_docs: int, progress: bool,
) -> int:
    """Encode the corpus a batch of documents at a time, each document appended to its split's files.
    Returns the number of documents read."""
    n_docs = 0
    started = time.perf_counter()
    with tqdm(unit=" docs", desc="tokenizing", disable=not progress, file=sys.stderr, mininterval=0.5) as bar:
        for docs in _batches(corpus, batch_docs):
            ids, words, lengths = encode_documents(tokenizer, docs)
            is_val = split_is_val(seed, np.arange(n_docs, n_docs + len(docs)), val_fraction)
            token_is_val = np.repeat(is_val, lengths)  # (N,) each token follows its document
            writers["val"].append(ids[token_is_val], words[token_is_val], lengths[is_val])
            writers["train"].append(ids[~token_is_val], words[~token_is_val], lengths[~is_val])
            n_docs += len(docs)
            bar.update(len(docs))
            tokens = writers["train"].n_tokens + writers["val"].n_tokens
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):,.0f} tokens/s", refresh=False)
    return n_docs


def _meta(
    tokenizer: Tokenizer, corpus: Corpus, writers: dict[str, _SplitWriter],
    dtype: np.dtype, val_fraction: float, seed: int, seconds: float,
) -> dict:
    """meta.json: what the arrays hold, which tokenizer made them, where the text came from and how it read."""
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
    """Put the arrays, the tokenizer and meta.json in place, in that order: the folder reads as a dataset
    only once all of it is there."""
    staged: list[AtomicFile] = []
    try:
        for name, text in {**tokenizer.files(), "meta.json": json.dumps(meta, indent=2) + "\n"}.items():
            staged.append(AtomicFile(out / name, "w"))
            staged[-1].write(text)
        # The old meta.json goes first: from here until the new one lands the folder reads as incomplete.
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
            f"{str(folder)!r} is not a prepared dataset, or its preparation did not finish (no meta.json); {hint}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg}); {hint} again") from None
    if meta.get("format") != "mlm-tokens" or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} is not an mlm dataset of format version {FORMAT_VERSION}; {hint} again")
    try:
        itemsize = {"tokens": np.dtype(meta["dtype"]).itemsize, "docs": 8, "words": 1}
        counts = {split: meta["splits"][split] for split in SPLITS}
        for key in ("vocab_size", "special_ids", "all_special_ids"):  # read later: a missing one is damage now
            meta[key]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path} lacks {e} or is malformed: the dataset is damaged; {hint} again") from None
    for split in SPLITS:
        expected = {"tokens": counts[split]["tokens"], "docs": counts[split]["docs"] + 1, "words": counts[split]["tokens"]}
        for kind in ARRAYS:
            file = folder / f"{split}.{kind}"
            size = file.stat().st_size if file.is_file() else None
            want = expected[kind] * itemsize[kind]
            if size != want:
                found = "is missing" if size is None else f"has {size} bytes, expected {want}"
                raise DataError(f"{file} {found}: the dataset is incomplete or damaged; {hint} again")
        # The document offsets must run from 0 to the token count: a cheap check that catches mixed-up files.
        offsets = np.fromfile(folder / f"{split}.docs", dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != counts[split]["tokens"] or (offsets[1:] < offsets[:-1]).any():
            raise DataError(f"{folder / (split + '.docs')} does not match {split}.tokens: the dataset is damaged; "
                            f"{hint} again")
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

    return TokenArrays(mapped("tokens", np.dtype(meta["dtype"])), mapped("docs", np.int64), mapped("words", np.uint8))


def check_vocab(meta: dict | str | os.PathLike, tokenizer_or_vocab_size: Tokenizer | int) -> None:
    """Raise DataError unless the dataset's token ids mean the same to this tokenizer or model.

    A Tokenizer must have the dataset's exact token → id table; a bare vocab_size (a model config's) must
    equal the dataset's, since ids from a different vocabulary would train silently on nonsense.
    """
    if not isinstance(meta, dict):
        meta = load_dataset_meta(meta)
    fix = "prepare the data again with this model's tokenizer (prepare.py --tokenizer MODEL_DIR)"
    if isinstance(tokenizer_or_vocab_size, Tokenizer):
        vocab_size = tokenizer_or_vocab_size.vocab_size
        if vocab_size == meta["vocab_size"] and vocab_sha256(tokenizer_or_vocab_size) == meta["vocab_sha256"]:
            return
        if vocab_size == meta["vocab_size"]:
            raise DataError(f"the dataset was tokenized with another vocabulary of the same size ({vocab_size}); {fix}")
    else:
        vocab_size = int(tokenizer_or_vocab_size)
        if vocab_size == meta["vocab_size"]:
            return
    raise DataError(
        f"the dataset's vocabulary has {meta['vocab_size']} tokens but this model/tokenizer has {vocab_size}; {fix}"
    )


def default_dataset(
    tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None, *, progress: bool = True, make: bool = True
) -> Path:
    """The default corpus prepared for this tokenizer, made once and then reused (make=False: only its path).

    The folder is `<cache>/stdlib-py3.11-<tokenizer sha256[:12]>`, where cache is cache_dir, else
    $MLM_CACHE, else ~/.cache/mlm: the Python version because the standard library differs between
    versions, the fingerprint because ids differ between tokenizers.
    """
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlm").expanduser()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = cache / f"stdlib-py{version}-{tokenizer_sha256(tokenizer)[:12]}"
    if not make:
        return folder
    try:
        load_dataset_meta(folder)
        return folder
    except DataError:
        pass
    prepare(default_corpus(), folder, tokenizer, progress=progress)
    return folder


# ================================================================================ a batch
class Batch(NamedTuple):
    """Masked blocks as the model takes them: one type for training, validation and `infer.py --eval`."""

    input_ids: torch.Tensor  # (B, T) the masked ids the model sees
    labels: torch.Tensor  # (B, T) the original ids where masked, IGNORE_INDEX elsewhere
    attention_mask: torch.Tensor | None = None  # (B, T) 1 on real tokens; None: all real (training blocks)
    doc_ids: torch.Tensor | None = None  # (B, T) with doc_attention: attention kept within documents

    def rows(self, rows: slice) -> Batch:
        return Batch(*(None if t is None else t[rows] for t in self))

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        # non_blocking: from pinned memory the copy overlaps the compute already queued on the GPU.
        return Batch(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> Batch:
        return Batch(*(None if t is None else t.pin_memory() for t in self))


# ================================================================================ 3. packed blocks
def check_block_size(
    block_size: int, max_positions: int | None = None, name: str = "max_position_embeddings"
) -> None:
    """A block must fit the model's position table (for RoBERTa pass the usable count: the table minus 2)."""
    if block_size < 1:
        raise ConfigError(f"block_size must be at least 1, not {block_size}")
    if max_positions is not None and block_size > max_positions:
        raise ConfigError(
            f"block_size {block_size} exceeds the model's {name} {max_positions}; "
            f"pass --block-size {max_positions} or less"
        )


class PackedBlocks:
    """A split seen as HF's `group_texts` sees it: all tokens end to end, cut into blocks of block_size.

    Documents keep their special tokens, so a block reads `[CLS] end of doc 1 [SEP] [CLS] doc 2 ...`.
    remainder="drop" drops the last partial block, as `group_texts` does; "pad" keeps it, padded with
    the pad id where attention_mask is 0. Getting blocks is index arithmetic over memory-mapped arrays.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        block_size: int = 128,
        *,
        remainder: str = "drop",
        max_positions: int | None = None,
    ):
        check_block_size(block_size, max_positions)
        if remainder not in REMAINDERS:
            raise ConfigError(f"remainder must be drop or pad, not {remainder!r}")
        self.meta = load_dataset_meta(data_dir)
        self.arrays = open_split(data_dir, split, self.meta)
        self.split, self.block_size, self.remainder = split, block_size, remainder
        self.folder, self.vocab_size = Path(data_dir), self.meta["vocab_size"]
        self.num_tokens = len(self.arrays.tokens)
        rounding = math.ceil if remainder == "pad" else math.floor
        self.num_blocks = rounding(self.num_tokens / block_size)
        if self.num_blocks == 0:
            raise DataError(
                f"the {split} split of {data_dir} has {self.num_tokens} tokens, less than one block of {block_size}; "
                "use a smaller block size, remainder='pad', or more data"
            )
        self.pad_token_id = self.meta["special_ids"]["pad"]
        self.special_ids = np.array(self.meta["all_special_ids"], dtype=np.int64)

    def __len__(self) -> int:
        return self.num_blocks

    def get(self, block_indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Blocks by index, as tensors of shape (B, T):

        input_ids       int64  token ids; pad id after the end of the split
        attention_mask  int64  1 on real tokens, 0 on padding
        word_starts     bool   True where a word begins; the first token of a block always does
        doc_ids         int32  which document each token is in, numbered 0, 1, ... within the block
                               (for attention kept inside documents); -1 on padding
        special_mask    bool   True on special tokens and padding (never masked)
        """
        index = np.asarray(block_indices, dtype=np.int64).reshape(-1)  # (B,)
        if len(index) and (index.min() < 0 or index.max() >= self.num_blocks):
            raise IndexError(f"block index out of range [0, {self.num_blocks})")
        T = self.block_size
        position = index[:, None] * T + np.arange(T)  # (B, T) token offsets into the split
        real = position < self.num_tokens  # (B, T) False only in the padded tail of the last block
        position = np.minimum(position, self.num_tokens - 1)

        ids = np.where(real, self.arrays.tokens[position], self.pad_token_id).astype(np.int64)  # (B, T)
        if ids.size and ids.max() >= self.vocab_size:  # ids another tokenizer made, or damaged bytes
            raise DataError(f"the {self.split} split of {self.folder} holds token id {ids.max()}, beyond its "
                            f"vocabulary of {self.vocab_size}: the dataset is damaged; prepare it again")
        # A block can start mid-word; that fragment is a word of its own here, as in HF's whole-word collator.
        word_starts = real & (self.arrays.words[position] != 0)
        word_starts[:, 0] = real[:, 0]
        doc = np.searchsorted(self.arrays.docs, position, side="right") - 1  # (B, T) document index in the split
        doc_ids = np.where(real, doc - doc[:, :1], -1).astype(np.int32)
        special = np.isin(ids, self.special_ids) | ~real
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "word_starts": torch.from_numpy(word_starts),
            "doc_ids": torch.from_numpy(doc_ids),
            "special_mask": torch.from_numpy(special),
        }


# ================================================================================ 4. the order of blocks
# Training reads one infinite stream of block indices: epoch 0's permutation, then epoch 1's, ... Global
# step s takes stream positions [s*G, (s+1)*G). Rank r of W takes rows [r*G/W, (r+1)*G/W) of that,
# cut into micro-batches in order. The global batch never depends on W, and masks are seeded by stream
# position, so a run is the same whatever the layout, and resuming at step s is just starting there.
def stream_positions(step: int, global_batch: int) -> np.ndarray:
    """The stream positions optimizer step `step` consumes: (global_batch,) int64."""
    return np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The order of blocks in one epoch: a permutation of range(num_blocks) seeded by (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_blocks)
    order.flags.writeable = False  # shared through the cache
    return order


def blocks_at(positions: Sequence[int] | np.ndarray, num_blocks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Block index and epoch at each stream position: (block_indices, epochs), both like positions."""
    positions = np.asarray(positions, dtype=np.int64)
    if num_blocks < 1:
        raise DataError("there are no blocks to train on; use more data or a smaller block size")
    if seed < 0 or (positions.size and positions.min() < 0):
        raise ConfigError("seed and stream positions must be >= 0")
    epochs, offsets = np.divmod(positions, num_blocks)
    blocks = np.empty_like(positions)
    for epoch in np.unique(epochs):  # one or two epochs per batch, unless a batch holds more than an epoch
        here = epochs == epoch
        blocks[here] = epoch_permutation(num_blocks, seed, int(epoch))[offsets[here]]
    return blocks, epochs


class BatchPlan:
    """Which blocks this rank trains on at each step, as micro-batches.

    global_batch blocks per optimizer step, split evenly over world_size ranks, each rank's share cut
    into micro-batches of micro_batch blocks (default: the whole share, no accumulation).
    """

    def __init__(
        self,
        num_blocks: int,
        global_batch: int,
        world_size: int = 1,
        rank: int = 0,
        micro_batch: int | None = None,
        seed: int = 0,
    ):
        if global_batch < 1 or world_size < 1:
            raise ConfigError(f"global batch ({global_batch}) and world size ({world_size}) must be at least 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if global_batch % world_size:
            raise ConfigError(
                f"global batch {global_batch} is not a multiple of world size {world_size}; change --global-batch-size"
            )
        micro_batch = micro_batch or global_batch // world_size
        if micro_batch < 1 or global_batch % (world_size * micro_batch):
            raise ConfigError(
                f"global batch {global_batch} is not a multiple of world size {world_size} x micro batch "
                f"{micro_batch} = {world_size * micro_batch}; change --global-batch-size or --micro-batch-size"
            )
        if num_blocks < 1:
            raise DataError("there are no blocks to train on; use more data or a smaller block size")
        self.num_blocks, self.global_batch, self.seed = num_blocks, global_batch, seed
        self.world_size, self.rank, self.micro_batch = world_size, rank, micro_batch
        self.per_rank = global_batch // world_size
        self.accumulation_steps = self.per_rank // micro_batch

    def rows(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's micro-batches at `step`: [(block_indices, stream_positions)], each (micro_batch,)."""
        first = self.rank * self.per_rank
        positions = stream_positions(step, self.global_batch)[first : first + self.per_rank]  # (per_rank,)
        blocks, _ = blocks_at(positions, self.num_blocks, self.seed)
        m = self.micro_batch
        return [(blocks[i : i + m], positions[i : i + m]) for i in range(0, self.per_rank, m)]

    def epoch(self, step: int) -> float:
        """Epochs completed before `step` (fractional)."""
        return step * self.global_batch / self.num_blocks
