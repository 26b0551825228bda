"""The training input pipeline: the tokenizer and dataset made before training, then each step's micro-batches.

Before training, one process per node trains the tokenizer (unless one is given) and tokenizes the corpus
(unless it is prepared), the others wait; every rank then checks it reads the same data (`prepare_data`).

A step's blocks come from the BatchPlan (mlm/data.py), and each block's mask is seeded by its place in
the data stream (row seeds), so a batch is a pure function of (step, rank, micro-batch size). That makes
it safe to build step s + 1 while step s runs: `Prefetcher` does so in a background thread, in pinned
memory, and copies to the GPU with non_blocking copies. The masks are computed on the CPU, which gives
the same bits as on the GPU (the row-seed hash is integer arithmetic), so prefetching changes no result.
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from mlm import data as mdata
from mlm.corpus import Corpus, default_corpus
from mlm.data import BatchPlan, PackedBlocks
from mlm.distributed import Dist, same_on_every_rank, wait_for_others
from mlm.errors import DataError
from mlm.masking import mask_eval_blocks, mask_tokens, row_seeds_for
from mlm.tokenizer import Tokenizer
from mlm.tokenizer_train import train_tokenizer


class MicroBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) masked ids
    labels: torch.Tensor  # (B, T) original ids where masked, IGNORE_INDEX elsewhere
    doc_ids: torch.Tensor | None  # (B, T) with doc_attention, for attention within documents

    def to(self, device: torch.device) -> "MicroBatch":
        # non_blocking: from pinned memory the copy overlaps the compute already queued on the GPU.
        return MicroBatch(*(None if t is None else t.to(device, non_blocking=True) for t in self))


def assemble(step: int, plan: BatchPlan, blocks: PackedBlocks, masking: dict, *, seed: int, static: bool,
             whole_word_mask: bool, doc_attention: bool, pin: bool = False) -> list[MicroBatch]:
    """This rank's micro-batches of `step`, masked, on the CPU. masking holds mask_tokens' fixed settings."""
    out = []
    for indices, positions in plan.rows(step):
        batch = blocks.get(indices)
        # Training blocks are always full (the remainder is dropped): every position is a candidate, and the
        # model gets no attention mask, which lets SDPA pick FlashAttention on a GPU instead of a masked kernel.
        ids, labels = mask_tokens(batch["input_ids"], row_seeds=row_seeds_for(seed, torch.from_numpy(positions)),
                                  static=static, word_starts=batch["word_starts"] if whole_word_mask else None,
                                  **masking)
        micro = MicroBatch(ids, labels, batch["doc_ids"] if doc_attention else None)
        if pin:
            micro = MicroBatch(*(None if t is None else t.pin_memory() for t in micro))
        out.append(micro)
    return out


class Prefetcher:
    """Step after step of micro-batches on `device`, built `depth` steps ahead in a background thread.

    `get(step)` returns that step's micro-batches. Steps are asked for in order; asking for another step
    (a retry with a new micro-batch size, say) rebuilds from there. With depth 0 the batch is built in the
    calling thread, when it is asked for.
    """

    def __init__(self, build, device: torch.device, depth: int = 1):
        self.build, self.device, self.depth = build, device, depth
        self._next_step: int | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def get(self, step: int) -> list[MicroBatch]:
        if self.depth == 0:
            return [m.to(self.device) for m in self.build(step)]
        if self._next_step != step:
            self._restart(step)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._next_step = step + 1
        return [m.to(self.device) for m in item]

    def _restart(self, step: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, args=(step, self._queue, self._stop), daemon=True)
        self._thread.start()

    def _work(self, step: int, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = self.build(step)
            except BaseException as e:  # handed to the training thread, which raises it
                item = e
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            step += 1

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


# ------------------------------------------------------------------------------- made before training
def prepare_data(cfg, out: Path, job: Dist) -> tuple[Path, Tokenizer]:
    """The tokenizer and the prepared dataset folder, made before training by one process per node.

    Global rank 0 goes first. A node that cannot see its result (a disk of its own) then prepares its own
    copy, the same bytes, since preparation is deterministic. The other ranks wait, at most --dist-timeout:
    for a corpus that takes longer, run prepare.py first. Last, every rank checks it reads the same data.
    """
    for turn in ("global", "node"):
        if (job.master if turn == "global" else job.local_master) and not data_ready(cfg, out):
            make_data(cfg, out, progress=job.master or turn == "node")
        wait_for_others(job, "the data preparation on rank 0 or on this node's first rank",
                        "run prepare.py once before training (python prepare.py --data ... --out DIR) and pass "
                        "--data DIR, or raise --dist-timeout")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir(cfg, out))
    data_dir = dataset_dir(cfg, out, tokenizer)
    meta = mdata.load_dataset_meta(data_dir)
    mdata.check_vocab(meta, tokenizer)
    if not same_on_every_rank(job, f"{meta['tokenizer_sha256']} {meta['splits']}"):
        raise DataError(f"the ranks read different datasets from {data_dir}; prepare it once with prepare.py into "
                        "a folder every node sees (or identical copies) and pass it as --data")
    return data_dir, tokenizer


def tokenizer_dir(cfg, out: Path) -> Path:
    if cfg.init or cfg.tokenizer:
        return Path(cfg.init or cfg.tokenizer)
    return Path(cfg.data[0]) if is_prepared(cfg) else out / "tokenizer"


def is_prepared(cfg) -> bool:
    """Whether --data names one folder that prepare.py made."""
    return len(cfg.data) == 1 and (Path(cfg.data[0]) / "meta.json").is_file()


def dataset_dir(cfg, out: Path, tokenizer: Tokenizer) -> Path:
    if is_prepared(cfg):
        return Path(cfg.data[0])
    # The default corpus is cached by the tokenizer's fingerprint, so runs with the same tokenizer share it.
    return mdata.default_dataset(tokenizer, make=False) if not cfg.data else out / "data"


def data_ready(cfg, out: Path) -> bool:
    if not (tokenizer_dir(cfg, out) / "tokenizer.json").is_file() and not (cfg.init or cfg.tokenizer):
        return False
    return (dataset_dir(cfg, out, Tokenizer.from_pretrained(tokenizer_dir(cfg, out))) / "meta.json").is_file()


def make_data(cfg, out: Path, progress: bool) -> None:
    """Train the tokenizer (unless one is given) and tokenize the corpus (unless it is prepared)."""
    folder = tokenizer_dir(cfg, out)
    if not (cfg.init or cfg.tokenizer or is_prepared(cfg)) and not (folder / "tokenizer.json").is_file():
        corpus = Corpus(cfg.data, text_field=cfg.text_field) if cfg.data else default_corpus()
        vocab_size = cfg.model.get("vocab_size", 30522)
        print(f"training a {cfg.tokenizer_kind} tokenizer of {vocab_size} tokens on {corpus}", file=sys.stderr)
        train_tokenizer(corpus, cfg.tokenizer_kind, vocab_size).save(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    data_dir = dataset_dir(cfg, out, tokenizer)
    if not cfg.data:
        mdata.default_dataset(tokenizer, progress=progress)
    elif not (data_dir / "meta.json").is_file():
        mdata.prepare(cfg.data, data_dir, tokenizer, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                      seed=cfg.seed, progress=progress)


def masking_settings(cfg, tokenizer: Tokenizer) -> dict:
    """The keyword arguments of mask_tokens that stay the same all run long."""
    return dict(mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size,
                special_ids=tokenizer.special_ids, mlm_probability=cfg.mlm_probability,
                mask_replace_prob=cfg.mask_replace_prob, random_replace_prob=cfg.random_replace_prob)


def validation_set(cfg, data_dir: Path, masking: dict) -> dict:
    """The validation blocks, masked once from the seed: the same masks for every run and every world size."""
    blocks = mdata.PackedBlocks(data_dir, "val", cfg.block_size, remainder="pad")
    val = blocks.get(range(min(cfg.eval_blocks, len(blocks))))
    if not cfg.doc_attention:
        del val["doc_ids"]
    val["masked_ids"], val["labels"] = mask_eval_blocks(
        val["input_ids"], seed=cfg.seed, attention_mask=val["attention_mask"],
        word_starts=val["word_starts"] if cfg.whole_word_mask else None, **masking)
    return val


def batch_source(cfg, plan: mdata.BatchPlan, blocks: mdata.PackedBlocks, masking: dict,
                 device: torch.device) -> Prefetcher:
    """Each step's micro-batches on the device, built a step ahead in a background thread on CUDA (or with
    --prefetch): the masks depend only on the blocks' places in the data stream, so the results are the same."""
    build = functools.partial(assemble, plan=plan, blocks=blocks, masking=masking, seed=cfg.seed,
                              static=cfg.static_masking or cfg.compile, whole_word_mask=cfg.whole_word_mask,
                              doc_attention=cfg.doc_attention, pin=device.type == "cuda")
    prefetch = cfg.prefetch if cfg.prefetch is not None else device.type == "cuda"
    return Prefetcher(build, device, depth=1 if prefetch else 0)
