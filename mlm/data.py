"""Data: text on disk → token arrays on disk → packed blocks of `block_size` tokens, in a seeded order.

This is Hugging Face's `run_mlm.py` recipe rebuilt by hand, one step per section below:

  1. Read documents from txt / jsonl / json / parquet files, folders and globs, streaming.   Corpus
     With no data at all, the standard library's docstrings are the corpus.                default_corpus
  2. Tokenize each document with its special tokens, `[CLS] doc [SEP]` or `<s> doc </s>`,   prepare
     exactly as `run_mlm.py` does before `group_texts`, and append the ids to flat arrays
     on disk, split into train/val by document. (Or first train a tokenizer.)              train_tokenizer
  3. Concatenate a split's tokens and cut them into blocks (`group_texts`).                 PackedBlocks
  4. Visit blocks in an order that depends on (seed, epoch) and never on the world size.    BatchPlan

A prepared dataset folder:
  train.tokens  val.tokens   token ids, flat: uint16 when the vocabulary fits, else uint32  (N,)
  train.docs    val.docs     int64 offset of each document's first token, then N           (n_docs + 1,)
  train.words   val.words    uint8, 1 where a token starts a word (for whole-word masking)  (N,)
  meta.json                  dtype, counts, vocabulary and tokenizer fingerprints, source
  tokenizer.json, tokenizer_config.json, special_tokens_map.json: the tokenizer that made the ids
meta.json is written last, so a folder without it never looks complete.

Shapes: B blocks (rows), T tokens per block.
"""

from __future__ import annotations

import ast
import functools
import glob
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from mlm.errors import ConfigError, DataError
from mlm.masking import row_seeds_for
from mlm.tokenizer import DEFAULT_SPECIALS, ROLES, Tokenizer, build_byte_level_bpe, build_wordpiece

FORMAT_VERSION = 1
SPLITS = ("train", "val")
ARRAYS = ("tokens", "docs", "words")  # one file of each per split: <split>.<array>
DOC_SPLITS = ("blank", "file", "line")
REMAINDERS = ("drop", "pad")
# Suffixes a folder is searched for; a file named explicitly is read whatever its suffix (as text if unknown).
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
REPLACEMENT = "\ufffd"  # what errors="replace" puts where bytes are not UTF-8
CACHE_ENV = "MLM_CACHE"
SPLIT_STREAM = -2  # row_seeds_for epoch of the train/val split (training epochs are >= 0, eval masks -1)


# ================================================================================ 1. reading a corpus
@dataclass
class ReadStats:
    """What one pass over a corpus found; reset at the start of every pass."""

    files: int = 0
    docs: int = 0
    bad_bytes: int = 0  # undecodable byte sequences, each replaced by one U+FFFD
    bad_lines: int = 0  # lines (or whole files, for --doc-split file) that held any
    bad_bytes_file: str | None = None  # the first file with some, for the summary
    skipped: int = 0  # JSON records whose text field was missing, not text, or empty


class Corpus:
    """Documents from files, folders (recursive) and globs, streamed one at a time.

    Iterate it as often as you like (training a tokenizer, then tokenizing): each pass re-reads the files
    and refills `stats`. Paths are resolved when the Corpus is made, so a missing path fails early.

    doc_split says where documents end in text files: "blank" (blank lines between paragraphs, HF's
    `sample_by="paragraph"`), "file" (one per file) or "line" (one per line, HF's default `text` loader,
    except that blank lines are skipped rather than kept as empty documents).

    text_field is the JSON / parquet field holding the text: a dotted path reaches into nested records,
    and a list of strings is joined with spaces, as HF's ELI5 recipe joins `answers.text`.
    """

    def __init__(
        self,
        inputs: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        text_field: str = "text",
        doc_split: str = "blank",
    ):
        if doc_split not in DOC_SPLITS:
            raise ConfigError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, not {doc_split!r}")
        if not text_field:
            raise ConfigError("text_field is empty; pass the JSON field that holds the text, e.g. --text-field text")
        inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        if not inputs:
            raise DataError("no data given; pass --data with a file, folder or glob")
        self.files = resolve_inputs(inputs)
        self.text_field = text_field
        self.doc_split = doc_split
        self.description = _describe(inputs, len(self.files))
        self.stats = ReadStats()
        self._texts: Callable[[], Iterable[str]] | None = None

    @classmethod
    def from_texts(cls, texts: Iterable[str] | Callable[[], Iterable[str]], description: str = "texts") -> "Corpus":
        """A corpus of strings already in hand; pass a function returning an iterable to stream a generator
        more than once."""
        corpus = cls.__new__(cls)
        corpus.files, corpus.text_field, corpus.doc_split = [], "text", "file"
        corpus.description, corpus.stats = description, ReadStats()
        corpus._texts = texts if callable(texts) else (lambda: texts)
        return corpus

    def __iter__(self) -> Iterator[str]:
        self.stats = stats = ReadStats()
        if self._texts is not None:
            documents = iter(self._texts())
        else:
            documents = (d for path in self.files for d in self._read(path, stats))
        for doc in documents:
            if doc and not doc.isspace():
                stats.docs += 1
                yield doc

    def _read(self, path: Path, stats: ReadStats) -> Iterator[str]:
        stats.files += 1
        kind = _kind(path)
        if kind == ".parquet":
            yield from read_parquet(path, self.text_field, stats)
        elif kind == ".jsonl":
            yield from read_jsonl(path, self.text_field, stats)
        elif kind == ".json":
            yield from read_json(path, self.text_field, stats)
        else:
            yield from read_text(path, self.doc_split, stats)

    def __repr__(self) -> str:
        return f"Corpus({self.description})"


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths, folders (searched recursively for SUFFIXES) and globs, in a fixed order."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and _kind(p) in SUFFIXES and not _hidden(p.relative_to(path))
            )
            if not found:
                raise DataError(f"folder {text!r} holds no {'/'.join(SUFFIXES)} files; point --data at the text")
            files += found
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"the glob {text!r} matches no files; check the pattern (quote it in the shell)")
            files += found
        else:
            raise DataError(f"no such file or folder: {text!r}; check the --data path")
    # A file named twice (a folder and a glob over it) is read once.
    return list(dict.fromkeys(files))


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _kind(path: Path) -> str:
    """The format suffix, looking through a trailing .gz (data.jsonl.gz is jsonl)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _describe(inputs: Sequence, n_files: int) -> str:
    named = ", ".join(str(i) for i in inputs[:3]) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
    return f"{named} ({n_files} file{'s' if n_files != 1 else ''})"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _decode(raw: bytes, stats: ReadStats, path: Path) -> str:
    """UTF-8 text; bytes that are not UTF-8 become U+FFFD and are counted rather than stopping the run."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # A U+FFFD spelled correctly in the file is text, not damage.
        stats.bad_bytes += text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode("utf-8"))
        stats.bad_lines += 1
        stats.bad_bytes_file = stats.bad_bytes_file or str(path)
        return text


def _lines(path: Path, stats: ReadStats) -> Iterator[str]:
    """Decoded lines of a (possibly gzipped) file, one at a time, without a leading byte-order mark."""
    with _open_binary(path) as f:
        for i, raw in enumerate(f):
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield _decode(raw, stats, path)


def read_text(path: Path, doc_split: str, stats: ReadStats) -> Iterator[str]:
    """Documents of a text file: the whole file, each non-empty line, or blank-line separated paragraphs."""
    if doc_split == "file":
        with _open_binary(path) as f:
            raw = f.read()
        yield _decode(raw.removeprefix(b"\xef\xbb\xbf"), stats, path).strip()
    elif doc_split == "line":
        for line in _lines(path, stats):
            yield line.strip()
    else:
        paragraph: list[str] = []
        for line in _lines(path, stats):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).strip()
                paragraph = []
        if paragraph:
            yield "".join(paragraph).strip()


def read_jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """The text field of each JSON record, one record per line."""
    for number, line in enumerate(_lines(path, stats), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number} is not valid JSON ({e.msg}); fix or remove that line") from None
        yield _counted(field_text(record, text_field), stats)


def read_json(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """The text field of each record of a JSON array. The array is loaded whole: use jsonl for big data."""
    with _open_binary(path) as f:
        text = _decode(f.read(), stats, path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix it or use jsonl") from None
    if not isinstance(records, list):
        raise DataError(f"{path} holds a JSON {type(records).__name__}, not an array of records; use jsonl or an array")
    for record in records:
        yield _counted(field_text(record, text_field), stats)


def read_parquet(path: Path, text_field: str, stats: ReadStats, batch_rows: int = 1024) -> Iterator[str]:
    """The text field of each row, read a batch of rows at a time (only the one column)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'mlm[parquet]'") from None
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    column = text_field if text_field in names else text_field.split(".")[0]
    if column not in names:
        raise DataError(f"{path} has no column {column!r} (it has {', '.join(names)}); pass --text-field")
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield _counted(field_text({column: value}, text_field), stats)


def _counted(text: str | None, stats: ReadStats) -> str:
    if not text or not text.strip():
        stats.skipped += 1
        return ""
    return text


def field_text(record: object, path: str) -> str | None:
    """The text at a dotted field path, or None when the record has none.

    Lists met on the way are mapped over (`answers.text` on {"answers": [{"text": ...}, ...]}), and a
    list of strings at the end is joined with single spaces, as HF's ELI5 recipe does with
    `" ".join(x)` after `flatten()`. A key that itself contains dots is found before it is split.
    """
    if isinstance(record, dict) and path in record:
        return _as_text(record[path])
    return _as_text(_walk(record, path.split(".")))


def _walk(value: object, keys: list[str]) -> object:
    for i, key in enumerate(keys):
        if isinstance(value, list):
            return [_walk(item, keys[i:]) for item in value]
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _as_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = [p for p in (_as_text(v) for v in value) if p]
        return " ".join(parts) if parts else None
    return None


# ------------------------------------------------------------------------- the built-in default corpus
# Folders of the standard library that are not its documentation: installed packages and test suites
# (whose docstrings are mostly one-liners and deliberately broken syntax).
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def default_corpus(min_words: int = 20) -> Corpus:
    """English text that every Python install has: the standard library's docstrings.

    The sources are parsed with `ast`, never imported (`this` and `antigravity` act on import). One
    document per module, class or function docstring of at least `min_words` words, in sorted path order,
    exact repeats dropped. CPython 3.11 gives about 3,500 documents, 225k words, 380k BERT tokens.
    """
    root = Path(sysconfig.get_paths()["stdlib"])

    def docstrings() -> Iterator[str]:
        seen: set[bytes] = set()
        for path in sorted(root.rglob("*.py")):
            if _STDLIB_SKIP & set(path.relative_to(root).parts):
                continue
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError):  # a few files exist to be unparseable
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split()) >= min_words:
                        key = hashlib.sha1(doc.encode("utf-8", "replace")).digest()
                        if key not in seen:
                            seen.add(key)
                            yield doc

    if not any(root.glob("*.py")):
        raise DataError(f"the standard library sources are not installed under {root}; pass --data with your own text")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Corpus.from_texts(docstrings, description=f"Python {version} standard library docstrings")


# ================================================================================= 2. tokenizers
def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int | None = None,
    *,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a BERT-style WordPiece or RoBERTa-style byte-level BPE vocabulary on texts.

    The trained vocabulary is then put through the same builders that load pretrained tokenizers, so a
    trained tokenizer and a downloaded one run the identical pipeline. vocab_size defaults to BERT's
    30522 or RoBERTa's 50265; a small corpus gives fewer. `lowercase` applies to WordPiece only: byte-level
    BPE keeps case, as RoBERTa does. Special tokens come first: [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4, or
    <s> <pad> </s> <unk> <mask> = 0..4 (RoBERTa's first four; its <mask> is last, ours is 4).
    """
    from tokenizers import Tokenizer as Backend, models, normalizers, pre_tokenizers, trainers

    if kind not in DEFAULT_SPECIALS:
        raise ConfigError(f"tokenizer kind must be wordpiece or bpe, not {kind!r}")
    specials = DEFAULT_SPECIALS[kind]
    order = ("pad", "unk", "cls", "sep", "mask") if kind == "wordpiece" else ("cls", "pad", "sep", "unk", "mask")
    special_tokens = [specials[role] for role in order]
    vocab_size = vocab_size or (30522 if kind == "wordpiece" else 50265)
    # Byte-level BPE starts from all 256 bytes; below that it could not spell every text.
    smallest = len(special_tokens) + (256 if kind == "bpe" else 1)
    if vocab_size < smallest:
        raise ConfigError(f"vocab_size {vocab_size} is too small for {kind}; pass --vocab-size {smallest} or more")

    if kind == "wordpiece":
        backend = Backend(models.WordPiece(unk_token=specials["unk"]))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens, show_progress=False
        )
    else:
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    backend.train_from_iterator(texts, trainer)

    trained = json.loads(backend.to_str())["model"]
    if len(trained["vocab"]) <= len(special_tokens):
        source = getattr(texts, "description", "the texts given")
        raise DataError(f"no documents in {source} to train a tokenizer on; check --data and --text-field")
    if kind == "wordpiece":
        rebuilt = build_wordpiece(trained["vocab"], specials, lowercase=lowercase)
        extra = {"do_lower_case": lowercase}
    else:
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
        rebuilt = build_byte_level_bpe(trained["vocab"], merges, specials, mask_lstrip=True)
        extra = {"add_prefix_space": False}
    return Tokenizer(rebuilt, specials, extra_config=extra)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer.json text that `Tokenizer.save` writes: names the whole pipeline."""
    return hashlib.sha256(tokenizer.backend.to_str(pretty=True).encode("utf-8")).hexdigest()


def vocab_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of the token → id table: equal exactly when token ids mean the same to two tokenizers,
    even when one was loaded from tokenizer.json and the other rebuilt from vocab.txt."""
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(by_id, ensure_ascii=False).encode("utf-8")).hexdigest()


# ================================================================================= 3. tokenizing to disk
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

    def __init__(self, folder: Path, split: str, dtype: np.dtype, tmp_suffix: str):
        self.dtype = dtype
        self.final = {kind: folder / f"{split}.{kind}" for kind in ARRAYS}
        self.tmp = {kind: path.with_name(path.name + tmp_suffix) for kind, path in self.final.items()}
        self.files = {kind: open(path, "wb") for kind, path in self.tmp.items()}
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
            f.flush()
        start, end = np.fromfile(self.tmp["docs"], dtype=np.int64, count=2, offset=(self.n_docs - 1) * 8)
        ids = np.fromfile(self.tmp["tokens"], dtype=self.dtype, count=end - start, offset=start * self.dtype.itemsize)
        words = np.fromfile(self.tmp["words"], dtype=np.uint8, count=end - start, offset=start)
        for kind, size in (("tokens", start * self.dtype.itemsize), ("words", start), ("docs", self.n_docs * 8)):
            self.files[kind].truncate(size)
            self.files[kind].seek(size)
        self.n_docs -= 1
        self.n_tokens = int(start)
        return ids, words, np.array([end - start], dtype=np.int64)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def commit(self) -> None:
        self.close()
        for kind in ARRAYS:
            os.replace(self.tmp[kind], self.final[kind])

    def discard(self) -> None:
        self.close()
        for path in self.tmp.values():
            path.unlink(missing_ok=True)


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
    Files are written under temporary names and renamed at the end; on any error they are removed.
    """
    corpus = inputs if isinstance(inputs, Corpus) else Corpus(inputs, text_field=text_field, doc_split=doc_split)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), not {val_fraction}; 0.01 keeps 1% of documents")
    if batch_docs < 1:
        raise ConfigError(f"batch_docs must be at least 1, not {batch_docs}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, not {seed}")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{str(out)!r} is a file; pass a folder for --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {str(out)!r} ({e.strerror}); pass another --out") from None
    dtype = token_dtype(tokenizer.vocab_size)
    tmp_suffix = f".tmp-{os.getpid()}"  # two processes preparing one folder never write the same file
    tmp_meta, tmp_tokenizer = out / f"meta.json{tmp_suffix}", out / f"tokenizer{tmp_suffix}"
    writers: dict[str, _SplitWriter] = {}
    started = time.perf_counter()
    try:
        for split in SPLITS:
            writers[split] = _SplitWriter(out, split, dtype, tmp_suffix)
        n_docs = 0
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

        stats = corpus.stats
        tokens = writers["train"].n_tokens + writers["val"].n_tokens
        if n_docs == 0 or tokens == 0:
            why = f", {stats.skipped} records without text in field {corpus.text_field!r}" if stats.skipped else ""
            raise DataError(f"no documents in {corpus.description}{why}; check --data and --text-field")
        # A split that came out empty borrows the last document of the other, so both are usable.
        if writers["train"].n_docs == 0:
            writers["train"].append(*writers["val"].pop_last())
        if val_fraction > 0 and writers["val"].n_docs == 0 and n_docs >= 2:
            writers["val"].append(*writers["train"].pop_last())

        seconds = time.perf_counter() - started
        meta = {
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
            "docs": n_docs,
            "tokens": tokens,
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
        tokenizer.save(tmp_tokenizer)
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # The old meta.json goes first: from here until the new one lands the folder reads as incomplete.
        (out / "meta.json").unlink(missing_ok=True)
        for writer in writers.values():
            writer.commit()
        for file in sorted(tmp_tokenizer.iterdir()):
            os.replace(file, out / file.name)
        os.replace(tmp_meta, out / "meta.json")
        tmp_tokenizer.rmdir()
        return meta
    except BaseException:
        for writer in writers.values():
            writer.discard()
        tmp_meta.unlink(missing_ok=True)
        shutil.rmtree(tmp_tokenizer, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
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
    itemsize = {"tokens": np.dtype(meta["dtype"]).itemsize, "docs": 8, "words": 1}
    for split in SPLITS:
        counts = meta["splits"][split]
        expected = {"tokens": counts["tokens"], "docs": counts["docs"] + 1, "words": counts["tokens"]}
        for kind in ARRAYS:
            file = folder / f"{split}.{kind}"
            size = file.stat().st_size if file.is_file() else None
            want = expected[kind] * itemsize[kind]
            if size != want:
                found = "is missing" if size is None else f"has {size} bytes, expected {want}"
                raise DataError(f"{file} {found}: the dataset is incomplete or damaged; {hint} again")
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
    tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> Path:
    """The default corpus prepared for this tokenizer, made once and then reused.

    The folder is `<cache>/stdlib-py3.11-<tokenizer sha256[:12]>`, where cache is cache_dir, else
    $MLM_CACHE, else ~/.cache/mlm: the Python version because the standard library differs between
    versions, the fingerprint because ids differ between tokenizers.
    """
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlm").expanduser()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = cache / f"stdlib-py{version}-{tokenizer_sha256(tokenizer)[:12]}"
    try:
        load_dataset_meta(folder)
        return folder
    except DataError:
        pass
    prepare(default_corpus(), folder, tokenizer, progress=progress)
    return folder


# ================================================================================ 4. packed blocks
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


# ================================================================================ 5. the order of blocks
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
