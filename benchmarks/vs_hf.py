"""Our model against transformers' AutoModelForMaskedLM: a training step, inference, and one
fill-mask call.

The unit is a Checkpoint: one folder that both sides load, with its config, weights and tokenizer.
It is either a local model folder (`bench.py --model DIR`: BERT, RoBERTa, DistilBERT, DeBERTa-v2/v3)
or a seeded random model of a named shape that transformers saved (`--sizes`, see RANDOM_MODELS),
given the shared tokenizer. A folder without an MLM head (a bare encoder such as all-MiniLM-L6-v2)
would give each side its own fresh random head; instead transformers' head, initialised from a fixed
seed, is saved with the encoder into a scratch folder that both sides then load, so both run the
very same weights.

Fairness. Both sides load fp32 weights from that folder (`parity` records their largest logit
difference on one row), see identical batches (random ids of the folder's vocabulary less its
special tokens, 15% of them labelled by mask_tokens, no padding), train in train mode (dropout on)
with torch.optim.AdamW, and run under the same autocast. HF uses SDPA attention where transformers
has it for the architecture, and its own eager attention where not (DeBERTa); the rows' extra says
which.

Utilisation (mlm/flops.py has the formulas and what they count), from the measured tokens/s over the
device's dense peak:
  MFU  model FLOPs: the full-vocabulary head counted for every token, the same number for both
       sides, so that work one side skips shows as speed, not as less work.
  HFU  hardware FLOPs, the matmul work each side actually does: our training step runs the head on
       the masked rows only (their measured share of the tokens), transformers' on every row.
       Training only: in inference both run the head on every row and HFU equals MFU.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import mlm
from benchmarks.common import (
    VOCAB_SIZE,
    Row,
    alternate,
    batch_for,
    cpu_gemm_roofline,
    cpu_transient_bytes,
    persistent_bytes,
    steps_for,
    synchronizer,
    warmup_for,
)
from mlm.flops import hardware_flops_per_token, model_flops_per_token, peak_flops
from mlm.hf import config_from_hf, load_model, read_hf_config
from mlm.kernels import position_rows
from mlm.masking import IGNORE_INDEX, mask_tokens
from mlm.model import DTYPES, ModelConfig
from mlm.tokenizer import Tokenizer

# Random models by name: (family, transformers config fields); every other field is the config
# class's default.
RANDOM_MODELS = {
    "tiny": (
        "bert",
        dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    ),
    "small": (
        "bert",
        dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    ),
    "base": (
        "bert",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    ),
    # deberta-v3-base's shape: positions only through relative attention (none added at the input),
    # 256 log buckets, both content-to-position and position-to-content terms, the key weights
    # shared with positions.
    "deberta-v3-base": (
        "deberta-v2",
        dict(
            vocab_size=128100,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            type_vocab_size=0,
            relative_attention=True,
            position_buckets=256,
            max_relative_positions=-1,
            pos_att_type="p2c|c2p",
            share_att_key=True,
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            layer_norm_eps=1e-7,
        ),
    ),
}
# ModernBERT-base's shape (its released config.json): 22 layers of 768, a GeGLU of 2 x 1,152, global
# attention every third layer and +-64 positions in the others, RoPE bases 160k and 10k, no biases
# but the decoder's, 50,368 embedding rows.
RANDOM_MODELS["modernbert-base"] = (
    "modernbert",
    dict(
        vocab_size=50368,
        hidden_size=768,
        num_hidden_layers=22,
        num_attention_heads=12,
        intermediate_size=1152,
        global_attn_every_n_layers=3,
        local_attention=128,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        cls_token_id=2,
        sep_token_id=3,
    ),
)
SIZES = tuple(RANDOM_MODELS)
HF_CLASSES = {
    "bert": ("BertConfig", "BertForMaskedLM"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForMaskedLM"),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM"),
}


def max_positions(size: str) -> int:
    """The longest sequence a random shape takes: its position table, or RoPE's limit
    (ModernBERT)."""
    return RANDOM_MODELS[size][1].get("max_position_embeddings", 512)


# Dense peak TFLOP/s by a fragment of torch.cuda.get_device_name(), first match wins. "fp32" is the
# non-tensor-core rate; "tf32" applies when float32 matmuls may use TF32
# (set_float32_matmul_precision).
SENTENCE = (
    "The quick brown fox jumps over the lazy [MASK], and the dog does not seem to mind at all."
)
WEIGHT_FILES = (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ot", ".index.json")


@dataclass
class Checkpoint:
    """One folder both sides load, and what the comparisons need to know about it."""

    name: str  # the rows' size column: a random shape's name, or the folder's
    folder: Path  # config.json, weights with an MLM head, tokenizer files
    config: ModelConfig  # as mlm reads config.json
    # the ids the tokenizer and the model share (a model may have more rows than its tokenizer)
    vocab_size: int
    token_ids: torch.Tensor  # (n,) what random batches draw from: those ids less the special ones
    mask_id: int
    special_ids: list[int]
    hf_attention: str  # "sdpa", or "eager" where transformers has no SDPA for the architecture
    notes: dict = field(default_factory=dict)  # copied into every row's extra


# -------------------------------------------------------------------------------------- checkpoints
def save_random_model(name: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A seeded random *ForMaskedLM of a RANDOM_MODELS shape, saved by transformers with the shared
    tokenizer."""
    import transformers

    family, fields = RANDOM_MODELS[name]
    config_class, model_class = (getattr(transformers, c) for c in HF_CLASSES[family])
    torch.manual_seed(seed)
    model_class(config_class(**{"vocab_size": VOCAB_SIZE, **fields})).save_pretrained(folder)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, folder / path.name)
    return folder


def load_hf(folder: Path, attention: str, loading_info: bool = False, **config):
    """transformers' AutoModelForMaskedLM of folder in fp32 (whatever dtype the folder was saved
    in), with config's keys set over config.json's."""
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(
        folder,
        attn_implementation=attention,
        dtype=torch.float32,
        output_loading_info=loading_info,
        **config,
    )


def open_checkpoint(name: str, folder: Path, scratch: Path, seed: int = 0) -> Checkpoint:
    """Read folder's config and tokenizer, pick HF's attention, and give it an MLM head if it has
    none."""
    tokenizer = Tokenizer.from_pretrained(folder)
    config = config_from_hf(read_hf_config(folder))
    # a head that transformers initialises afresh is then the same every run
    torch.manual_seed(seed)
    try:
        hf, info = load_hf(folder, "sdpa", loading_info=True)
        attention = "sdpa"
    # transformers has no SDPA path for this architecture (DeBERTa): its eager attention
    except ValueError:
        hf, info = load_hf(folder, "eager", loading_info=True)
        attention = "eager"
    notes = {
        "hf_attention": attention
        if attention == "sdpa"
        else f"eager ({type(hf).__name__} has no SDPA in transformers)"
    }
    if info["missing_keys"]:
        # A bare encoder: save the encoder with transformers' seeded fresh head, for both sides to
        # load.
        complete = scratch / f"{name}-with-head"
        hf.save_pretrained(complete)
        for path in folder.iterdir():
            if (
                path.is_file()
                and not (complete / path.name).exists()
                and not path.name.endswith(WEIGHT_FILES)
            ):
                shutil.copy(path, complete / path.name)
        notes["head"] = (
            f"none in the folder: transformers' fresh head (seed {seed}), the same on both sides"
        )
        folder = complete
    vocab_size = min(tokenizer.vocab_size, config.vocab_size)
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in tokenizer.special_ids if i < vocab_size]] = False
    return Checkpoint(
        name,
        folder,
        config,
        vocab_size,
        keep.nonzero().flatten(),
        tokenizer.mask_token_id,
        tokenizer.special_ids,
        attention,
        notes,
    )


def load_pair(ckpt: Checkpoint, device: torch.device, compile: bool):
    """(ours, HF) from the same folder, on device, in train mode, optionally torch.compiled.

    Compiling resets torch.compile first: each configuration (model, seq, dtype) then gets graphs
    specialised to its own shapes, and no row inherits the previous row's cache, whose recompilation
    for a new shape would turn that dimension dynamic. Within a configuration compile stays free to
    mark the number of masked rows (which changes from batch to batch) dynamic after the first
    change, rather than recompiling for every new count as dynamic=False would, until the recompile
    limit sends it to eager."""
    # with this device's kernels, as train.py has them
    ours = load_model(ckpt.folder, device=device).train()
    hf = load_hf(ckpt.folder, ckpt.hf_attention).to(device).train()
    if compile:
        torch._dynamo.reset()
        return torch.compile(ours), torch.compile(hf)
    return ours, hf


def random_batches(
    ckpt: Checkpoint,
    n: int,
    batch: int,
    seq: int,
    device: torch.device,
    seed: int = 0,
    static: bool = False,
) -> list:
    """n batches of (input_ids, labels), (B, T): random ids of the folder's vocabulary, 15%
    labelled, no padding; static: exactly round(0.15 T) labels per row, as train.py masks when it
    compiles."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # (B, T)
        ids = ckpt.token_ids[torch.randint(len(ckpt.token_ids), (batch, seq), generator=g)]
        masked, labels = mask_tokens(
            ids,
            mask_token_id=ckpt.mask_id,
            vocab_size=ckpt.vocab_size,
            special_ids=ckpt.special_ids,
            generator=g,
            static=static,
        )
        out.append((masked.to(device), labels.to(device)))
    return out


def autocast_for(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def parity(ckpt: Checkpoint, device: torch.device) -> float:
    """Largest logit difference between the two models in eval mode on one fp32 row: proof of same
    weights."""
    ours, hf = load_pair(ckpt, device, compile=False)
    ids = random_batches(ckpt, 1, 1, min(32, ckpt.config.max_tokens), device, seed=1)[0][0]
    with torch.no_grad():
        return (ours.eval()(ids) - hf.eval()(input_ids=ids).logits).abs().max().item()


# ---------------------------------------------------------------------------------- the comparisons
def bench_checkpoint(args, device: torch.device, ckpt: Checkpoint) -> list[Row]:
    """Every section of args.only that needs a model, at every --seq and --dtypes, on one
    checkpoint."""
    rows = []
    for section, seq, dtype in itertools.product(("train", "infer"), args.seq, args.dtypes):
        if section in args.only:
            batch = batch_for(args, seq)
            print(f"{section} {ckpt.name} seq {seq} {dtype} batch {batch} ...", flush=True)
            rows += (bench_train if section == "train" else bench_infer)(
                args, device, ckpt, seq, dtype, batch
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "fillmask" in args.only:
        print(f"fillmask {ckpt.name} ...", flush=True)
        rows += bench_fillmask(args, device, ckpt)
    for row in rows:
        row.extra.update(ckpt.notes)
    return rows


def bench_train(args, device, ckpt: Checkpoint, seq: int, dtype: str, batch: int) -> list[Row]:
    ours, hf = load_pair(ckpt, device, args.compile)
    models = {"ours": ours, "hf": hf}
    if ckpt.config.family == "modernbert" and not args.no_sparse_row:
        # A third side: transformers with sparse_prediction=True, its head on the labelled rows
        # only as ours; off is its default and the released configs', what a user gets.
        sparse = load_hf(ckpt.folder, ckpt.hf_attention, sparse_prediction=True)
        sparse = sparse.to(device).train()
        models["hf_sparse"] = torch.compile(sparse) if args.compile else sparse
    # Fused AdamW for both, as train.py and HF's Trainer (adamw_torch_fused, torch >= 2.8) use;
    # --foreach-adamw for torch's foreach one, whose per-step temporaries page-fault on the CPU.
    fused = {} if args.foreach_adamw else dict(fused=True)
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, **fused) for n, m in models.items()}
    warmup, reps = warmup_for(args), steps_for(args, ckpt.config)
    batches = random_batches(ckpt, warmup + reps, batch, seq, device, static=args.compile)
    steps = {
        n: train_step(args, device, dtype, m, optimizers[n], batches, is_hf=n != "ours")
        for n, m in models.items()
    }
    times = alternate(steps, reps, warmup, synchronizer(device))
    key = dict(
        section="train", size=ckpt.name, seq=seq, dtype=dtype, device=device.type, batch=batch
    )
    speed = {name: batch * seq / times.median(name) for name in models}
    seconds = {n: [s for s, _ in t] for n, t in times.samples.items()}
    rows = [
        Row(
            metric="throughput",
            unit="tokens/s",
            ours=speed["ours"],
            hf=speed["hf"],
            higher_is_better=True,
            extra={"step_seconds": seconds},
            **key,
        )
    ]
    if "hf_sparse" in speed:
        rows.append(
            Row(
                metric="throughput",
                unit="tokens/s",
                ours=speed["ours"],
                hf=speed["hf_sparse"],
                higher_is_better=True,
                variant="HF sparse_prediction",
                **key,
            )
        )
    # The share of rows our head ran on: the labelled tokens of the timed batches.
    labelled = sum((labels != IGNORE_INDEX).sum().item() for _, labels in batches[warmup:])
    share = labelled / (reps * batch * seq)
    rows += utilisation_rows(
        args, device, ckpt, seq, dtype, {n: speed[n] for n in ("ours", "hf")}, share, key
    )
    if device.type == "cuda":
        transient = {name: max(e["transient"] for _, e in times.samples[name]) for name in steps}
    else:  # one more step per side, untimed, watched through the process's peak resident memory
        transient = {
            name: cpu_transient_bytes(lambda run=run: run(len(batches) - 1))
            for name, run in steps.items()
        }
    if None not in transient.values():
        # This model's weights and optimizer state, plus the most its steps allocated on top: the
        # other model's memory, resident all along, is left out.
        memory = {
            name: persistent_bytes(m, optimizers[name]) + transient[name]
            for name, m in models.items()
        }
        rows.append(
            Row(
                metric="peak memory",
                unit="GiB",
                ours=memory["ours"] / 2**30,
                hf=memory["hf"] / 2**30,
                higher_is_better=False,
                **key,
            )
        )
    if args.breakdown:
        for phase in ("forward", "backward", "optimizer"):
            rows.append(
                Row(
                    metric=phase,
                    unit="ms",
                    ours=1e3 * times.median("ours", phase),
                    hf=1e3 * times.median("hf", phase),
                    higher_is_better=False,
                    **key,
                )
            )
    return times.stamp(rows)


def train_step(args, device, dtype: str, model, optimizer, batches: list, is_hf: bool):
    """One side's timed training step on batch i: forward, backward, AdamW step; the phases' seconds
    (timed apart with --breakdown) and, on CUDA, the memory the step allocated on top."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    phase_sync = synchronizer(device) if args.breakdown else (lambda: None)
    # Compiled, ours scores a fixed number of rows per sequence (max_predictions) of static masks,
    # as train.py does: shapes that do not change with the mask, so one graph and no host sync.
    max_predictions = max(1, round(0.15 * batches[0][0].shape[1])) if args.compile else None
    cuda = device.type == "cuda"

    def run(i: int) -> dict:
        ids, labels = batches[i]
        if cuda:
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with autocast_for(device, dtype):
            if is_hf:
                loss = model(input_ids=ids, labels=labels).loss  # logits for all B*T rows
            else:  # the labelled rows only
                loss = model(input_ids=ids, labels=labels, max_predictions=max_predictions)
        phase_sync()
        t1 = time.perf_counter()
        scaler.scale(loss).backward()
        phase_sync()
        t2 = time.perf_counter()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        phase_sync()
        t3 = time.perf_counter()
        extra = {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}
        if cuda:
            extra["transient"] = torch.cuda.max_memory_allocated(device) - before
        return extra

    return run


def utilisation_rows(
    args, device, ckpt: Checkpoint, seq: int, dtype: str, speed: dict, labelled: float, key: dict
) -> list[Row]:
    """MFU and HFU of both sides, where the device's peak is known (see the module docstring); on
    the CPU, the share of its measured GEMM roofline (common.cpu_gemm_roofline) each side's hardware
    FLOPs reach."""
    cfg = ckpt.config
    fraction = {n: 1.0 for n in speed}  # the rows each head runs on: all for transformers
    fraction["ours"] = labelled
    # DeBERTa's position rows and ModernBERT's local keys our installed kernels compute; None:
    # transformers' (the whole table, every key)
    scored = {n: (None, None) for n in speed}
    scored["ours"] = (position_rows(seq), 3 * (cfg.local_attention // 2))
    hardware = {
        n: hardware_flops_per_token(cfg, seq, True, fraction[n], *scored[n]) * speed[n]
        for n in speed
    }
    rows = []
    peak = peak_flops(device, dtype, args.peak_tflops)
    if peak:
        model_flops = model_flops_per_token(cfg, seq, training=True)
        extra = {"peak_tflops": peak / 1e12, "flops_per_token": model_flops}
        rows.append(
            Row(
                metric="MFU",
                unit="%",
                ours=model_flops * speed["ours"] / peak,
                hf=model_flops * speed["hf"] / peak,
                higher_is_better=True,
                extra=extra,
                **key,
            )
        )
        rows.append(
            Row(
                metric="HFU",
                unit="%",
                ours=hardware["ours"] / peak,
                hf=hardware["hf"] / peak,
                higher_is_better=True,
                extra={"peak_tflops": peak / 1e12, "head_rows_fraction": fraction},
                **key,
            )
        )
    if device.type == "cpu":
        roofline = cpu_gemm_roofline(dtype)
        rows.append(
            Row(
                metric="GEMM roofline",
                unit="%",
                ours=hardware["ours"] / roofline,
                hf=hardware["hf"] / roofline,
                higher_is_better=True,
                extra={"measured_gemm_tflops": roofline / 1e12, "head_rows_fraction": fraction},
                **key,
            )
        )
    return rows


def bench_infer(args, device, ckpt: Checkpoint, seq: int, dtype: str, batch: int) -> list[Row]:
    ours, hf = load_pair(ckpt, device, args.compile)
    ours.eval()
    hf.eval()
    warmup, reps = warmup_for(args), steps_for(args, ckpt.config)
    batches = random_batches(ckpt, warmup + reps, batch, seq, device)

    def forward(model, is_hf: bool):
        def run(i: int) -> None:
            with torch.no_grad(), autocast_for(device, dtype):
                out = model(input_ids=batches[i][0])
                logits = out.logits if is_hf else out  # (B, T, V) on both sides
            assert logits.shape == (batch, seq, ckpt.config.vocab_size)

        return run

    times = alternate(
        {"ours": forward(ours, False), "hf": forward(hf, True)}, reps, warmup, synchronizer(device)
    )
    speed = {name: batch * seq / times.median(name) for name in ("ours", "hf")}
    key = dict(
        section="infer", size=ckpt.name, seq=seq, dtype=dtype, device=device.type, batch=batch
    )
    rows = [
        Row(
            metric="throughput",
            unit="tokens/s",
            ours=speed["ours"],
            hf=speed["hf"],
            higher_is_better=True,
            **key,
        )
    ]
    peak = peak_flops(device, dtype, args.peak_tflops)
    if peak:
        flops = model_flops_per_token(ckpt.config, seq, training=False)
        rows.append(
            Row(
                metric="MFU",
                unit="%",
                ours=flops * speed["ours"] / peak,
                hf=flops * speed["hf"] / peak,
                higher_is_better=True,
                extra={"peak_tflops": peak / 1e12, "flops_per_token": flops},
                **key,
            )
        )
    return times.stamp(rows)


def bench_fillmask(args, device, ckpt: Checkpoint) -> list[Row]:
    """One sentence, with the folder's own mask token, through mlm.fill_mask and through
    transformers.pipeline("fill-mask") on the folder's own tokenizer: latency."""
    from transformers import AutoTokenizer, pipeline

    model, tokenizer = mlm.load_pretrained(ckpt.folder, device=device)
    hf = load_hf(ckpt.folder, ckpt.hf_attention).to(device).eval()
    fill = pipeline(
        "fill-mask", model=hf, tokenizer=AutoTokenizer.from_pretrained(ckpt.folder), device=device
    )
    text = SENTENCE.replace("[MASK]", tokenizer.mask_token)
    ours_answer, hf_answer = mlm.fill_mask(model, tokenizer, text), fill(text)
    same = [a["token"] for a in ours_answer] == [b["token"] for b in hf_answer]
    times = alternate(
        {"ours": lambda i: mlm.fill_mask(model, tokenizer, text), "hf": lambda i: fill(text)},
        args.calls,
        args.calls_warmup,
        synchronizer(device),
    )
    row = Row(
        section="fillmask",
        size=ckpt.name,
        seq=len(tokenizer.encode(text)),
        dtype="fp32",
        metric="latency",
        unit="ms",
        ours=1e3 * times.median("ours"),
        hf=1e3 * times.median("hf"),
        higher_is_better=False,
        device=device.type,
        batch=1,
        extra={"same_top_tokens": same},
    )
    return times.stamp([row])
