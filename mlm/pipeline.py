"""The training input pipeline: the tokenizer and dataset made before training, then each step's
micro-batches.

Where the tokenizer and the dataset come from, and what must be made first, is one `DataPlan`,
resolved from the config once. Before training, one process per node carries it out (trains the
tokenizer unless one is given, tokenizes the corpus unless it is prepared), the others wait; every
rank then checks it reads the same data (`prepare_data`).

A step's blocks come from the BatchPlan (mlm/data.py), and each block's mask is seeded by its place
in the data stream (row seeds), so a batch is a pure function of (step, rank, micro-batch size).
That makes it safe to build step s + 1 while step s runs: `Prefetcher` does so in a background
thread, in pinned memory, and copies to the GPU with non_blocking copies. The masks are computed on
the CPU, which gives the same bits as on the GPU (the row-seed hash is integer arithmetic), so
prefetching changes no result."""

from __future__ import annotations

import functools
import gc
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mlm import data as mdata
from mlm import dataset as mdataset
from mlm.config import FAMILY_OF_TOKENIZER, TrainConfig
from mlm.corpus import Corpus, default_corpus
from mlm.data import Batch, BatchPlan, PackedBlocks
from mlm.distributed import Dist, agree_min, same_on_every_rank, wait_for_others
from mlm.errors import DataError, OutOfMemory
from mlm.masking import mask_eval_blocks, mask_tokens, row_seeds_for
from mlm.tokenizer import Tokenizer
from mlm.tokenizer_train import train_tokenizer


@dataclass(frozen=True)
class Masking:
    """mask_tokens' settings for a whole run: the tokenizer's special tokens and the config's
    recipe."""

    mask_token_id: int
    # random replacements are drawn from the tokenizer's tokens, never unused embedding rows
    vocab_size: int
    special_ids: tuple[int, ...]
    mlm_probability: float
    mask_replace_prob: float
    random_replace_prob: float
    whole_word_mask: bool
    static: bool

    @classmethod
    def of(cls, cfg: TrainConfig, tokenizer: Tokenizer) -> Masking:
        return cls(
            tokenizer.mask_token_id,
            tokenizer.vocab_size,
            tuple(tokenizer.special_ids),
            cfg.mlm_probability,
            cfg.mask_replace_prob,
            cfg.random_replace_prob,
            cfg.whole_word_mask,
            cfg.static_masking,
        )

    def kwargs(self) -> dict:
        return dict(
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            special_ids=self.special_ids,
            mlm_probability=self.mlm_probability,
            mask_replace_prob=self.mask_replace_prob,
            random_replace_prob=self.random_replace_prob,
        )


def assemble(
    step: int,
    plan: BatchPlan,
    blocks: PackedBlocks,
    masking: Masking,
    *,
    seed: int,
    doc_attention: bool,
    pin: bool = False,
) -> list[Batch]:
    """This rank's micro-batches of `step`, masked, on the CPU."""
    out = []
    for indices, positions in plan.rows(step):
        block = blocks.get(indices)
        # Training blocks are always full (the remainder is dropped): every position is a candidate,
        # and the model gets no attention mask, which lets SDPA pick FlashAttention on a GPU instead
        # of a masked kernel.
        ids, labels = mask_tokens(
            block["input_ids"],
            row_seeds=row_seeds_for(seed, torch.from_numpy(positions)),
            static=masking.static,
            word_starts=block["word_starts"] if masking.whole_word_mask else None,
            **masking.kwargs(),
        )
        batch = Batch(ids, labels, None, block["doc_ids"] if doc_attention else None)
        out.append(batch.pin_memory() if pin else batch)
    return out


class Prefetcher:
    """Step after step of micro-batches on `device`, built `depth` steps ahead in a background
    thread.

    `get(step)` returns that step's micro-batches. Steps are asked for in order; asking for another
    step (a retry with a new micro-batch size, say) rebuilds from there. With depth 0 the batch is
    built in the calling thread, when it is asked for."""

    def __init__(self, build, device: torch.device, depth: int = 1):
        self.build, self.device, self.depth = build, device, depth
        self._next_step: int | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def get(self, step: int) -> list[Batch]:
        if self.depth == 0:
            return [m.to(self.device, non_blocking=True) for m in self.build(step)]
        if self._next_step != step:
            self._restart(step)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._next_step = step + 1
        return [m.to(self.device, non_blocking=True) for m in item]

    def _restart(self, step: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._work,
            args=(step, self._queue, self._stop),
            daemon=True,
            name="mlm-prefetch",
        )
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


# ----------------------------------------------------------------------------- the micro-batch size
def fit_micro_batch(
    cfg: TrainConfig,
    job: Dist,
    step_model,
    blocks: PackedBlocks,
    masking: Masking,
    autocast,
    scaler,
) -> int:
    """--micro-batch-size auto: the largest micro-batch that trains, from each rank's whole share
    down by halves, tried on step 0's first micro-batch before training (and before DDP, so that a
    rank that runs out of memory leaves no collective waiting). All ranks agree on the size; every
    micro-batch layout computes the same update, so the result does not depend on the memory a run
    found."""
    per_rank = cfg.global_batch_size // job.world
    size = per_rank
    while True:
        plan = BatchPlan(
            len(blocks), cfg.global_batch_size, job.world, job.rank, size, seed=cfg.seed
        )
        first = assemble(0, plan, blocks, masking, seed=cfg.seed, doc_attention=cfg.doc_attention)[
            0
        ]
        batch = first.to(job.device)
        try:
            with autocast:
                loss = step_model(
                    batch.input_ids,
                    labels=batch.labels,
                    doc_ids=batch.doc_ids,
                    max_predictions=cfg.max_predictions,
                )
            scaler.scale(loss).backward()
            fits = 1
        except torch.OutOfMemoryError:
            fits = 0
        loss = None
        step_model.zero_grad(set_to_none=True)
        gc.collect()
        if job.device.type == "cuda":
            torch.cuda.empty_cache()
        if agree_min(job, fits):
            break
        smaller = agree_min(job, next((m for m in range(size // 2, 0, -1) if per_rank % m == 0), 0))
        if smaller < 1:
            raise OutOfMemory(
                "out of memory even with micro-batches of 1 sequence; use a shorter "
                "--block-size, --dtype bf16, or a machine with more memory"
            )
        if job.master:
            print(f"out of memory with micro-batches of {size}: trying {smaller}", file=sys.stderr)
        size = smaller
    if job.master:
        print(
            f"micro-batch size {size} ({per_rank // size} per step on each rank), chosen by "
            "--micro-batch-size auto",
            file=sys.stderr,
        )
    return size


# ----------------------------------------------------------------------------- made before training
@dataclass(frozen=True)
class DataPlan:
    """Where a run's tokenizer and dataset come from, and what must be made before training.

    tokenizer_dir  the folder the tokenizer is read from: --init's or --tokenizer's, a prepared
                   --data folder's own, or <out>/tokenizer, trained there first on the corpus
    dataset_dir    the prepared dataset: --data itself when prepare.py made it, <out>/data
                   tokenized from the corpus, or None for the default corpus, cached by the
                   tokenizer's fingerprint
    """

    tokenizer_dir: Path
    # whether the tokenizer is trained here (when tokenizer_dir has none yet)
    trains_tokenizer: bool
    tokenizer_kind: str
    family: str  # whose layout a trained tokenizer takes (ModernBERT's byte-level BPE has its own)
    vocab_size: int  # of a trained tokenizer
    # --data, when it is text to read; () for a prepared folder or the default corpus
    corpus: tuple[str, ...]
    text_field: str
    dataset_dir: Path | None
    val_fraction: float
    seed: int

    @classmethod
    def of(cls, cfg: TrainConfig, out: Path) -> DataPlan:
        prepared = len(cfg.data) == 1 and (Path(cfg.data[0]) / "meta.json").is_file()
        given = cfg.init or cfg.tokenizer
        if given:
            tokenizer_dir = Path(given)
        else:
            tokenizer_dir = Path(cfg.data[0]) if prepared else out / "tokenizer"
        if prepared:
            dataset_dir = Path(cfg.data[0])
        else:
            dataset_dir = out / "data" if cfg.data else None
        return cls(
            tokenizer_dir,
            trains_tokenizer=not (given or prepared),
            tokenizer_kind=cfg.tokenizer_kind,
            family=cfg.model.get("family") or FAMILY_OF_TOKENIZER[cfg.tokenizer_kind],
            vocab_size=cfg.model.get("vocab_size", 30522),
            corpus=() if prepared else tuple(cfg.data),
            text_field=cfg.text_field,
            dataset_dir=dataset_dir,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )

    def dataset_for(self, tokenizer: Tokenizer) -> Path:
        return self.dataset_dir or mdataset.default_dataset(tokenizer, make=False, **self.split)

    @property
    def split(self) -> dict:
        """What chooses the documents held out for validation."""
        return {"val_fraction": self.val_fraction, "seed": self.seed}

    def carry_out(self, progress: bool) -> Tokenizer:
        """Train the tokenizer (unless there is one) and tokenize the corpus (unless it is
        prepared); returns the tokenizer. What is already on disk is used as it is."""
        if self.trains_tokenizer and not (self.tokenizer_dir / "tokenizer.json").is_file():
            corpus = self.read_corpus()
            print(
                f"training a {self.tokenizer_kind} tokenizer of {self.vocab_size} tokens on "
                f"{corpus}",
                file=sys.stderr,
            )
            tokenizer = train_tokenizer(
                corpus, self.tokenizer_kind, self.vocab_size, family=self.family
            )
            tokenizer.save(self.tokenizer_dir)
        else:
            tokenizer = Tokenizer.from_pretrained(self.tokenizer_dir)
        if self.dataset_dir is None:
            mdataset.default_dataset(tokenizer, progress=progress, **self.split)
        elif not (self.dataset_dir / "meta.json").is_file():
            mdataset.prepare(
                self.read_corpus(),
                self.dataset_dir,
                tokenizer,
                val_fraction=self.val_fraction,
                seed=self.seed,
                progress=progress,
            )
        return tokenizer

    def read_corpus(self) -> Corpus:
        return (
            Corpus(list(self.corpus), text_field=self.text_field)
            if self.corpus
            else default_corpus()
        )


def prepare_data(plan: DataPlan, job: Dist) -> tuple[Path, Tokenizer]:
    """The prepared dataset folder and the tokenizer, made before training by one process per node.

    Global rank 0 goes first. A node that cannot see its result (a disk of its own) then prepares
    its own copy, the same bytes, since preparation is deterministic. The other ranks wait, at most
    --dist-timeout: for a corpus that takes longer, run prepare.py first. Last, every rank checks it
    reads the same data."""
    tokenizer = None
    for turn in ("global", "node"):
        if job.master if turn == "global" else job.local_master and tokenizer is None:
            tokenizer = plan.carry_out(progress=job.master or turn == "node")
        wait_for_others(
            job,
            "the data preparation on rank 0 or on this node's first rank",
            "run prepare.py once before training (python prepare.py --data ... --out DIR) and pass "
            "--data DIR, or raise --dist-timeout",
        )
    tokenizer = tokenizer or Tokenizer.from_pretrained(plan.tokenizer_dir)
    data_dir = plan.dataset_for(tokenizer)
    meta = mdataset.load_dataset_meta(data_dir)
    mdataset.check_vocab(meta, tokenizer)
    if not same_on_every_rank(job, f"{meta['tokenizer_sha256']} {meta['splits']}"):
        raise DataError(
            f"the ranks read different datasets from {data_dir}; prepare it once with prepare.py "
            "into "
            "a folder every node sees (or identical copies) and pass it as --data"
        )
    return data_dir, tokenizer


def validation_set(cfg: TrainConfig, data_dir: Path, masking: Masking) -> Batch:
    """The validation blocks, masked once from the seed: the same masks for every run and every
    world size."""
    blocks = mdata.PackedBlocks(data_dir, "val", cfg.block_size, remainder="pad")
    val = blocks.get(range(min(cfg.eval_blocks, len(blocks))))
    masked, labels = mask_eval_blocks(
        val["input_ids"],
        seed=cfg.seed,
        attention_mask=val["attention_mask"],
        word_starts=val["word_starts"] if masking.whole_word_mask else None,
        **masking.kwargs(),
    )
    return Batch(
        masked, labels, val["attention_mask"], val["doc_ids"] if cfg.doc_attention else None
    )


def batch_source(
    cfg: TrainConfig,
    plan: mdata.BatchPlan,
    blocks: mdata.PackedBlocks,
    masking: Masking,
    device: torch.device,
) -> Prefetcher:
    """Each step's micro-batches on the device, built a step ahead in a background thread on CUDA
    (or with --prefetch): the masks depend only on the blocks' places in the data stream, so the
    results are the same."""
    build = functools.partial(
        assemble,
        plan=plan,
        blocks=blocks,
        masking=masking,
        seed=cfg.seed,
        doc_attention=cfg.doc_attention,
        pin=device.type == "cuda",
    )
    prefetch = cfg.prefetch if cfg.prefetch is not None else device.type == "cuda"
    return Prefetcher(build, device, depth=1 if prefetch else 0)
