"""Hugging Face-format folders in and out: `config.json`, weights, tokenizer files.

Each family has one table, written out literally: HF parameter name -> ours. The same table drives loading
and saving. In an HF name `{i}` is the layer index and `{base}` the encoder's prefix ("bert.", "roberta.",
"distilbert."), which checkpoints of a bare encoder (BertModel, all-MiniLM-L6-v2) do not have. A tuple of
HF names is one of our tensors cut along dim 0: our fused QKV projection is HF's query, key and value.
`None` marks a key HF writes that our model has no use for; it is there so the table names every key.
On loading, every key the model does not use, in the table or not (a classifier, any other head), is
skipped with one note naming them; missing weights and shape mismatches are errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from mlm.distributed import check_device
from mlm.errors import CheckpointError, UnsupportedModelError
from mlm.io import atomic_write
from mlm.model import MaskedLM, ModelConfig
from mlm.tokenizer import Tokenizer

log = logging.getLogger("mlm")

BERT_KEYS = {
    "{base}embeddings.word_embeddings.weight": "embeddings.word.weight",
    "{base}embeddings.position_embeddings.weight": "embeddings.position.weight",
    "{base}embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "{base}embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "{base}embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "{base}embeddings.position_ids": None,  # buffers that older transformers versions saved
    "{base}embeddings.token_type_ids": None,
    ("{base}encoder.layer.{i}.attention.self.query.weight",
     "{base}encoder.layer.{i}.attention.self.key.weight",
     "{base}encoder.layer.{i}.attention.self.value.weight"): "blocks.{i}.attn.qkv.weight",
    ("{base}encoder.layer.{i}.attention.self.query.bias",
     "{base}encoder.layer.{i}.attention.self.key.bias",
     "{base}encoder.layer.{i}.attention.self.value.bias"): "blocks.{i}.attn.qkv.bias",
    "{base}encoder.layer.{i}.attention.output.dense.weight": "blocks.{i}.attn.proj.weight",
    "{base}encoder.layer.{i}.attention.output.dense.bias": "blocks.{i}.attn.proj.bias",
    "{base}encoder.layer.{i}.attention.output.LayerNorm.weight": "blocks.{i}.attn_norm.weight",
    "{base}encoder.layer.{i}.attention.output.LayerNorm.bias": "blocks.{i}.attn_norm.bias",
    "{base}encoder.layer.{i}.intermediate.dense.weight": "blocks.{i}.fc1.weight",
    "{base}encoder.layer.{i}.intermediate.dense.bias": "blocks.{i}.fc1.bias",
    "{base}encoder.layer.{i}.output.dense.weight": "blocks.{i}.fc2.weight",
    "{base}encoder.layer.{i}.output.dense.bias": "blocks.{i}.fc2.bias",
    "{base}encoder.layer.{i}.output.LayerNorm.weight": "blocks.{i}.mlp_norm.weight",
    "{base}encoder.layer.{i}.output.LayerNorm.bias": "blocks.{i}.mlp_norm.bias",
    "{base}pooler.dense.weight": None,  # the [CLS] pooler, used by next-sentence and sentence tasks
    "{base}pooler.dense.bias": None,
    "cls.predictions.transform.dense.weight": "head.dense.weight",
    "cls.predictions.transform.dense.bias": "head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
    "cls.predictions.bias": "head.bias",
    "cls.predictions.decoder.weight": None,  # tied to the word embeddings
    "cls.predictions.decoder.bias": None,  # the same tensor as cls.predictions.bias
    "cls.seq_relationship.weight": None,  # BertForPreTraining's next-sentence head
    "cls.seq_relationship.bias": None,
}

ROBERTA_KEYS = {
    "{base}embeddings.word_embeddings.weight": "embeddings.word.weight",
    "{base}embeddings.position_embeddings.weight": "embeddings.position.weight",
    "{base}embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "{base}embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "{base}embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "{base}embeddings.position_ids": None,  # buffers that older transformers versions saved
    "{base}embeddings.token_type_ids": None,
    ("{base}encoder.layer.{i}.attention.self.query.weight",
     "{base}encoder.layer.{i}.attention.self.key.weight",
     "{base}encoder.layer.{i}.attention.self.value.weight"): "blocks.{i}.attn.qkv.weight",
    ("{base}encoder.layer.{i}.attention.self.query.bias",
     "{base}encoder.layer.{i}.attention.self.key.bias",
     "{base}encoder.layer.{i}.attention.self.value.bias"): "blocks.{i}.attn.qkv.bias",
    "{base}encoder.layer.{i}.attention.output.dense.weight": "blocks.{i}.attn.proj.weight",
    "{base}encoder.layer.{i}.attention.output.dense.bias": "blocks.{i}.attn.proj.bias",
    "{base}encoder.layer.{i}.attention.output.LayerNorm.weight": "blocks.{i}.attn_norm.weight",
    "{base}encoder.layer.{i}.attention.output.LayerNorm.bias": "blocks.{i}.attn_norm.bias",
    "{base}encoder.layer.{i}.intermediate.dense.weight": "blocks.{i}.fc1.weight",
    "{base}encoder.layer.{i}.intermediate.dense.bias": "blocks.{i}.fc1.bias",
    "{base}encoder.layer.{i}.output.dense.weight": "blocks.{i}.fc2.weight",
    "{base}encoder.layer.{i}.output.dense.bias": "blocks.{i}.fc2.bias",
    "{base}encoder.layer.{i}.output.LayerNorm.weight": "blocks.{i}.mlp_norm.weight",
    "{base}encoder.layer.{i}.output.LayerNorm.bias": "blocks.{i}.mlp_norm.bias",
    "{base}pooler.dense.weight": None,  # RobertaModel's [CLS] pooler
    "{base}pooler.dense.bias": None,
    "lm_head.dense.weight": "head.dense.weight",
    "lm_head.dense.bias": "head.dense.bias",
    "lm_head.layer_norm.weight": "head.norm.weight",
    "lm_head.layer_norm.bias": "head.norm.bias",
    "lm_head.bias": "head.bias",
    "lm_head.decoder.weight": None,  # tied to the word embeddings
    "lm_head.decoder.bias": None,  # the same tensor as lm_head.bias
}

DISTILBERT_KEYS = {
    "{base}embeddings.word_embeddings.weight": "embeddings.word.weight",
    "{base}embeddings.position_embeddings.weight": "embeddings.position.weight",
    "{base}embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "{base}embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "{base}embeddings.position_ids": None,  # a buffer that older transformers versions saved
    ("{base}transformer.layer.{i}.attention.q_lin.weight",
     "{base}transformer.layer.{i}.attention.k_lin.weight",
     "{base}transformer.layer.{i}.attention.v_lin.weight"): "blocks.{i}.attn.qkv.weight",
    ("{base}transformer.layer.{i}.attention.q_lin.bias",
     "{base}transformer.layer.{i}.attention.k_lin.bias",
     "{base}transformer.layer.{i}.attention.v_lin.bias"): "blocks.{i}.attn.qkv.bias",
    "{base}transformer.layer.{i}.attention.out_lin.weight": "blocks.{i}.attn.proj.weight",
    "{base}transformer.layer.{i}.attention.out_lin.bias": "blocks.{i}.attn.proj.bias",
    "{base}transformer.layer.{i}.sa_layer_norm.weight": "blocks.{i}.attn_norm.weight",
    "{base}transformer.layer.{i}.sa_layer_norm.bias": "blocks.{i}.attn_norm.bias",
    "{base}transformer.layer.{i}.ffn.lin1.weight": "blocks.{i}.fc1.weight",
    "{base}transformer.layer.{i}.ffn.lin1.bias": "blocks.{i}.fc1.bias",
    "{base}transformer.layer.{i}.ffn.lin2.weight": "blocks.{i}.fc2.weight",
    "{base}transformer.layer.{i}.ffn.lin2.bias": "blocks.{i}.fc2.bias",
    "{base}transformer.layer.{i}.output_layer_norm.weight": "blocks.{i}.mlp_norm.weight",
    "{base}transformer.layer.{i}.output_layer_norm.bias": "blocks.{i}.mlp_norm.bias",
    "vocab_transform.weight": "head.dense.weight",
    "vocab_transform.bias": "head.dense.bias",
    "vocab_layer_norm.weight": "head.norm.weight",
    "vocab_layer_norm.bias": "head.norm.bias",
    "vocab_projector.bias": "head.bias",
    "vocab_projector.weight": None,  # tied to the word embeddings
}

KEYS = {"bert": BERT_KEYS, "roberta": ROBERTA_KEYS, "distilbert": DISTILBERT_KEYS}
BASE = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}
ARCHITECTURE = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "distilbert": "DistilBertForMaskedLM"}

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
def expand(table: dict, base: str, num_layers: int) -> list[tuple[tuple[str, ...], str | None]]:
    """A table's entries with {base} and {i} filled in, one per layer: (HF names, our name or None)."""
    out = []
    for theirs, ours in table.items():
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for i in range(num_layers) if "{i}" in theirs[0] else [None]:
            out.append((tuple(t.format(base=base, i=i) for t in theirs), None if ours is None else ours.format(i=i)))
    return out


def state_dict_from_hf(
    model: MaskedLM, hf_state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an HF state dict onto the model's names: (our state dict, our keys left freshly initialised).

    Keys the model has no use for are skipped with one note naming them, as transformers does. Missing
    weights and shape mismatches raise CheckpointError naming the keys.
    """
    cfg, expected = model.config, model.state_dict()
    # Legacy TF-era names: LayerNorm.gamma/beta are weight/bias.
    hf_state = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in hf_state.items()}
    # With the family's prefix or, for a bare encoder, without: whichever finds more keys (the prefix on a tie,
    # so that an error names the keys a full checkpoint has).
    readings = [expand(KEYS[cfg.family], base, cfg.num_layers) for base in (BASE[cfg.family], "")]
    entries = max(readings, key=lambda e: sum(n in hf_state for names, _ in e for n in names))
    # `None` entries, and entries for parameters this config does not have (token types when
    # type_vocab_size is 0), are not wanted.
    wanted = {ours: names for names, ours in entries if ours in expected}
    # Not one head key: an encoder-only checkpoint, whose head keeps its fresh initialisation.
    head = [ours for ours in wanted if ours.startswith("head.")]
    new_head = not any(n in hf_state for ours in head for n in wanted[ours])

    state, missing, used = {}, [], set()
    for ours, names in wanted.items():
        if new_head and ours in head:
            continue
        if any(n not in hf_state for n in names):
            missing += [n for n in names if n not in hf_state]
            continue
        state[ours] = torch.cat([hf_state[n] for n in names]) if len(names) > 1 else hf_state[names[0]]
        used.update(names)
    if missing:
        problem = f"checkpoint does not match a {cfg.family} model"
        if not used:  # not one key in common: most likely the weights of another family
            found = ", ".join(sorted({k.split(".")[0] + ".*" for k in hf_state}))
            problem += f": its keys are {found} (is model_type in config.json right?)"
        raise CheckpointError(f"{problem}; missing keys: {_summarise(missing)}")
    shapes = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()}
    wrong = [f"{k} {have} vs {want}" for k, (have, want) in shapes.items() if have != want]
    if wrong:
        raise CheckpointError(f"shape mismatch between checkpoint and config.json: {'; '.join(wrong)}")
    unused = [k for k in hf_state if k not in used]
    if unused:
        log.info("ignored %d unused checkpoint keys (%s)", len(unused), _summarise(unused))
    return state, (head if new_head else [])


def state_dict_to_hf(model: MaskedLM) -> dict[str, torch.Tensor]:
    """Our state dict under HF's names, QKV cut back into query, key and value, ready for safetensors."""
    cfg, ours = model.config, model.state_dict()
    out = {}
    for names, name in expand(KEYS[cfg.family], BASE[cfg.family], cfg.num_layers):
        if name not in ours:  # a key we drop (None), or a parameter this config does not have
            continue
        for n, part in zip(names, ours[name].chunk(len(names))):
            out[n] = part.detach().contiguous().cpu()
    return out


def _summarise(keys: list[str]) -> str:
    """Keys named compactly for one line, in their order: keys that differ only in a layer index are named
    once with * for it, a weight and its bias as `name.*`; a key on its own is named in full."""
    by_pattern: dict[str, list[str]] = {}
    for k in keys:
        by_pattern.setdefault(re.sub(r"(?<=\.)\d+(?=\.)", "*", k), []).append(k)
    names = [group[0] if len(group) == 1 else pattern for pattern, group in by_pattern.items()]
    by_parent: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent if leaf in ("weight", "bias") else name, []).append(name)
    return ", ".join(
        group[0] if len(group) == 1 else parent.removesuffix(".*") + ".*" for parent, group in by_parent.items()
    )


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
    model = MaskedLM(config_from_hf(read_hf_config(folder)))
    state, new_keys = state_dict_from_hf(model, read_hf_weights(folder))
    model.load_state_dict(state, strict=not new_keys)
    if new_keys:
        log.warning("%s has no MLM head (an encoder-only checkpoint): the head is newly initialised", folder)
    return model.to(device=device, dtype=dtype).eval()


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
    """Write model.safetensors, the tokenizer files and config.json; `transformers` loads the folder as is.

    Each file is written atomically (mlm/io.py): a reader sees the previous file or the new one, never part
    of one. The folder is not: over an existing save, a crash between two files leaves a mix of the two.
    config.json goes last, so an interrupted save into a new folder does not look like a model.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = safetensors.torch.save(state_dict_to_hf(model), metadata={"format": "pt"})
    atomic_write(folder / "model.safetensors", weights)
    if tokenizer is not None:
        tokenizer.save(folder)
    dtype = next(model.parameters()).dtype
    config = {**config_to_hf(model.config), "dtype": str(dtype).removeprefix("torch.")}
    atomic_write(folder / "config.json", json.dumps(config, indent=2, sort_keys=True))
