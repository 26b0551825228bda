"""Data: text on disk → token arrays on disk → packed blocks of `block_size` tokens, in a seeded
order.

This is Hugging Face's `run_mlm.py` recipe rebuilt by hand:

  1. Read documents from txt / jsonl / json / parquet files,      mlm.corpus.Corpus
     folders and globs, streaming; with no data at all, the
     standard library's docstrings                                  mlm.corpus.default_corpus
     (or first train a tokenizer on them)                           mlm.tokenizer_train
  2. Tokenize each document with its special tokens, and append     mlm.dataset.prepare
     the ids to flat arrays on disk, split into train/val by
     document (the folder's layout is in mlm/dataset.py).
  3. Concatenate a split's tokens and cut them into blocks          PackedBlocks
     (`group_texts`).
  4. Visit blocks in an order that depends on (seed, epoch), never  BatchPlan
     on the world size.

Steps 3 and 4 are this module's, with the type of a batch the model takes.

Shapes: B blocks (rows), T tokens per block.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mlm.dataset import load_dataset_meta, open_split
from mlm.errors import ConfigError, DataError

REMAINDERS = ("drop", "pad")


# ================================================================================ a batch
class Batch(NamedTuple):
    """Masked blocks as the model takes them: one type for training, validation and `infer.py
    --eval`."""

    input_ids: torch.Tensor  # (B, T) the masked ids the model sees
    labels: torch.Tensor  # (B, T) the original ids where masked, IGNORE_INDEX elsewhere
    # (B, T) 1 on real tokens; None: all real (training blocks)
    attention_mask: torch.Tensor | None = None
    # (B, T) with doc_attention: attention kept within documents
    doc_ids: torch.Tensor | None = None

    def rows(self, rows: slice) -> Batch:
        return Batch(*(None if t is None else t[rows] for t in self))

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        # non_blocking: from pinned memory the copy overlaps the compute already queued on the GPU.
        return Batch(
            *(None if t is None else t.to(device, non_blocking=non_blocking) for t in self)
        )

    def pin_memory(self) -> Batch:
        return Batch(*(None if t is None else t.pin_memory() for t in self))


# ================================================================================ 3. packed blocks
def check_block_size(
    block_size: int, max_positions: int | None = None, name: str = "max_position_embeddings"
) -> None:
    """A block must fit the model's position table (for RoBERTa pass the usable count: the table
    minus 2)."""
    if block_size < 1:
        raise ConfigError(f"block_size must be at least 1, not {block_size}")
    if max_positions is not None and block_size > max_positions:
        raise ConfigError(
            f"block_size {block_size} exceeds the model's {name} {max_positions}; "
            f"pass --block-size {max_positions} or less"
        )


class PackedBlocks:
    """A split seen as HF's `group_texts` sees it: all tokens end to end, cut into blocks of
    block_size.

    Documents keep their special tokens, so a block reads `[CLS] end of doc 1 [SEP] [CLS] doc 2
    ...`. remainder="drop" drops the last partial block, as `group_texts` does; "pad" keeps it,
    padded with the pad id where attention_mask is 0. Getting blocks is index arithmetic over
    memory-mapped arrays."""

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
                f"the {split} split of {data_dir} has {self.num_tokens} tokens, less than one "
                f"block of {block_size}; "
                "use a smaller block size, remainder='pad', or more data"
            )
        self.pad_token_id = self.meta["special_ids"]["pad"]
        self.special_ids = np.array(self.meta["all_special_ids"], dtype=np.int64)

    def __len__(self) -> int:
        return self.num_blocks

    def get(
        self, block_indices: Sequence[int] | np.ndarray | torch.Tensor
    ) -> dict[str, torch.Tensor]:
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

        # (B, T)
        ids = np.where(real, self.arrays.tokens[position], self.pad_token_id).astype(np.int64)
        # ids another tokenizer made, or damaged bytes
        if ids.size and ids.max() >= self.vocab_size:
            raise DataError(
                f"the {self.split} split of {self.folder} holds token id {ids.max()}, beyond its "
                f"vocabulary of {self.vocab_size}: the dataset is damaged; prepare it again"
            )
        # A block can start mid-word; that fragment is a word of its own here, as in HF's whole-word
        # collator.
        word_starts = real & (self.arrays.words[position] != 0)
        word_starts[:, 0] = real[:, 0]
        # (B, T) document index in the split
        doc = np.searchsorted(self.arrays.docs, position, side="right") - 1
        doc_ids = np.where(real, doc - doc[:, :1], -1).astype(np.int32)
        special = np.isin(ids, self.special_ids) | ~real
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(real.astype(np.int64)),
            "word_starts": torch.from_numpy(word_starts),
            "doc_ids": torch.from_numpy(doc_ids),
            "special_mask": torch.from_numpy(special),
        }


# ================================================================================ 4. the order of
# blocks Training reads one infinite stream of block indices: epoch 0's permutation, then epoch 1's,
# ... Global step s takes stream positions [s*G, (s+1)*G). Rank r of W takes rows [r*G/W, (r+1)*G/W)
# of that, cut into micro-batches in order. The global batch never depends on W, and masks are
# seeded by stream position, so a run is the same whatever the layout, and resuming at step s is
# just starting there.
def stream_positions(step: int, global_batch: int) -> np.ndarray:
    """The stream positions optimizer step `step` consumes: (global_batch,) int64."""
    return np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The order of blocks in one epoch: a permutation of range(num_blocks) seeded by (seed,
    epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_blocks)
    order.flags.writeable = False  # shared through the cache
    return order


def blocks_at(
    positions: Sequence[int] | np.ndarray, num_blocks: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Block index and epoch at each stream position: (block_indices, epochs), both like
    positions."""
    positions = np.asarray(positions, dtype=np.int64)
    if num_blocks < 1:
        raise DataError("there are no blocks to train on; use more data or a smaller block size")
    if seed < 0 or (positions.size and positions.min() < 0):
        raise ConfigError("seed and stream positions must be >= 0")
    epochs, offsets = np.divmod(positions, num_blocks)
    blocks = np.empty_like(positions)
    # one or two epochs per batch, unless a batch holds more than an epoch
    for epoch in np.unique(epochs):
        here = epochs == epoch
        blocks[here] = epoch_permutation(num_blocks, seed, int(epoch))[offsets[here]]
    return blocks, epochs


class BatchPlan:
    """Which blocks this rank trains on at each step, as micro-batches.

    global_batch blocks per optimizer step, split evenly over world_size ranks, each rank's share
    cut into micro-batches of micro_batch blocks (default: the whole share, no accumulation)."""

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
            raise ConfigError(
                f"global batch ({global_batch}) and world size ({world_size}) must be at least 1"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if global_batch % world_size:
            raise ConfigError(
                f"global batch {global_batch} is not a multiple of world size {world_size}; change "
                "--global-batch-size"
            )
        micro_batch = micro_batch or global_batch // world_size
        if micro_batch < 1 or global_batch % (world_size * micro_batch):
            raise ConfigError(
                f"global batch {global_batch} is not a multiple of world size {world_size} x micro "
                "batch "
                f"{micro_batch} = {world_size * micro_batch}; change --global-batch-size or "
                "--micro-batch-size"
            )
        if num_blocks < 1:
            raise DataError(
                "there are no blocks to train on; use more data or a smaller block size"
            )
        self.num_blocks, self.global_batch, self.seed = num_blocks, global_batch, seed
        self.world_size, self.rank, self.micro_batch = world_size, rank, micro_batch
        self.per_rank = global_batch // world_size
        self.accumulation_steps = self.per_rank // micro_batch

    def rows(self, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's micro-batches at `step`: [(block_indices, stream_positions)], each
        (micro_batch,)."""
        first = self.rank * self.per_rank
        # (per_rank,)
        positions = stream_positions(step, self.global_batch)[first : first + self.per_rank]
        blocks, _ = blocks_at(positions, self.num_blocks, self.seed)
        m = self.micro_batch
        return [(blocks[i : i + m], positions[i : i + m]) for i in range(0, self.per_rank, m)]

    def epoch(self, step: int) -> float:
        """Epochs completed before `step` (fractional)."""
        return step * self.global_batch / self.num_blocks
