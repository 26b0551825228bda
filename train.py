"""Masked language model training: from scratch, or continued from a Hugging Face folder.

    python train.py                                 # the default run on the stdlib's docstrings
    python train.py --preset bert-base --data corpus/ --dtype bf16 --out runs/base
    torchrun --nproc_per_node=8 train.py --preset bert-base --data corpus/ --dtype bf16 --compile
    python train.py --preset imdb --init ~/models/distilbert-base-uncased --data imdb.jsonl

One script, read top to bottom: model -> evaluation -> set-up (data, model, optimizer, the
micro-batch size) -> one training step -> the loop (`train`) -> export. The config and its presets
are in mlm/config.py, devices and process groups in mlm/distributed.py, the data in mlm/pipeline.py,
checkpoints and metrics in mlm/checkpoint.py.

Layout independence: the global batch of step s is the same blocks whatever the number of ranks and
micro-batches (mlm.data.BatchPlan), each block's mask is seeded by its position in the data stream
(row seeds), and the loss is normalised by the number of masked tokens in the whole global batch. So
1 process x batch 8, 1 process x 2 micro-batches of 4, and 2 ranks x 4 compute the same update.
"""

from __future__ import annotations

import math
import shlex
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import mlm
from mlm import data as mdata
from mlm import kernels, report
from mlm.checkpoint import Progress, RunFolder, restore, training_state
from mlm.config import FAMILY_OF_TOKENIZER, TrainConfig, parse_config
from mlm.data import Batch
from mlm.distributed import (
    Dist,
    StopSignal,
    all_reduce_sum,
    barrier,
    bf16_all_reduce_hook,
    is_communication_failure,
    setup_distributed,
    short,
)
from mlm.errors import (
    ConfigError,
    DistributedError,
    OutOfMemory,
    exit_without_teardown,
    run_cli,
)
from mlm.evaluate import score_blocks, summarize
from mlm.hf import load_model
from mlm.masking import IGNORE_INDEX
from mlm.meter import Meter
from mlm.model import DTYPES, MaskedLM, ModelConfig
from mlm.model.config import FROM_SCRATCH
from mlm.pipeline import (
    DataPlan,
    Masking,
    Prefetcher,
    batch_source,
    fit_micro_batch,
    prepare_data,
    validation_set,
)
from mlm.tokenizer import Tokenizer


# ============================================================================================ model
def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> MaskedLM:
    if cfg.init:
        model = load_model(cfg.init, kernels=False)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"the tokenizer in {cfg.init} has more tokens than the model's embedding table"
            )
    else:
        family = cfg.model.get("family") or FAMILY_OF_TOKENIZER[tokenizer.kind]
        fields = {**FROM_SCRATCH.get(family, {}), **cfg.model, "family": family}  # the family's own
        fields.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
        if family == "roberta":  # positions numbered from pad + 1, within the blocks it trains on
            fields.setdefault("position_offset", tokenizer.pad_token_id + 1)
            fields.setdefault(
                "max_position_embeddings", cfg.block_size + tokenizer.pad_token_id + 1
            )
            fields.setdefault("type_vocab_size", 1)
        if family == "modernbert":  # what config.json says of the tokenizer
            fields.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
        model = MaskedLM(ModelConfig(**fields))
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    return model


def param_groups(model: MaskedLM, cfg: TrainConfig) -> list[dict]:
    """Decay matrices and embeddings; never biases or LayerNorm weights (every 1-D parameter). The
    head's transform and bias learn at head_lr where it is set: `lr_scale` of the peak lr."""
    groups = []
    for part, scale in (("encoder", 1.0), ("head", (cfg.head_lr or cfg.lr) / cfg.lr)):
        params = [p for p in getattr(model, part).parameters() if p.requires_grad]
        for decayed in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decayed]
            decay = cfg.weight_decay if decayed else 0.0
            groups.append({"params": chosen, "weight_decay": decay, "lr_scale": scale})
    return groups


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then linear or cosine decay to 0,
    constant, or warmup-stable-decay (wsd: constant, then 1 - sqrt over the last `decay` steps)."""
    warmup = int(cfg.warmup if cfg.warmup >= 1 else cfg.warmup * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1.0 - progress
    if cfg.schedule == "wsd":
        decay = max(1, int(cfg.decay if cfg.decay >= 1 else cfg.decay * cfg.max_steps))
        start = cfg.max_steps - decay
        return 1.0 if step < start else 1.0 - math.sqrt(min(1.0, (step - start) / decay))
    return 1.0


# ======================================================================================= evaluation
def evaluate(model: MaskedLM, val: Batch, job: Dist, micro: int, autocast) -> dict:
    """Loss, perplexity and accuracy over every masked token of the fixed validation set, each rank
    scoring a contiguous share (the masks were fixed globally, so the shares add up to the
    single-process numbers)."""
    n = val.labels.shape[0]
    share = range(job.rank * n // job.world, (job.rank + 1) * n // job.world)
    # [loss sum, correct, n]
    totals = score_blocks(model, val, rows=share, batch_size=micro, autocast=autocast)
    result = summarize(all_reduce_sum(totals, job.world))
    return {
        "val_loss": result["loss"],
        "val_ppl": result["perplexity"],
        "val_acc": result["accuracy"],
        "val_tokens": result["tokens"],
    }


# =========================================================================================== set-up
@dataclass
class Run:
    """What the loop works with, made once by `setup`."""

    cfg: TrainConfig
    job: Dist
    folder: RunFolder
    tokenizer: Tokenizer
    model: MaskedLM  # the weights: what is evaluated and saved
    step_model: torch.nn.Module  # the same weights, compiled and/or in DDP: what trains
    installed: dict  # the kernels mlm.kernels.install put in
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    plan: mdata.BatchPlan
    batches: Prefetcher
    val: Batch
    progress: Progress
    steps_per_epoch: int


def setup(cfg: TrainConfig, job: Dist) -> Run:
    folder, device = RunFolder(cfg.out), job.device
    micro = cfg.micro_batch_size if isinstance(cfg.micro_batch_size, int) else 0
    # its checks, before any work
    mdata.BatchPlan(1, cfg.global_batch_size, job.world, job.rank, micro or None)
    resume_state = folder.resume_state(asdict(cfg), cfg.resume)
    if job.master:
        folder.out.mkdir(parents=True, exist_ok=True)
    data_dir, tokenizer = prepare_data(DataPlan.of(cfg, folder.out), job)
    # the same initial weights on every rank and in every run with this seed
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer).to(device).train()
    installed = kernels.install(model, device, cpu_gemm=cfg.cpu_gemm) if cfg.kernels else {}
    mdata.check_block_size(cfg.block_size, model.config.max_tokens, "usable positions")
    blocks, masking = (
        mdata.PackedBlocks(data_dir, "train", cfg.block_size),
        Masking.of(cfg, tokenizer),
    )
    steps_per_epoch = max(1, math.ceil(len(blocks) / cfg.global_batch_size))
    cfg.max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.adam_eps,
        fused=device.type in ("cuda", "cpu"),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    autocast = torch.autocast(device.type, dtype=DTYPES[cfg.dtype], enabled=cfg.dtype != "fp32")
    progress = restore(resume_state, model, optimizer, scaler)
    if resume_state and job.master:
        print(f"resuming from {resume_state['path']} at step {progress.step}", file=sys.stderr)
    step_model = torch.compile(model) if cfg.compile else model
    if cfg.micro_batch_size == "auto":
        micro = progress.micro_batch or fit_micro_batch(
            cfg, job, step_model, blocks, masking, autocast, scaler
        )
        progress.micro_batch = micro
    plan = mdata.BatchPlan(
        len(blocks), cfg.global_batch_size, job.world, job.rank, micro or None, seed=cfg.seed
    )
    val = validation_set(cfg, data_dir, masking)
    if job.master:
        folder.keep_metrics_until(progress.step)  # the steps after the checkpoint run again
        if cfg.micro_batch_size == "auto":
            folder.log({"step": progress.step, "micro_batch_size": micro})
        start = f"continuing {cfg.init}" if cfg.init else "from scratch"
        print(
            f"preset {cfg.preset}, {start}: {model.config.family} model, "
            f"{model.num_parameters() / 1e6:.1f}M parameters, "
            f"{len(blocks)} train "
            f"blocks of {cfg.block_size}, {val.labels.ne(IGNORE_INDEX).sum()} masked val tokens, "
            f"{job.world} "
            f"process(es) on {device}, {plan.accumulation_steps} micro-batch(es)/step; kernels: "
            f"{', '.join(installed) or 'none'}",
            file=sys.stderr,
        )
    return Run(
        cfg=cfg,
        job=job,
        folder=folder,
        tokenizer=tokenizer,
        model=model,
        step_model=in_ddp(step_model, cfg, job),
        installed=installed,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast,
        plan=plan,
        batches=batch_source(cfg, plan, blocks, masking, device),
        val=val,
        progress=progress,
        steps_per_epoch=steps_per_epoch,
    )


def in_ddp(step_model: torch.nn.Module, cfg: TrainConfig, job: Dist) -> torch.nn.Module:
    """The model the loop calls: inside DDP under torchrun."""
    if job.world == 1:
        return step_model
    # gradient_as_bucket_view: gradients live in DDP's communication buckets, no copy in and out of
    # them.
    ddp = DDP(
        step_model,
        device_ids=[job.device.index] if job.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    if cfg.ddp_bf16_grads:
        ddp.register_comm_hook(None, bf16_all_reduce_hook)
    return ddp


# ========================================================================================= one step
def train_step(run: Run, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's micro-batches, then clip: (global mean loss, grad
    norm), on the device.

    Each micro-batch's mean loss is weighted by its share of the step's masked tokens over all
    ranks, so the gradient is that of the mean over the whole global batch, whatever the layout. DDP
    all-reduces in the last micro-batch's backward."""
    job = run.job
    counts = [(mb.labels != IGNORE_INDEX).sum() for mb in micro_batches]
    total = all_reduce_sum(torch.stack(counts).sum().double(), job.world)
    step_loss = torch.zeros((), device=total.device, dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last or job.world == 1 else run.step_model.no_sync():
            with run.autocast:
                mean_loss = run.step_model(
                    mb.input_ids,
                    labels=mb.labels,
                    doc_ids=mb.doc_ids,
                    max_predictions=run.cfg.max_predictions,
                )
            # Sum of token losses over the global count; DDP averages over ranks, so scale by world
            # back.
            loss = mean_loss * counts[i] / total * job.world
            run.scaler.scale(loss).backward()
        step_loss += loss.detach().double() / job.world
    run.scaler.unscale_(run.optimizer)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip or math.inf)
    return all_reduce_sum(step_loss, job.world), grad_norm


def apply_update(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, bad_steps: int) -> int:
    """The optimizer step, skipped where the loss or gradient is not finite; returns the count of
    such steps in a row. Under fp16 the GradScaler skips by itself when the scaled gradients
    overflowed."""
    if run.scaler.is_enabled():
        ok = bool(torch.isfinite(loss))
        run.scaler.step(run.optimizer)
    else:
        # one wait for the device per step
        ok = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if ok:
            run.optimizer.step()
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return 0 if ok else bad_steps + 1


def out_of_memory(run: Run, step: int) -> OutOfMemory:
    smaller = max(1, run.plan.micro_batch // 2)
    return OutOfMemory(
        f"out of memory at step {step} with micro-batches of {run.plan.micro_batch}; resume with "
        f"--micro-batch-size {smaller} (or auto, which finds one before training)"
    )


# ========================================================================================= the loop
def main() -> None:
    cfg = parse_config(description=__doc__.split("\n")[0])
    job = setup_distributed(cfg.device, cfg.dist_timeout)
    try:
        train(cfg, job)
    except RuntimeError as e:
        if job.world > 1 and is_communication_failure(e):
            raise DistributedError(
                f"lost contact with another rank ({short(e)}): it died, hung or was stopped; "
                "see its log, then resume with --resume"
            ) from None
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
        if job.master and cfg.example:  # and the example's candidates, for the closing summary
            before = report.top_k(run.model, run.tokenizer, cfg.example)
            run.folder.log({"step": 0, "example_text": cfg.example, "example": before})
    # The bar is closed before an error is printed, so the error is the last line.
    with tqdm(
        total=cfg.max_steps,
        initial=run.progress.step,
        disable=not job.master,
        dynamic_ncols=True,
        file=sys.stderr,
    ) as bar:
        meter = Meter(cfg, job, run.folder, run.model.config, run.installed)
        while (step := run.progress.step) < cfg.max_steps:
            # Dropout's randomness is re-seeded from (seed, step, rank), so a resumed step draws
            # what it would have; the learning rate is a function of the step too: neither needs a
            # checkpoint's state.
            torch.manual_seed(cfg.seed * 1_000_003 + step * job.world + job.rank)
            for group in run.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg) * group["lr_scale"]
            try:
                loss, grad_norm = train_step(run, run.batches.get(step))
            except torch.OutOfMemoryError:
                raise out_of_memory(run, step) from None
            meter.bad_steps = apply_update(run, loss, grad_norm, meter.bad_steps)
            run.progress.step = done = step + 1
            bar.update(1)
            meter.step(
                done, loss, grad_norm, bar, cfg.lr * lr_factor(done, cfg), run.plan.epoch(done)
            )
            if due(cfg.eval_every, done, run):
                validate(run)
            if due(cfg.save_every, done, run):
                save_checkpoint(run)
            if signum := stop.requested(job):
                preempt(run, signum)
    run.batches.close()
    validate(run)
    save_checkpoint(run)
    if job.master:
        export_and_show(run)


def due(every: int | str, done: int, run: Run) -> bool:
    """Whether an evaluation or checkpoint falls after step `done` ("epoch": after each epoch's last
    step); the last step always gets both, after the loop."""
    period = run.steps_per_epoch if every == "epoch" else every
    return bool(period) and done % period == 0 and done != run.cfg.max_steps


def validate(run: Run) -> dict:
    """Evaluate; log it; export the model to best/ when it is the best so far; redraw the plot."""
    result = evaluate(run.model, run.val, run.job, run.plan.micro_batch, run.autocast)
    progress, master = run.progress, run.job.master
    if master:
        run.folder.log({"step": progress.step, **result})
    # step 0 is the baseline, not a result
    if progress.step > 0 and result["val_loss"] < progress.best_val:
        progress.best_val, progress.best_step = result["val_loss"], progress.step
        if master:
            mlm.save_pretrained(run.model, run.tokenizer, run.folder.out / "best")
    if master:
        run.folder.plot_metrics()
        tqdm.write(
            f"step {progress.step}: val loss {result['val_loss']:.4f}  ppl {result['val_ppl']:.2f} "
            " "
            f"acc {result['val_acc']:.3f}",
            file=sys.stderr,
        )
    return result


def save_checkpoint(run: Run) -> None:
    if run.job.master:
        state = training_state(asdict(run.cfg), run.model, run.optimizer, run.scaler, run.progress)
        run.folder.save_checkpoint(
            state,
            run.progress.step,
            keep={run.folder.checkpoint_path(run.progress.best_step)},
            keep_last=run.cfg.keep_last,
        )
    barrier(run.job.world)


def preempt(run: Run, signum: int) -> None:
    """SIGTERM or SIGINT reached some rank: checkpoint this step (unless one was just written), say
    how to resume, and exit with 128 + the signal's number, as a process killed by it would."""
    if not due(run.cfg.save_every, run.progress.step, run):
        save_checkpoint(run)
    run.batches.close()
    if run.job.master:
        argv = [a for a in sys.argv[1:] if a != "--resume"]
        launcher = "torchrun ... " if run.job.world > 1 else "python "
        tqdm.write(
            f"stopped by {signal.Signals(signum).name} after step {run.progress.step}; checkpoint "
            f"{run.folder.checkpoint_path(run.progress.step)}. Resume with: {launcher}"
            f"{shlex.join([sys.argv[0], *argv, '--resume'])}",
            file=sys.stderr,
        )
    raise SystemExit(128 + signum)


def export_and_show(run: Run) -> None:
    """The final Hugging Face folder, and a fill-mask example to show what the model learned."""
    cfg, final, best = run.cfg, run.folder.out / "final", run.folder.out / "best"
    model = run.model
    if cfg.load_best_at_end and (best / "config.json").is_file():
        # Trainer's load_best_model_at_end: the best evaluation's weights go out
        model = load_model(best)
    mlm.save_pretrained(model, run.tokenizer, final)
    print(
        f"exported {final} (best validation loss at step {run.progress.best_step}: {best})",
        file=sys.stderr,
    )
    after = report.top_k(model, run.tokenizer, cfg.example) if cfg.example else []
    shown = run.progress.best_step if model is not run.model else run.progress.step  # best/'s
    print(report.before_and_after(run.folder.records(), cfg.example, after, shown))


if __name__ == "__main__":
    run_cli(main)
