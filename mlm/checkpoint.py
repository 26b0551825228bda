"""A training run's folder: checkpoints to resume from, metrics.jsonl, and the loss plot.

    <out>/checkpoints/step_00001200.pt   full state (model, optimizer, scaler, step, config)
    <out>/metrics.jsonl                  one JSON object per line: training steps and evaluations
    <out>/loss.png                       training loss and validation perplexity (with matplotlib)
    <out>/best/, <out>/final/            Hugging Face folders (written by mlm.hf.save_pretrained)

Every file is written through mlm.io.AtomicFile, so a crash, a kill or a full disk leaves the
previous checkpoint whole; resuming takes the newest checkpoint that loads and skips a damaged one.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mlm.errors import CheckpointError, ConfigError, StorageError
from mlm.io import STORAGE_ERRNOS, AtomicFile, atomic_write, storage_error

# Settings that must match to resume a run; the rest (max_steps, eval_every, ...) may change.
RESUME_KEYS = (
    "init",
    "model",
    "block_size",
    "global_batch_size",
    "seed",
    "mlm_probability",
    "whole_word_mask",
    "tokenizer",
    "tokenizer_kind",
    "data",
)
STATE_KEYS = {"model", "optimizer", "step", "config"}


@dataclass
class Progress:
    """What the training loop carries from step to step, and what a checkpoint restores with the
    weights."""

    step: int = 0
    best_val: float = math.inf
    best_step: int = -1
    # the micro-batch size --micro-batch-size auto settled on (0: not chosen that way)
    micro_batch: int = 0


def training_state(config: dict, model, optimizer, scaler, progress: Progress) -> dict:
    """Everything a resumed run needs to continue bit for bit: the RNG is re-seeded from the step,
    the learning rate is a function of it, and the data order and masks are functions of (seed,
    step)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        **asdict(progress),
        "config": comparable(config),
        "model_config": asdict(model.config),
    }


def restore(state: dict | None, model, optimizer, scaler) -> Progress:
    """Load a checkpoint's weights and optimizer state; the progress it records (a fresh one without
    a state)."""
    if state is None:
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return Progress(
        state["step"], state["best_val"], state["best_step"], state.get("micro_batch", 0)
    )


class RunFolder:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.checkpoints = self.out / "checkpoints"
        self.metrics = self.out / "metrics.jsonl"
        self.plot = self.out / "loss.png"

    # ---------------------------------------------------------------------------------- checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.pt"

    def checkpoint_paths(self) -> list[Path]:
        """Checkpoints in the folder, newest first."""
        return sorted(self.checkpoints.glob("step_*.pt"), reverse=True)

    def save_checkpoint(self, state: dict, step: int, keep: set[Path], keep_last: int) -> Path:
        """Write atomically, then drop old checkpoints except those in `keep` (the best) and the
        last K.

        Old checkpoints go only once the new one is whole, so a failed write leaves the newest good
        one."""
        path = self.checkpoint_path(step)
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            with AtomicFile(path) as f:
                torch.save(state, f.file)
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(path, e) from None
            raise
        except RuntimeError as e:  # torch's zip writer reports a failed write without its errno
            raise self._write_failed(path, e) from None
        for old in self.checkpoint_paths()[keep_last:]:
            if old not in keep:
                old.unlink()
        return path

    def _write_failed(self, path: Path, error: RuntimeError) -> Exception:
        """torch.save's zip writer turns a failed write (a full disk) into a RuntimeError without
        the errno."""
        if "inline_container" not in str(error) and "write" not in str(error):
            return error
        stat = os.statvfs(self.checkpoints)
        newest = self.checkpoint_paths()[:1]
        kept = f"; {newest[0].name} is intact" if newest else ""
        return StorageError(
            f"cannot write {path} ({stat.f_bavail * stat.f_frsize / 2**20:,.0f} MiB free on that "
            f"disk){kept}; free some space (or choose another --out) and resume with --resume"
        )

    def load_newest_checkpoint(self) -> dict | None:
        """The newest checkpoint that loads; a corrupt or truncated one is reported and skipped."""
        for path in self.checkpoint_paths():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not STATE_KEYS <= set(state):
                    raise CheckpointError("keys are missing")
                state["path"] = str(path)
                return state
            except Exception as e:  # a damaged zip raises many types
                print(
                    f"warning: skipping damaged checkpoint {path} ({type(e).__name__}: {e})",
                    file=sys.stderr,
                )
        return None

    def resume_state(self, config: dict, resume: bool) -> dict | None:
        """The state to resume from, if any; refuses to mix two runs in one folder."""
        existing = self.checkpoint_paths()
        if not resume:
            if existing or (self.out / "final").exists():
                raise ConfigError(
                    f"{self.out} already holds a run; pass --resume to continue it, or choose "
                    "another --out"
                )
            return None
        state = self.load_newest_checkpoint()
        if state is None:
            if existing:
                raise CheckpointError(
                    f"every checkpoint in {self.checkpoints} is damaged; remove them to start over"
                )
            print(f"note: no checkpoint in {self.out}, starting from step 0", file=sys.stderr)
            return None
        before, now = state["config"], comparable(config)
        changed = [k for k in RESUME_KEYS if comparable(before.get(k)) != now.get(k)]
        if changed:
            raise ConfigError(
                f"--resume with different {', '.join(changed)} than the run in {self.out}; "
                "use the same settings"
            )
        return state

    # -------------------------------------------------------------------------------------- metrics
    def log(self, record: dict) -> None:
        """Append one line to metrics.jsonl (a line is small: one write, never interleaved)."""
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(self.metrics, e) from None
            raise

    def records(self) -> list[dict]:
        """Every line of metrics.jsonl, in order."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

    def keep_metrics_until(self, step: int) -> None:
        """On resume, drop metric lines from after the checkpoint: those steps run again."""
        if not self.metrics.is_file():
            return
        lines = [
            line
            for line in self.metrics.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        atomic_write(self.metrics, "".join(line + "\n" for line in lines))

    def plot_metrics(self) -> None:
        """Training loss and validation perplexity against steps, when matplotlib is installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        records = self.records()
        train_rows = [r for r in records if "loss" in r]
        val_rows = [r for r in records if "val_loss" in r]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(
            [r["step"] for r in train_rows],
            [r["loss"] for r in train_rows],
            marker=".",
            label="training",
        )
        a.plot(
            [r["step"] for r in val_rows],
            [r["val_loss"] for r in val_rows],
            marker="o",
            label="validation",
        )
        a.set(xlabel="step", ylabel="MLM loss (masked tokens)")
        a.legend()
        b.plot([r["step"] for r in val_rows], [r["val_ppl"] for r in val_rows], marker="o")
        b.set(xlabel="step", ylabel="validation perplexity", yscale="log")
        fig.tight_layout()
        with AtomicFile(self.plot, fsync=False) as f:
            fig.savefig(f.file, format="png")
        plt.close(fig)


def comparable(value):
    """A value as it reads back from JSON: tuples and lists compare equal after the round trip."""
    return json.loads(json.dumps(value))
