"""Reading a corpus: documents from txt / jsonl / json / parquet / arrow files, folders and globs,
one at a time.

A reader is a generator over one file: it takes the path, what it needs to find documents in it (the
doc_split of a text file, the text_field of JSON records) and the pass's `ReadStats`, and yields one
string per document, never holding more than a record or a paragraph in memory. Text is decoded as
UTF-8; bytes that are not become U+FFFD and are counted in the stats rather than stopping the run.
An empty string stands for a record without text: `Corpus` drops it, the stats count it.

A folder written by Hugging Face `datasets` (`save_to_disk`) is read through the shards its
state.json lists, in order; a DatasetDict folder (dataset_dict.json) gives every split, in the order
it lists them, as a folder of files gives every file: point at DIR/train to read one split. Parquet
and Arrow are read with pyarrow, one record batch at a time and only the text column.

With no data at all, `default_corpus` is English that every Python install has: the standard
library's docstrings.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlm.errors import ConfigError, DataError

DOC_SPLITS = ("blank", "file", "line")
# Suffixes a folder is searched for; a file named explicitly is read whatever its suffix (as text if
# unknown).
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow")
REPLACEMENT = "\ufffd"  # what errors="replace" puts where bytes are not UTF-8


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

    Iterate it as often as you like (training a tokenizer, then tokenizing): each pass re-reads the
    files and refills `stats`. Paths are resolved when the Corpus is made, so a missing path fails
    early.

    doc_split says where documents end in text files: "blank" (blank lines between paragraphs, HF's
    `sample_by="paragraph"`), "file" (one per file) or "line" (one per line, HF's default `text`
    loader, except that blank lines are skipped rather than kept as empty documents).

    text_field is the JSON / parquet / arrow field holding the text: a dotted path reaches into
    nested records, and a list of strings is joined with spaces, as HF's ELI5 recipe joins
    `answers.text`."""

    def __init__(
        self,
        inputs: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        text_field: str = "text",
        doc_split: str = "blank",
    ):
        if doc_split not in DOC_SPLITS:
            raise ConfigError(
                f"doc_split must be one of {', '.join(DOC_SPLITS)}, not {doc_split!r}"
            )
        if not text_field:
            raise ConfigError(
                "text_field is empty; pass the JSON field that holds the text, e.g. --text-field "
                "text"
            )
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
    def from_texts(
        cls, texts: Iterable[str] | Callable[[], Iterable[str]], description: str = "texts"
    ) -> Corpus:
        """A corpus of strings already in hand; pass a function returning an iterable to stream a
        generator more than once."""
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
        elif kind == ".arrow":
            yield from read_arrow(path, self.text_field, stats)
        elif kind == ".jsonl":
            yield from read_jsonl(path, self.text_field, stats)
        elif kind == ".json":
            yield from read_json(path, self.text_field, stats)
        else:
            yield from read_text(path, self.doc_split, stats)

    def __repr__(self) -> str:
        return f"Corpus({self.description})"


# -------------------------------------------------------------------------------------- which files
def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths, folders (searched recursively for SUFFIXES) and globs, in a fixed
    order."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = folder_files(path)
            if not found:
                raise DataError(
                    f"folder {text!r} holds no {'/'.join(SUFFIXES)} files; point --data at the text"
                )
            files += found
        elif glob.has_magic(text):
            found = sorted(
                Path(p)
                for p in glob.glob(os.path.expanduser(text), recursive=True)
                if Path(p).is_file()
            )
            if not found:
                raise DataError(
                    f"the glob {text!r} matches no files; check the pattern (quote it in the shell)"
                )
            files += found
        else:
            raise DataError(
                f"no such file or folder: {text!r}; check the path given to --data or --eval"
            )
    # A file named twice (a folder and a glob over it) is read once.
    return list(dict.fromkeys(files))


def folder_files(folder: Path) -> list[Path]:
    """The files of a folder with SUFFIXES, recursively, in sorted path order, skipping hidden names
    and symlinked folders; a `datasets` folder inside gives its data shards
    (saved_dataset_files)."""
    saved = saved_dataset_files(folder)
    if saved is not None:
        return saved
    found: list[Path] = []
    # Names sorted within each folder, depth first: the order of sorting whole paths part by part.
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            found += folder_files(entry)
        elif entry.is_file() and _kind(entry) in SUFFIXES:
            found.append(entry)
    return found


def saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow shards of a folder written by `datasets`' save_to_disk, in order; None if it is not
    one.

    A Dataset folder's state.json lists its shards (data-00000-of-00002.arrow, ...). Only those are
    read: `datasets` also keeps cache files (cache-*.arrow, written by .map on a loaded dataset) in
    the folder. A DatasetDict folder's dataset_dict.json lists its splits, each a Dataset folder;
    all are read."""
    splits = _json_object(folder / "dataset_dict.json").get("splits")
    if isinstance(splits, list):
        files = []
        for split in splits:
            shards = saved_dataset_files(folder / str(split))
            if shards is None:
                raise DataError(
                    f"{folder} lists the split {split!r} but {folder / str(split)} is not a saved "
                    "dataset (no state.json); save the DatasetDict again"
                )
            files += shards
        return files
    shards = _json_object(folder / "state.json").get("_data_files")
    if not isinstance(shards, list):
        return None
    paths = [folder / shard["filename"] for shard in shards]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"the saved dataset {folder} lacks {', '.join(missing)}; save it again with "
            "save_to_disk"
        )
    return paths


def _json_object(path: Path) -> dict:
    """A small JSON file's object, or {} when there is none (no file, not JSON, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _kind(path: Path) -> str:
    """The format suffix, looking through a trailing .gz (data.jsonl.gz is jsonl)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _describe(inputs: Sequence, n_files: int) -> str:
    named = ", ".join(str(i) for i in inputs[:3]) + (
        f" and {len(inputs) - 3} more" if len(inputs) > 3 else ""
    )
    return f"{named} ({n_files} file{'s' if n_files != 1 else ''})"


# ---------------------------------------------------------------------- the readers, one per format
def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _decode(raw: bytes, stats: ReadStats, path: Path) -> str:
    """UTF-8 text; bytes that are not UTF-8 become U+FFFD and are counted rather than stopping the
    run."""
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
    """Decoded lines of a (possibly gzipped) file, one at a time, without a leading byte-order
    mark."""
    with _open_binary(path) as f:
        for i, raw in enumerate(f):
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield _decode(raw, stats, path)


def read_text(path: Path, doc_split: str, stats: ReadStats) -> Iterator[str]:
    """Documents of a text file: the whole file, each non-empty line, or blank-line separated
    paragraphs."""
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
            raise DataError(
                f"{path}:{number} is not valid JSON ({e.msg}); fix or remove that line"
            ) from None
        yield _counted(field_text(record, text_field), stats)


def read_json(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """The text field of each record of a JSON array. The array is loaded whole: use jsonl for big
    data."""
    with _open_binary(path) as f:
        text = _decode(f.read(), stats, path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix it or use jsonl"
        ) from None
    if not isinstance(records, list):
        raise DataError(
            f"{path} holds a JSON {type(records).__name__}, not an array of records; use jsonl or "
            "an array"
        )
    for record in records:
        yield _counted(field_text(record, text_field), stats)


def read_parquet(
    path: Path, text_field: str, stats: ReadStats, batch_rows: int = 1024
) -> Iterator[str]:
    """The text field of each row, read a batch of rows at a time (only the one column)."""
    pyarrow = _pyarrow(path)
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        column = _text_column(parquet.schema_arrow.names, text_field, path)
        batches = parquet.iter_batches(batch_size=batch_rows, columns=[column])
        yield from _column_texts(batches, column, text_field, stats, batch_rows)
    except (pyarrow.ArrowException, OSError) as e:  # pyarrow reports short reads as OSError
        raise DataError(f"{path} is not a readable parquet file ({e}); check the file") from None


def read_arrow(
    path: Path, text_field: str, stats: ReadStats, batch_rows: int = 1024
) -> Iterator[str]:
    """The text field of each row of an Arrow IPC file, a record batch at a time (only the one
    column).

    `datasets` writes its shards and caches in the IPC *stream* format; `pyarrow.ipc.new_file` and
    Feather v2 write the *file* format, which starts with the magic bytes ARROW1. Both are read from
    a memory map, so a batch is paged in only when it is read."""
    pyarrow = _pyarrow(path)
    try:
        with pyarrow.memory_map(str(path)) as source:
            file_format = source.read(6) == b"ARROW1"
            source.seek(0)
            if file_format:
                reader = pyarrow.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                reader = batches = pyarrow.ipc.open_stream(source)
            column = _text_column(reader.schema.names, text_field, path)
            yield from _column_texts(batches, column, text_field, stats, batch_rows)
    except (pyarrow.ArrowException, OSError) as e:  # pyarrow reports short reads as OSError
        raise DataError(f"{path} is not a readable Arrow IPC file ({e}); check the file") from None


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'mlm[parquet]'") from None
    return pyarrow


def _text_column(names: list[str], text_field: str, path: Path) -> str:
    """The column holding text_field: the field itself, or the first part of a dotted path into a
    struct."""
    column = text_field if text_field in names else text_field.split(".")[0]
    if column not in names:
        raise DataError(
            f"{path} has no column {column!r} (it has {', '.join(names)}); pass --text-field"
        )
    return column


def _column_texts(
    batches: Iterable, column: str, text_field: str, stats: ReadStats, batch_rows: int
) -> Iterator[str]:
    """The text of each row of one column over record batches, at most batch_rows Python values at a
    time."""
    for batch in batches:
        values = batch.column(column)
        for start in range(0, len(values), batch_rows):
            for value in values.slice(start, batch_rows).to_pylist():
                yield _counted(field_text({column: value}, text_field), stats)


def _counted(text: str | None, stats: ReadStats) -> str:
    if not text or not text.strip():
        stats.skipped += 1
        return ""
    return text


# --------------------------------------------------------------- dotted field paths in JSON records
def field_text(record: object, path: str) -> str | None:
    """The text at a dotted field path, or None when the record has none.

    Lists met on the way are mapped over (`answers.text` on {"answers": [{"text": ...}, ...]}), and
    a list of strings at the end is joined with single spaces, as HF's ELI5 recipe does with `"
    ".join(x)` after `flatten()`. A key that itself contains dots is found before it is split."""
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


# ------------------------------------------------------------------------- the built-in default
# corpus Folders of the standard library that are not its documentation: installed packages and test
# suites (whose docstrings are mostly one-liners and deliberately broken syntax).
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def default_corpus(min_words: int = 20) -> Corpus:
    """English text that every Python install has: the standard library's docstrings.

    The sources are parsed with `ast`, never imported (`this` and `antigravity` act on import). One
    document per module, class or function docstring of at least `min_words` words, in sorted path
    order, exact repeats dropped. CPython 3.11 gives about 3,500 documents, 225k words, 380k BERT
    tokens."""
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
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split()) >= min_words:
                        key = hashlib.sha1(doc.encode("utf-8", "replace")).digest()
                        if key not in seen:
                            seen.add(key)
                            yield doc

    if not any(root.glob("*.py")):
        raise DataError(
            f"the standard library sources are not installed under {root}; pass --data with your "
            "own text"
        )
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Corpus.from_texts(
        docstrings, description=f"Python {version} standard library docstrings"
    )
