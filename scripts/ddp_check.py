"""DDP(torch.compile(model)) with no_sync gradient accumulation, against eager on the same global
batch.

    torchrun --standalone --nproc_per_node=2 scripts/ddp_check.py --backend gloo
    torchrun --standalone --nproc_per_node=1 scripts/ddp_check.py --backend nccl --device cuda

Every rank builds the same tiny MaskedLM and the same global batch: rows of varied length between
[SEP]s, masked statically with row seeds and scored through `max_predictions`, as train.py does
under --compile. Two computations of the gradient of the mean loss over every masked token of that
batch are compared:

- eager: one forward and backward of the whole global batch in a single process, no DDP, no
  compiler;
- the training path: DDP(torch.compile(model), gradient_as_bucket_view=True), each rank running
  its own micro-batches, no_sync on all but the last, each micro-batch's mean loss weighted as
  train.py's train_step weights it (its masked tokens over the global count, times the world size
  that DDP's mean divides back out).

The rows differ in how many tokens they mask, so a wrong weighting shows; DDP's buckets are kept
small so that Dynamo's DDP optimizer splits the compiled graph at bucket boundaries, as it does for
a real model. Prints the loss and the largest gradient error (relative to each parameter's largest
gradient), writes them with every parameter's error to --json, and exits 1 when an error passes
--tol. Without torchrun it runs as a single rank. Run by tests/test_ddp_compile.py (Gloo, 2 ranks)
and scripts/gpu_check.sh (NCCL)."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import socket
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# the repository, when run as scripts/ddp_check.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlm.config import TrainConfig  # noqa: E402
from mlm.errors import exit_without_teardown  # noqa: E402
from mlm.masking import IGNORE_INDEX, mask_tokens, row_seeds_for  # noqa: E402
from mlm.model import DTYPES, MaskedLM, ModelConfig  # noqa: E402

SPECIALS = dict(pad=0, unk=1, cls=2, sep=3, mask=4)  # ids below 5 are special; the rest are words
# largest |error| / largest |gradient|, per parameter
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument(
        "--device", default="cpu", help="cpu, or cuda (each rank takes the GPU of its LOCAL_RANK)"
    )
    p.add_argument(
        "--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype of both computations"
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager: no codegen)",
    )
    p.add_argument(
        "--micro-batches", type=int, default=2, help="per rank; no_sync on all but the last"
    )
    p.add_argument("--rows", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=24, help="tokens per sequence")
    p.add_argument(
        "--vocab", type=int, default=1009, help="a prime: the fused loss pads it on a GPU"
    )
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--bucket-cap-mb",
        type=float,
        default=1.0,
        help="DDP bucket size: small, for several buckets",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help=f"largest relative gradient error (default {TOLERANCE})",
    )
    p.add_argument(
        "--steps", type=int, default=2, help="accumulation steps, each compared with eager"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timeout-min",
        type=float,
        default=10.0,
        help="minutes a collective waits for the other ranks",
    )
    p.add_argument("--json", help="write the result here (rank 0)")
    return p.parse_args(argv)


def global_batch(args: argparse.Namespace, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels), both (n_rows, seq): the same on every rank. Row r holds r % 4 * 3 extra
    [SEP]s, so rows have different numbers of candidates and static masking picks different numbers
    of targets."""
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(len(SPECIALS), args.vocab, (n_rows, args.seq), generator=g)  # (B, T)
    for r in range(n_rows):
        ids[r, torch.randperm(args.seq, generator=g)[: r % 4 * 3]] = SPECIALS["sep"]
    ids[:, 0], ids[:, -1] = SPECIALS["cls"], SPECIALS["sep"]
    return mask_tokens(
        ids,
        mask_token_id=SPECIALS["mask"],
        vocab_size=args.vocab,
        special_ids=SPECIALS.values(),
        row_seeds=row_seeds_for(args.seed, torch.arange(n_rows)),
        static=True,
    )


def init_process_group(backend: str, timeout_min: float) -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun's environment; a group of one on a free port without
    it."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Largest |x - ref| over the largest |ref|: one number per tensor, blind to where the tensor is
    small."""
    return (x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)


def bucket_sizes(ddp: DDP) -> str:
    """The sizes in bytes of DDP's gradient buckets: one for everything until it rebuilds them after
    a step."""
    logged = ddp._get_ddp_logging_data()
    return logged.get("rebuilt_bucket_sizes") or logged.get("bucket_sizes", "")


def check(args: argparse.Namespace) -> dict:
    rank, world, local_rank = init_process_group(args.backend, args.timeout_min)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # fp32 means fp32 on both sides: TF32 would put ~1e-3 of rounding between them.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    # train.py's own rule
    max_predictions = TrainConfig(block_size=args.seq, compile=True).max_predictions

    torch.manual_seed(args.seed)
    config = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=2 * args.hidden + 1,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = MaskedLM(config).to(device)
    eager_model = copy.deepcopy(model)
    ids, labels = (t.to(device) for t in global_batch(args, world * args.micro_batches * args.rows))

    # Eager: the mean over all masked tokens of the global batch, in one pass.
    with autocast:
        eager_loss = eager_model(ids, labels=labels, max_predictions=max_predictions)
    scaler.scale(eager_loss).backward()

    # The training path: this rank's micro-batches, weighted as train.py's train_step weights them.
    ddp = DDP(
        torch.compile(model, backend=args.compile_backend),
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        bucket_cap_mb=args.bucket_cap_mb,
    )
    mine = range(rank * args.micro_batches * args.rows, (rank + 1) * args.micro_batches * args.rows)
    micro_batches = [(ids[rows], labels[rows]) for rows in torch.tensor(mine).split(args.rows)]
    counts = [(mb_labels != IGNORE_INDEX).sum() for _, mb_labels in micro_batches]
    total = torch.stack(counts).sum().double()
    dist.all_reduce(total)
    steps = []
    for _ in range(args.steps):
        # DDP rebuilds its buckets after the first step that all-reduces, so a second step runs on
        # the real buckets, the gradients being views into them; zeroing in between as train.py's
        # optimizer does.
        model.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for i, (mb_ids, mb_labels) in enumerate(micro_batches):
            with nullcontext() if i == len(micro_batches) - 1 else ddp.no_sync():
                with autocast:
                    mean_loss = ddp(mb_ids, labels=mb_labels, max_predictions=max_predictions)
                # DDP's mean over ranks divides the world back out
                loss = mean_loss * counts[i] / total * world
                scaler.scale(loss).backward()
            step_loss += loss.detach().double() / world
        dist.all_reduce(step_loss)
        # After the last backward every rank holds the same all-reduced gradients: compare them on
        # every rank.
        errors = {
            name: relative_error(p.grad, ref.grad)
            for (name, p), ref in zip(model.named_parameters(), eager_model.parameters())
        }
        errors["loss"] = relative_error(step_loss, eager_loss)
        worst = torch.stack(list(errors.values())).max()
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        steps.append(
            {
                "loss": step_loss.item(),
                "worst_error": worst.item(),
                "worst_of": max(errors, key=lambda k: errors[k].item()),
                "errors": {k: v.item() for k, v in errors.items()},
                "bucket_sizes": bucket_sizes(ddp),
            }
        )

    tol = args.tol if args.tol is not None else TOLERANCE[args.dtype]
    result = {
        "ok": all(math.isfinite(s["worst_error"]) and s["worst_error"] <= tol for s in steps),
        "backend": args.backend,
        "device": str(device),
        "world": world,
        "dtype": args.dtype,
        "compile_backend": args.compile_backend,
        "micro_batches": args.micro_batches,
        "rows": args.rows,
        "masked_tokens": int(total.item()),
        "eager_loss": eager_loss.item(),
        "tolerance": tol,
        "steps": steps,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
    }
    return result | {"rank": rank}


def main() -> None:
    args = parse_args()
    result = check(args)
    if result["rank"] == 0:
        print(
            f"ddp_check: {result['world']} rank(s), {result['backend']} on {result['device']}, "
            f"{result['dtype']}, "
            f"torch.compile({result['compile_backend']}), {result['micro_batches']} micro-batches "
            "of "
            f"{result['rows']} per rank, {result['masked_tokens']} masked tokens; "
            f"eager loss {result['eager_loss']:.6f}"
        )
        for i, step in enumerate(result["steps"]):
            print(
                f"  step {i}: ddp loss {step['loss']:.6f}, largest error {step['worst_error']:.2e} "
                "of the largest "
                f"value ({step['worst_of']}), DDP buckets (bytes) {step['bucket_sizes']}"
            )
        print(f"  tolerance {result['tolerance']:.0e}: {'OK' if result['ok'] else 'FAIL'}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(
                json.dumps({k: v for k, v in result.items() if k != "rank"}, indent=1)
            )
    # Every rank has the same verdict (the worst error is all-reduced). The barrier keeps the others
    # from exiting, and torchrun from stopping rank 0 on a failure, before rank 0 has printed it.
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
