"""Hugging Face-format folders in and out: `config.json`, weights, tokenizer files.

One declarative table per family maps our parameter names to HF's; the same table drives loading and
saving. A tuple of HF names means "concatenated along dim 0" (our fused QKV projection is HF's query, key
and value). `{i}` is the layer index; `{base}` is the encoder's prefix ("bert.", "roberta.",
"distilbert."), which checkpoints of a bare encoder (BertModel, all-MiniLM-L6-v2) do not have.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlm.errors import CheckpointError, ConfigError, UnsupportedModelError
from mlm.model import MaskedLM, ModelConfig
from mlm.tokenizer import Tokenizer

log = logging.getLogger("mlm")


def _wb(ours: str, theirs: str | tuple[str, ...]) -> dict:
    """A layer's weight and bias: {ours.weight: theirs.weight, ours.bias: theirs.bias}."""
    if isinstance(theirs, str):
        return {f"{ours}.{p}": f"{theirs}.{p}" for p in ("weight", "bias")}
    return {f"{ours}.{p}": tuple(f"{t}.{p}" for t in theirs) for p in ("weight", "bias")}


_BERT_LAYER = "{base}encoder.layer.{i}."
_BERT_ENCODER = {
    "embeddings.word.weight": "{base}embeddings.word_embeddings.weight",
    "embeddings.position.weight": "{base}embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": "{base}embeddings.token_type_embeddings.weight",
    **_wb("embeddings.norm", "{base}embeddings.LayerNorm"),
    **_wb("blocks.{i}.attn.qkv", tuple(_BERT_LAYER + f"attention.self.{n}" for n in ("query", "key", "value"))),
    **_wb("blocks.{i}.attn.proj", _BERT_LAYER + "attention.output.dense"),
    **_wb("blocks.{i}.attn_norm", _BERT_LAYER + "attention.output.LayerNorm"),
    **_wb("blocks.{i}.fc1", _BERT_LAYER + "intermediate.dense"),
    **_wb("blocks.{i}.fc2", _BERT_LAYER + "output.dense"),
    **_wb("blocks.{i}.mlp_norm", _BERT_LAYER + "output.LayerNorm"),
}
_DISTIL_LAYER = "{base}transformer.layer.{i}."

# Our parameter name -> HF parameter name(s). Head entries start with "head.".
KEYS = {
    "bert": {
        **_BERT_ENCODER,
        **_wb("head.dense", "cls.predictions.transform.dense"),
        **_wb("head.norm", "cls.predictions.transform.LayerNorm"),
        "head.bias": "cls.predictions.bias",
    },
    "roberta": {
        **_BERT_ENCODER,
        **_wb("head.dense", "lm_head.dense"),
        **_wb("head.norm", "lm_head.layer_norm"),
        "head.bias": "lm_head.bias",
    },
    "distilbert": {
        "embeddings.word.weight": "{base}embeddings.word_embeddings.weight",
        "embeddings.position.weight": "{base}embeddings.position_embeddings.weight",
        **_wb("embeddings.norm", "{base}embeddings.LayerNorm"),
        **_wb("blocks.{i}.attn.qkv", tuple(_DISTIL_LAYER + f"attention.{n}_lin" for n in ("q", "k", "v"))),
        **_wb("blocks.{i}.attn.proj", _DISTIL_LAYER + "attention.out_lin"),
        **_wb("blocks.{i}.attn_norm", _DISTIL_LAYER + "sa_layer_norm"),
        **_wb("blocks.{i}.fc1", _DISTIL_LAYER + "ffn.lin1"),
        **_wb("blocks.{i}.fc2", _DISTIL_LAYER + "ffn.lin2"),
        **_wb("blocks.{i}.mlp_norm", _DISTIL_LAYER + "output_layer_norm"),
        **_wb("head.dense", "vocab_transform"),
        **_wb("head.norm", "vocab_layer_norm"),
        "head.bias": "vocab_projector.bias",
    },
}
PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}
ARCHITECTURE = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "distilbert": "DistilBertForMaskedLM"}

# Keys real checkpoints carry that this model has no use for: skipped with a one-line note.
IGNORED = re.compile(
    r"(^|\.)pooler\."  # BertModel's [CLS] pooler
    r"|^cls\.seq_relationship\."  # BERT's next-sentence head
    r"|position_ids$|token_type_ids$"  # buffers some versions saved
    r"|^cls\.predictions\.decoder\.(weight|bias)$|^lm_head\.decoder\.(weight|bias)$|^vocab_projector\.weight$"  # tied copies
    r"|^(classifier|pre_classifier|qa_outputs)\."  # task heads of fine-tuned checkpoints
)

# HF config.json <-> ModelConfig. BERT and RoBERTa share field names; DistilBERT has its own.
_BERT_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "pad_token_id": "pad_token_id",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "initializer_range": "initializer_range",
}
CONFIG_FIELDS = {
    "bert": _BERT_CONFIG,
    "roberta": _BERT_CONFIG,
    "distilbert": {
        "vocab_size": "vocab_size",
        "hidden_size": "dim",
        "num_layers": "n_layers",
        "num_heads": "n_heads",
        "intermediate_size": "hidden_dim",
        "max_position_embeddings": "max_position_embeddings",
        "hidden_act": "activation",
        "pad_token_id": "pad_token_id",
        "hidden_dropout": "dropout",
        "attention_dropout": "attention_dropout",
        "initializer_range": "initializer_range",
    },
}


# ------------------------------------------------------------------------------------------ config
def config_from_hf(hf: dict) -> ModelConfig:
    """Translate a `config.json` dict into our ModelConfig."""
    family = hf.get("model_type")
    if family not in KEYS:
        raise UnsupportedModelError(
            f"model_type {family!r} is not supported; mlm loads bert, roberta and distilbert checkpoints"
        )
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"position_embedding_type {hf['position_embedding_type']!r} is not supported; only 'absolute' is"
        )
    if hf.get("tie_word_embeddings", True) is False:
        raise UnsupportedModelError("tie_word_embeddings=false is not supported; the MLM decoder is tied to the embeddings")
    defaults = ModelConfig()
    values = {ours: hf.get(theirs, getattr(defaults, ours)) for ours, theirs in CONFIG_FIELDS[family].items()}
    if values["pad_token_id"] is None:
        values["pad_token_id"] = 0
    values["head_act"] = values["hidden_act"]
    if family == "roberta":
        values.update(head_act="gelu", position_offset=values["pad_token_id"] + 1)
    if family == "distilbert":
        values.update(type_vocab_size=0, layer_norm_eps=1e-12)
    return ModelConfig(family=family, **values)


def config_to_hf(cfg: ModelConfig) -> dict:
    """Our ModelConfig as a `config.json` dict that `transformers.AutoConfig` reads."""
    out = {"architectures": [ARCHITECTURE[cfg.family]], "model_type": cfg.family}
    out.update({theirs: getattr(cfg, ours) for ours, theirs in CONFIG_FIELDS[cfg.family].items()})
    out["tie_word_embeddings"] = True
    if cfg.family == "roberta":
        out.update(bos_token_id=0, eos_token_id=2)  # RoBERTa's fixed <s> and </s> ids
    if cfg.family == "distilbert":
        out.update(sinusoidal_pos_embds=False)
    else:
        out["position_embedding_type"] = "absolute"
    return out


# ------------------------------------------------------------------------------------------ weights
def expand_keys(cfg: ModelConfig, base: str) -> dict[str, str | tuple[str, ...]]:
    """The mapping table with layer indices and the encoder prefix filled in."""
    out = {}
    for ours, theirs in KEYS[cfg.family].items():
        if ours.startswith("embeddings.token_type") and not cfg.type_vocab_size:
            continue
        layers = range(cfg.num_layers) if "{i}" in ours else [None]
        for i in layers:
            fill = (lambda s: s.format(i=i, base=base))
            out[fill(ours)] = tuple(map(fill, theirs)) if isinstance(theirs, tuple) else fill(theirs)
    return out


def state_dict_from_hf(cfg: ModelConfig, hf_state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Map an HF state dict onto our names. Returns (our state dict, our keys that are newly initialised).

    Raises CheckpointError naming every unknown key, missing key and shape mismatch at once.
    """
    # Legacy TF-era names: LayerNorm.gamma/beta are weight/bias.
    hf_state = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in hf_state.items()}
    prefix = PREFIX[cfg.family]
    base = prefix if any(k.startswith(prefix) for k in hf_state) else ""
    table = expand_keys(cfg, base)

    head_keys = [k for k in table if k.startswith("head.")]
    head_present = [k for k in head_keys if _names(table[k])[0] in hf_state]
    new_head = not head_present  # an encoder-only checkpoint: the head starts fresh
    ours_state, missing, used = {}, [], set()
    for ours, theirs in table.items():
        if new_head and ours in head_keys:
            continue
        names = _names(theirs)
        if any(n not in hf_state for n in names):
            missing += [n for n in names if n not in hf_state]
            continue
        ours_state[ours] = torch.cat([hf_state[n] for n in names]) if len(names) > 1 else hf_state[names[0]]
        used.update(names)

    leftover = [k for k in hf_state if k not in used]
    ignored = [k for k in leftover if IGNORED.search(k)]
    unknown = [k for k in leftover if not IGNORED.search(k)]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unknown:
        problems.append(f"unexpected keys: {', '.join(unknown)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match a {cfg.family} model; " + "; ".join(problems))
    if ignored:
        log.info("ignored %d unused checkpoint keys (%s)", len(ignored), _summarise(ignored))
    return ours_state, (head_keys if new_head else [])


def state_dict_to_hf(model: MaskedLM) -> dict[str, torch.Tensor]:
    """Our state dict under HF's names, QKV split back into query/key/value, ready for safetensors."""
    cfg = model.config
    ours = model.state_dict()
    out = {}
    for name, theirs in expand_keys(cfg, PREFIX[cfg.family]).items():
        names = _names(theirs)
        for n, part in zip(names, ours[name].chunk(len(names))):
            out[n] = part.detach().contiguous().cpu()
    return out


def _names(theirs: str | tuple[str, ...]) -> tuple[str, ...]:
    return theirs if isinstance(theirs, tuple) else (theirs,)


def _summarise(keys: list[str]) -> str:
    groups = sorted({re.sub(r"\.\d+\.", ".*.", k).rsplit(".", 1)[0] for k in keys})
    return ", ".join(groups[:6]) + (", ..." if len(groups) > 6 else "")


# ------------------------------------------------------------------------------------------ reading
def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e}); re-save the model") from None
            state = {}
            for shard in shards:
                state.update(_read_file(folder / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _read_file(folder / name)
    raise CheckpointError(
        f"no weights in {str(folder)!r}: expected model.safetensors, a sharded index, or pytorch_model.bin"
    )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} is missing; the folder is incomplete")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        # weights_only: a .bin is a pickle, and a pickle from the internet can run code; this refuses that.
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch raise many types for a damaged file
        raise CheckpointError(f"cannot read {str(path)!r} ({type(e).__name__}: {e}); the file is damaged") from None


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"model folder {str(folder)!r} does not exist; pass a local Hugging Face model folder")
    if not path.is_file():
        raise CheckpointError(f"no config.json in {str(folder)!r}; this is not a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


# ------------------------------------------------------------------------------------------ public API
def load_model(path: str | os.PathLike, device=None, dtype=None) -> MaskedLM:
    """Our MaskedLM with the weights of a local HF folder, in eval mode."""
    folder = Path(path)
    check_device(device)
    cfg = config_from_hf(read_hf_config(folder))
    model = MaskedLM(cfg)
    state, new_keys = state_dict_from_hf(cfg, read_hf_weights(folder))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k])}" for k, v in state.items() if v.shape != expected[k]]
    if wrong:
        raise CheckpointError(f"shape mismatch between checkpoint and config.json: {'; '.join(wrong)}")
    model.load_state_dict(state, strict=not new_keys)
    if new_keys:
        log.warning("%s has no MLM head (an encoder-only checkpoint): the head is newly initialised", folder)
    return model.to(device=device, dtype=dtype).eval()


def check_device(device) -> None:
    """A clear error for a device this machine does not have, before any work is done."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use cpu")


def load_pretrained(path: str | os.PathLike, device=None, dtype=None) -> tuple[MaskedLM, Tokenizer]:
    """(model, tokenizer) from a local Hugging Face-format folder."""
    model = load_model(path, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
            "the folder mixes files of two models"
        )
    return model, tokenizer


def save_pretrained(model: MaskedLM, tokenizer: Tokenizer | None, path: str | os.PathLike) -> None:
    """Write config.json, model.safetensors and the tokenizer files; `transformers` loads the folder as is.

    Files are written into a temporary folder beside the target and moved into place: a new folder
    appears whole, and over an existing one each file is replaced atomically, so no file is ever
    half-written (a crash between two replacements can leave some files of the previous save).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        dtype = next(model.parameters()).dtype
        config = {**config_to_hf(model.config), "dtype": str(dtype).removeprefix("torch.")}
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(state_dict_to_hf(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(staging)
        if target.exists():
            for item in staging.iterdir():
                os.replace(item, target / item.name)
            staging.rmdir()
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
