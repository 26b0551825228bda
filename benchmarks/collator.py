"""Masking a batch: mlm.masking.mask_tokens against transformers' DataCollatorForLanguageModeling,
blocks/s."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import Row, alternate
from mlm.corpus import default_corpus
from mlm.masking import mask_tokens, row_seeds_for
from mlm.tokenizer import Tokenizer


def text_blocks(tokenizer: Tokenizer, n: int, seq: int) -> torch.Tensor:
    """n blocks of seq real tokens: default-corpus documents, [CLS] doc [SEP], end to end, cut
    (group_texts)."""
    ids: list[int] = []
    for doc in default_corpus():
        ids += tokenizer.encode(doc)
        if len(ids) >= n * seq:
            break
    return torch.tensor(ids[: n * seq]).view(n, seq)  # (B, T)


def bench_collator(args, folder: Path) -> list[Row]:
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer = Tokenizer.from_pretrained(folder)
    blocks = text_blocks(tokenizer, args.collator_blocks, 128)  # (B, T)
    # HF's collator is called on a list of examples, as a DataLoader over a tokenized dataset hands
    # them over. Ours masks the (B, T) tensor of a batch, two ways: with row seeds (a hash of each
    # row's place in the data stream, as train.py does, so masks never depend on the layout) and
    # with a torch.Generator.
    examples = [{"input_ids": row} for row in blocks.tolist()]
    collate = DataCollatorForLanguageModeling(
        AutoTokenizer.from_pretrained(folder), mlm_probability=0.15
    )
    specials = dict(
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=tokenizer.vocab_size,
        special_ids=tokenizer.special_ids,
    )
    positions = torch.arange(len(blocks))
    generator = torch.Generator().manual_seed(0)
    calls = {
        "row seeds": lambda i: mask_tokens(
            blocks, row_seeds=row_seeds_for(0, positions + i * len(blocks)), **specials
        ),
        "generator": lambda i: mask_tokens(blocks, generator=generator, **specials),
        "hf": lambda i: collate(examples),
    }
    # A loader calls its collator batch after batch, so each timed sample is a burst of consecutive
    # calls. Alternating single calls instead would start every call of ours right after HF's much
    # longer Python call, with cold caches and idle vector units: a cost of the comparison, not of
    # either collator.
    burst = args.collator_burst
    runs = {
        name: (lambda i, call=call: [call(i * burst + j) for j in range(burst)])
        for name, call in calls.items()
    }
    times = alternate(runs, args.collator_reps, 2, lambda: None)
    n = len(blocks) * burst
    return times.stamp(
        [
            Row(
                section="collator",
                size=None,
                seq=128,
                dtype=None,
                metric="throughput",
                variant=variant,
                unit="blocks/s",
                ours=n / times.median(variant),
                hf=n / times.median("hf"),
                higher_is_better=True,
                batch=len(blocks),
            )
            for variant in ("row seeds", "generator")
        ]
    )
