"""What a training run reports every --log-every steps: loss, learning rate, gradient norm,
throughput over the steps since the last report, and utilisation on a GPU whose peak is known (MFU,
HFU).

The loss and the gradient norm stay on the device between reports: reading them is the wait for the
GPU, so it happens only here, every --log-every steps.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from mlm import kernels
from mlm.checkpoint import RunFolder
from mlm.config import TrainConfig
from mlm.distributed import Dist
from mlm.errors import MLMError
from mlm.flops import hardware_flops_per_token, model_flops_per_token, peak_flops
from mlm.model import ModelConfig


class Meter:
    def __init__(
        self, cfg: TrainConfig, job: Dist, folder: RunFolder, config: ModelConfig, installed: dict
    ):
        self.cfg, self.job, self.folder = cfg, job, folder
        self.clock, self.tokens = time.perf_counter(), 0
        # Model FLOPs (the full-vocabulary head on every token, as MFU is usually quoted) and
        # hardware FLOPs (the head only on the rows it runs on, DeBERTa's position terms on the rows
        # its kernel multiplies): see mlm/flops.py.
        self.peak = peak_flops(job.device, cfg.dtype)
        T = cfg.block_size
        head_rows = cfg.max_predictions / T if cfg.max_predictions else cfg.mlm_probability
        rows = kernels.position_rows(T) if "disentangled_bias" in installed else None
        self.flops = (
            model_flops_per_token(config, T, training=True),
            hardware_flops_per_token(
                config, T, True, head_rows_fraction=head_rows, position_rows=rows
            ),
        )
        self.bad_steps = 0  # non-finite steps in a row
        self.skipped = 0  # since the last report

    def step(
        self,
        done: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        bar,
        next_lr: float,
        epoch: float,
    ) -> None:
        """After step `done`: count it, and every --log-every steps log a line. next_lr is shown as
        HF's Trainer shows it, the rate of the next step."""
        cfg, master = self.cfg, self.job.master
        self.tokens += cfg.global_batch_size * cfg.block_size
        self.skipped += self.bad_steps > 0
        if self.bad_steps >= cfg.max_bad_steps:
            raise MLMError(
                f"loss was NaN/inf for {self.bad_steps} steps in a row (step {done - 1}); "
                "lower --lr, use --dtype bf16 or fp32, or check the data"
            )
        if done % cfg.log_every and done != cfg.max_steps:
            return
        if self.skipped and master:
            where = (
                f"{self.skipped} of the steps up to {done - 1}"
                if self.skipped > 1
                else f"step {done - 1}"
            )
            tqdm.write(
                f"warning: non-finite loss or gradient at {where}; step skipped", file=sys.stderr
            )
        self.skipped = 0
        if not master:
            return
        # Over the steps since the last report: compilation and evaluations before it do not count.
        now = time.perf_counter()
        tokens_per_s = self.tokens / max(now - self.clock, 1e-9)
        self.tokens, self.clock = 0, now
        record = {
            "step": done,
            "loss": loss.item(),
            "lr": next_lr,
            "grad_norm": grad_norm.item(),
            "epoch": round(epoch, 4),
            "tokens_per_s": tokens_per_s,
        }
        if self.peak:
            world = self.job.world  # tokens_per_s counts every rank's tokens; the peak is one GPU's
            record["mfu"] = tokens_per_s * self.flops[0] / (world * self.peak)
            record["hfu"] = tokens_per_s * self.flops[1] / (world * self.peak)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            lr=f"{next_lr:.2e}",
            tok_s=f"{tokens_per_s:,.0f}",
            refresh=False,
        )
        self.folder.log(record)
