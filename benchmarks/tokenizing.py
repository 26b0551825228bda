"""Tokenizing a corpus: mlm.dataset.prepare plus reading every block back, against the bare
`tokenizers` encode_batch on the same texts (the least any pipeline must do), seconds."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import Row, alternate
from mlm.corpus import Corpus, default_corpus
from mlm.data import PackedBlocks
from mlm.dataset import prepare
from mlm.tokenizer import Tokenizer


def bench_tokenize(args, folder: Path) -> list[Row]:
    tokenizer = Tokenizer.from_pretrained(folder)
    corpus = default_corpus()
    texts = list(itertools.islice(corpus, args.corpus_docs)) if args.corpus_docs else list(corpus)
    scratch = Path(tempfile.mkdtemp(prefix="mlm-bench-tokens-"))

    def ours(i: int) -> None:
        out = scratch / f"run{i}"
        prepare(Corpus.from_texts(texts), out, tokenizer, progress=False)
        for split in ("train", "val"):
            blocks = PackedBlocks(out, split, 128, remainder="pad")
            blocks.get(np.arange(len(blocks)))

    def raw(i: int) -> None:
        tokenizer.backend.encode_batch(texts, add_special_tokens=True)

    try:
        times = alternate({"ours": ours, "hf": raw}, args.tokenize_reps, 1, lambda: None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tokens = sum(len(e.ids) for e in tokenizer.backend.encode_batch(texts, add_special_tokens=True))
    row = Row(
        section="tokenize",
        size=None,
        seq=128,
        dtype=None,
        metric="time",
        unit="s",
        ours=times.median("ours"),
        hf=times.median("hf"),
        higher_is_better=False,
        extra={"docs": len(texts), "tokens": tokens},
    )
    return times.stamp([row])
