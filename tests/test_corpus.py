"""Reading a corpus: every format, folders and globs, `datasets` folders, and the default corpus.

The references are the texts themselves (what was written is what is read, in order), and for the
formats pyarrow reads, the same texts read from jsonl: the same documents and the same token ids.
"""

import gzip
import itertools
import json
import sys
from pathlib import Path

import pytest

from mlm.corpus import Corpus, ReadStats, default_corpus, field_text, read_arrow
from mlm.dataset import prepare
from mlm.errors import ConfigError, DataError
from mlm.tokenizer import Tokenizer

TEXTS = [
    "The first document, with a few words.",
    "Héllo wörld — accents, dashes and “quotes”.",
    "",  # a record without text: skipped and counted
    "Numbers like 3.14159 and 2,718 appear too.",
    "A last one, a little longer than the others so the blocks differ.",
    "Short.",
]
NON_EMPTY = [t for t in TEXTS if t]


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ================================================================================== text and JSON
def test_txt_blank_line_and_file_and_line_splits(tmp_path):
    f = write(tmp_path / "a.txt", "first para\ncontinues here\n\n\n  \nsecond para\n\nthird\n")
    assert list(Corpus(f)) == ["first para\ncontinues here", "second para", "third"]
    assert list(Corpus(f, doc_split="file")) == [
        "first para\ncontinues here\n\n\n  \nsecond para\n\nthird"
    ]
    assert list(Corpus(f, doc_split="line")) == [
        "first para",
        "continues here",
        "second para",
        "third",
    ]
    with pytest.raises(ConfigError, match="doc_split"):
        Corpus(f, doc_split="sentence")


def test_jsonl_nested_list_field_joined_like_eli5(tmp_path):
    records = [
        {"title": "q1", "answers": {"text": ["First answer.", "Second answer."], "score": [3, 1]}},
        # a list on the way
        {"title": "q2", "answers": [{"text": "as a list"}, {"text": "of records"}]},
        {"title": "q3"},  # no field: skipped and counted
        {"title": "q4", "answers": {"text": []}},  # empty list: skipped
        {"title": "q5", "answers.text": "a literal dotted key"},
    ]
    f = write(tmp_path / "eli5.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    corpus = Corpus(f, text_field="answers.text")
    # HF's ELI5 recipe: flatten() then " ".join(x) over answers.text.
    assert list(corpus) == [
        "First answer. Second answer.",
        "as a list of records",
        "a literal dotted key",
    ]
    assert corpus.stats.skipped == 2 and corpus.stats.docs == 3
    assert list(Corpus(f, text_field="title")) == ["q1", "q2", "q3", "q4", "q5"]
    assert field_text({"a": {"b": 7}}, "a.b") is None  # not text


def test_json_array_gzip_and_bad_json(tmp_path):
    write(tmp_path / "arr.json", json.dumps([{"text": "one"}, {"text": "two"}]))
    with gzip.open(tmp_path / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "three"}\n')
    assert list(Corpus([tmp_path / "arr.json", tmp_path / "more.jsonl.gz"])) == [
        "one",
        "two",
        "three",
    ]
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        list(Corpus(bad))


def test_folders_recursive_and_globs_in_sorted_order(tmp_path):
    write(tmp_path / "d" / "b.txt", "from b")
    write(tmp_path / "d" / "sub" / "a.txt", "from sub/a")
    write(tmp_path / "d" / "a.jsonl", '{"text": "from a.jsonl"}\n')
    write(tmp_path / "d" / "notes.bin", b"\x00\x01 not text")  # unknown suffix in a folder: ignored
    write(tmp_path / "d" / ".hidden" / "c.txt", "hidden")  # hidden folders: ignored
    write(tmp_path / "raw", "named explicitly, so read as text")
    corpus = Corpus([tmp_path / "d", str(tmp_path / "d" / "**" / "*.txt"), tmp_path / "raw"])
    assert list(corpus) == [
        "from a.jsonl",
        "from b",
        "from sub/a",
        "named explicitly, so read as text",
    ]
    assert corpus.stats.files == 4  # the glob's files were already in the folder: read once
    with pytest.raises(DataError, match="no such file or folder"):
        Corpus(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="matches no files"):
        Corpus(str(tmp_path / "*.nothing"))


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    good_fffd = "\ufffd".encode()  # a replacement character spelled correctly is text, not damage
    f = write(
        tmp_path / "bad.txt", b"ok line\nbad \xff\xfe here\n\n" + good_fffd + b" fine \xc3\nend\n"
    )
    corpus = Corpus(f)
    docs = list(corpus)
    assert docs == ["ok line\nbad \ufffd\ufffd here", "\ufffd fine \ufffd\nend"]
    assert corpus.stats.bad_bytes == 3 and corpus.stats.bad_lines == 2
    assert corpus.stats.bad_bytes_file == str(f)


# ========================================================================= parquet, arrow, datasets
try:
    import pyarrow as pa
except ImportError:
    pa = None
needs_pyarrow = pytest.mark.skipif(
    pa is None, reason="pyarrow not installed: pip install 'mlm[parquet]'"
)


def wikipedia_table(texts: list[str]):
    """Rows as Wikipedia dumps have them: id, url, title, text."""
    n = len(texts)
    return pa.table(
        {
            "id": [str(i) for i in range(n)],
            "url": [f"https://w/{i}" for i in range(n)],
            "title": [f"T{i}" for i in range(n)],
            "text": texts,
        }
    )


def write_arrow(path: Path, table, file_format: bool = False, batch_rows: int = 2) -> Path:
    """Arrow IPC as `datasets` writes it (the stream format), or the file format; several record
    batches."""
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_file if file_format else pa.ipc.new_stream)(sink, table.schema)
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
        writer.close()
    return path


@pytest.fixture(scope="module")
def from_jsonl(tmp_path_factory, minilm_dir):
    """The TEXTS read from jsonl: (documents, token ids after prepare) to compare every other format
    with."""
    folder = tmp_path_factory.mktemp("jsonl")
    path = write(folder / "t.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tokenizer = Tokenizer.from_pretrained(minilm_dir)
    return list(Corpus(path)), prepared_ids(path, tokenizer, folder / "prepared"), tokenizer


def prepared_ids(data, tokenizer, out: Path) -> bytes:
    """The token ids prepare.py writes for the data, as they lie on disk."""
    prepare(data, out, tokenizer, val_fraction=0.0, progress=False)
    return (out / "train.tokens").read_bytes()


def assert_same_as_jsonl(data, from_jsonl, tmp_path, **corpus_kwargs) -> None:
    docs, ids, tokenizer = from_jsonl
    corpus = Corpus(data, **corpus_kwargs)
    assert list(corpus) == docs and corpus.stats.skipped == 1
    assert prepared_ids(corpus, tokenizer, tmp_path / "prepared") == ids


@needs_pyarrow
def test_parquet_reads_only_the_text_column(tmp_path, from_jsonl, monkeypatch):
    import pyarrow.parquet as pq

    pq.write_table(wikipedia_table(TEXTS), tmp_path / "wiki.parquet", row_group_size=2)
    columns_read = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        columns_read.append(kwargs.get("columns"))
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert_same_as_jsonl(tmp_path / "wiki.parquet", from_jsonl, tmp_path)
    assert columns_read and all(c == ["text"] for c in columns_read)
    assert list(Corpus(tmp_path / "wiki.parquet", text_field="title")) == [
        f"T{i}" for i in range(len(TEXTS))
    ]


@needs_pyarrow
def test_parquet_with_nested_list_column(tmp_path):
    import pyarrow.parquet as pq

    table = pa.table(
        {"id": [1, 2, 3], "answers": [{"text": ["a b", "c"]}, {"text": ["d"]}, {"text": []}]}
    )
    pq.write_table(table, tmp_path / "t.parquet")
    corpus = Corpus(tmp_path / "t.parquet", text_field="answers.text")
    assert list(corpus) == ["a b c", "d"] and corpus.stats.skipped == 1
    with pytest.raises(DataError, match="no column 'body'"):
        list(Corpus(tmp_path / "t.parquet", text_field="body"))


@needs_pyarrow
@pytest.mark.parametrize("file_format", [False, True], ids=["stream", "file"])
def test_bare_arrow_files_in_both_ipc_formats(tmp_path, from_jsonl, file_format):
    table = wikipedia_table(TEXTS).cast(
        pa.schema(
            [
                ("id", pa.string()),
                ("url", pa.string()),
                ("title", pa.string()),
                ("text", pa.large_string()),
            ]
        )
    )
    path = write_arrow(tmp_path / "wiki.arrow", table, file_format)
    assert_same_as_jsonl(path, from_jsonl, tmp_path)
    # Python values are made a slice of rows at a time, whatever the size of the record batches.
    stats = ReadStats()
    assert [
        t for t in read_arrow(path, "text", stats, batch_rows=1) if t
    ] == NON_EMPTY and stats.skipped == 1
    with pytest.raises(DataError, match="has no column 'body'"):
        list(Corpus(path, text_field="body"))


@needs_pyarrow
def test_arrow_streams_batch_by_batch_and_damage_is_one_line(tmp_path):
    path = write_arrow(
        tmp_path / "s.arrow", pa.table({"text": [f"row {i}" for i in range(6)]}), batch_rows=2
    )
    data = path.read_bytes()
    # the end-of-stream marker and part of the last batch's body
    path.write_bytes(data[: len(data) - 20])
    # The first batch is read before the damage is reached: one record batch at a time.
    assert list(itertools.islice(Corpus(path), 2)) == ["row 0", "row 1"]
    with pytest.raises(DataError, match="s.arrow is not a readable Arrow IPC file"):
        list(Corpus(path))
    write(tmp_path / "junk.arrow", b"not arrow at all")
    with pytest.raises(DataError, match="junk.arrow is not a readable Arrow IPC file"):
        list(Corpus(tmp_path / "junk.arrow"))


@needs_pyarrow
def test_datasets_save_to_disk_folder(tmp_path, from_jsonl):
    datasets = pytest.importorskip("datasets")
    rows = {
        "id": list(range(len(TEXTS))),
        "text": TEXTS,
        "meta": [{"title": f"T{i}"} for i in range(len(TEXTS))],
    }
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder), num_shards=3)
    assert len(list(folder.glob("data-*.arrow"))) == 3
    # datasets keeps cache files beside the shards (from .map on a loaded dataset): not data, not
    # read.
    write_arrow(
        folder / "cache-0123456789abcdef.arrow", pa.table({"text": ["a cached map result"]})
    )
    assert_same_as_jsonl(folder, from_jsonl, tmp_path)
    assert list(Corpus(folder, text_field="meta.title")) == [f"T{i}" for i in range(len(TEXTS))]

    # Inside a plain folder, beside other files, it is read in its sorted place, the same way.
    write(tmp_path / "mixed" / "a.txt", "first")
    datasets.Dataset.from_dict({"text": ["second", "third"]}).save_to_disk(
        str(tmp_path / "mixed" / "b")
    )
    write(tmp_path / "mixed" / "c.jsonl", '{"text": "fourth"}\n')
    assert list(Corpus(tmp_path / "mixed")) == ["first", "second", "third", "fourth"]

    (folder / "data-00001-of-00003.arrow").unlink()
    with pytest.raises(DataError, match="lacks data-00001-of-00003.arrow"):
        Corpus(folder)


@needs_pyarrow
def test_datasets_dict_folder_reads_every_split_in_its_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {"train": ["t1", "t2", "t3"], "validation": ["v1"], "test": ["x1", "x2"]}
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}
    ).save_to_disk(str(folder))
    # as listed, not sorted (test < train)
    assert list(Corpus(folder)) == ["t1", "t2", "t3", "v1", "x1", "x2"]
    assert list(Corpus(folder / "test")) == ["x1", "x2"]  # one split: its folder
    # a glob sorts
    assert list(Corpus(str(folder / "*" / "data-*.arrow"))) == ["x1", "x2", "t1", "t2", "t3", "v1"]

    for name in ("dataset_info.json", "state.json"):
        (folder / "validation" / name).unlink()
    with pytest.raises(DataError, match="lists the split 'validation'"):
        Corpus(folder)


def test_pyarrow_formats_without_pyarrow_name_the_extra(tmp_path, monkeypatch):
    write(tmp_path / "t.parquet", b"PAR1 not really")
    write(tmp_path / "t.arrow", b"\xff\xff\xff\xff not really")
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import pyarrow...` raise ImportError
    for path in (tmp_path / "t.parquet", tmp_path / "t.arrow"):
        with pytest.raises(DataError, match=r"pip install 'mlm\[parquet\]'"):
            list(Corpus(path))


# =============================================================================== the default corpus
def test_default_corpus_is_many_real_english_documents():
    corpus = default_corpus()
    docs = list(itertools.islice(corpus, 1001))
    assert len(docs) == 1001 and len(set(docs)) == 1001
    assert all(len(d.split()) >= 20 for d in docs)
    words = " ".join(docs).lower().split()
    for common in ("the", "a", "is", "of", "to", "and"):
        assert words.count(common) > 500, common
    assert list(itertools.islice(default_corpus(), 5)) == docs[:5]  # deterministic order
    assert "standard library" in corpus.description
