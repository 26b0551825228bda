"""Hugging Face-format folders in and out: `config.json`, weights, tokenizer files.

Each family's key table (mlm/hf_tables.py, written out literally) drives loading and saving alike;
`expand` fills in its layer indices and prefix. On loading, every key the model does not use, in the
table or not (a classifier, any other head), is skipped with one note naming them; missing weights
and shape mismatches are errors."""

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
from mlm.hf_tables import (
    ARCHITECTURE,
    BASE,
    CONFIG_FIELDS,
    DEBERTA_DEFAULTS,
    DEBERTA_HEADS,
    KEYS,
    LAYER_TYPES,
    MODERNBERT_DEFAULTS,
)
from mlm.io import atomic_write
from mlm.kernels import install
from mlm.model import MaskedLM, ModelConfig
from mlm.tokenizer import Tokenizer

log = logging.getLogger("mlm")


# ------------------------------------------------------------------------------------------ config
def config_from_hf(hf: dict) -> ModelConfig:
    """Translate a `config.json` dict into our ModelConfig."""
    family = hf.get("model_type")
    if family not in KEYS:
        raise UnsupportedModelError(
            f"model_type {family!r} is not supported; mlm loads bert, roberta, distilbert, "
            "deberta-v2 and modernbert checkpoints"
        )
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"position_embedding_type {hf['position_embedding_type']!r} is not supported; only "
            "'absolute' is"
        )
    if hf.get("tie_word_embeddings", True) is False:
        raise UnsupportedModelError(
            "tie_word_embeddings=false is not supported; the MLM decoder is tied to the embeddings"
        )
    defaults = ModelConfig()
    if family == "deberta-v2":
        hf = {**DEBERTA_DEFAULTS, **hf}
    if family == "modernbert":
        hf = {**MODERNBERT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    values = {
        ours: hf.get(theirs, getattr(defaults, ours))
        for ours, theirs in CONFIG_FIELDS[family].items()
    }
    if values["pad_token_id"] is None:
        values["pad_token_id"] = 0
    values.setdefault("head_act", values["hidden_act"])
    if family == "roberta":
        values.update(head_act="gelu", position_offset=values["pad_token_id"] + 1)
    if family == "distilbert":
        values.update(type_vocab_size=0, layer_norm_eps=1e-12)
    if family == "deberta-v2":
        values.update(_deberta_from_hf(hf, values["hidden_size"], values["num_heads"]))
    if family == "modernbert":
        values.update(_modernbert_from_hf(hf), type_vocab_size=0)
    return ModelConfig(family=family, **values)


def _modernbert_from_hf(hf: dict) -> dict:
    """ModernBERT's layer pattern and RoPE bases from either form config.json takes: transformers
    5's layer_types and rope_parameters, or the released checkpoints' global_attn_every_n_layers and
    global/local_rope_theta. As in transformers, the first form wins where both are given."""
    n = hf["global_attn_every_n_layers"]
    ours = {v: k for k, v in LAYER_TYPES.items()}
    if hf.get("layer_types"):
        unknown = set(hf["layer_types"]) - set(ours)
        if unknown:
            raise UnsupportedModelError(
                f"layer_types {sorted(unknown)} are not supported; mlm runs "
                f"{' and '.join(LAYER_TYPES.values())} layers"
            )
        layer_types = tuple(ours[t] for t in hf["layer_types"])
    else:
        layer_types = tuple("local" if i % n else "global" for i in range(hf["num_hidden_layers"]))
    theta = {"global": hf["global_rope_theta"], "local": hf["local_rope_theta"]}
    for kind, name in LAYER_TYPES.items():
        rope = (hf.get("rope_parameters") or {}).get(name) or {}
        if rope.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"rope_type {rope['rope_type']!r} ({name}) is not supported; "
                "mlm runs the default RoPE"
            )
        theta[kind] = rope.get("rope_theta", theta[kind])
    return dict(
        layer_types=layer_types,
        global_rope_theta=theta["global"],
        local_rope_theta=theta["local"],
        global_attn_every_n_layers=n,
    )


def _deberta_from_hf(hf: dict, hidden: int, heads: int) -> dict:
    """The DeBERTa fields that change form between config.json and ModelConfig; refuses what mlm
    does not run."""
    if hf["conv_kernel_size"] > 0:
        raise UnsupportedModelError(
            f"conv_kernel_size {hf['conv_kernel_size']} (the convolution layer of "
            "deberta-v2-xlarge/xxlarge) is not supported; mlm runs DeBERTa without it"
        )
    if not hf["relative_attention"]:
        raise UnsupportedModelError(
            "relative_attention=false is not supported; mlm runs DeBERTa with relative attention"
        )
    if hf.get("attention_head_size", hidden // heads) != hidden // heads:
        raise UnsupportedModelError(
            f"attention_head_size {hf['attention_head_size']} is not supported; mlm needs "
            f"hidden_size / num_attention_heads = {hidden // heads}"
        )
    if hf.get("z_steps"):
        raise UnsupportedModelError(
            f"z_steps {hf['z_steps']} (re-running the last layer) is not supported"
        )
    terms = hf["pos_att_type"] or []
    terms = [
        t.strip().lower()
        for t in (terms.split("|") if isinstance(terms, str) else terms)
        if t.strip()
    ]
    if not terms or set(terms) - {"c2p", "p2c"}:
        raise UnsupportedModelError(
            f"pos_att_type {hf['pos_att_type']!r} is not supported; mlm runs c2p, p2c or both"
        )
    embedding_size = hf.get("embedding_size") or hidden
    if not hf["legacy"] and embedding_size != hidden:
        raise UnsupportedModelError(
            f"legacy=false with embedding_size {embedding_size} != hidden_size {hidden}: "
            "that head cannot be tied to the embeddings (transformers fails on it too)"
        )
    norm = [x.strip() for x in str(hf["norm_rel_ebd"]).lower().split("|")]
    return dict(
        position_terms=tuple(terms),
        embedding_size=embedding_size,
        norm_relative="layer_norm" in norm,
        position_buckets=max(hf["position_buckets"], 0),
    )


def config_to_hf(cfg: ModelConfig, tokenizer: Tokenizer | None = None) -> dict:
    """Our ModelConfig as a `config.json` dict that `transformers.AutoConfig` reads; a ModernBERT's
    carries the special-token ids of the tokenizer saved with it."""
    out = {"architectures": [ARCHITECTURE[cfg.family]], "model_type": cfg.family}
    out.update({theirs: getattr(cfg, ours) for ours, theirs in CONFIG_FIELDS[cfg.family].items()})
    out["tie_word_embeddings"] = True
    if cfg.family == "roberta":
        out.update(bos_token_id=0, eos_token_id=2)  # RoBERTa's fixed <s> and </s> ids
    if cfg.family == "distilbert":
        out.update(sinusoidal_pos_embds=False)
    elif cfg.family == "deberta-v2":
        out.update(
            relative_attention=True,
            pos_att_type=list(cfg.position_terms),
            norm_rel_ebd="layer_norm" if cfg.norm_relative else "none",
            embedding_size=cfg.embedding_size,
        )
    elif cfg.family == "modernbert":
        out.update(_modernbert_to_hf(cfg, tokenizer))
    else:
        out["position_embedding_type"] = "absolute"
    return out


def _modernbert_to_hf(cfg: ModelConfig, tokenizer: Tokenizer | None) -> dict:
    """Both forms of the layer pattern and RoPE bases: transformers 5 reads layer_types and
    rope_parameters, 4.48 to 4.57 only global_attn_every_n_layers and the thetas."""
    out = {
        "layer_types": [LAYER_TYPES[t] for t in cfg.layer_types],
        "rope_parameters": {
            LAYER_TYPES["global"]: {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
            LAYER_TYPES["local"]: {"rope_type": "default", "rope_theta": cfg.local_rope_theta},
        },
        "global_rope_theta": cfg.global_rope_theta,
        "local_rope_theta": cfg.local_rope_theta,
    }

    def pattern(n: int) -> tuple[str, ...]:
        return tuple("local" if i % n else "global" for i in range(cfg.num_layers))

    # The config's own n first, else the smallest that makes the same pattern.
    every = [cfg.global_attn_every_n_layers, *range(1, cfg.num_layers + 1)]
    periodic = next((n for n in every if n >= 1 and pattern(n) == cfg.layer_types), None)
    if periodic is None:
        log.warning(
            "layer_types %s is not every n-th layer global: transformers 4 cannot read this "
            "config.json (it knows only global_attn_every_n_layers)",
            "".join(t[0] for t in cfg.layer_types),
        )
    else:
        out["global_attn_every_n_layers"] = periodic
    ids = {"pad": cfg.pad_token_id, "cls": cfg.cls_token_id, "sep": cfg.sep_token_id}
    if tokenizer is not None:
        ids = {
            "pad": tokenizer.pad_token_id,
            "cls": tokenizer.cls_token_id,
            "sep": tokenizer.sep_token_id,
        }
    return {
        **out,
        "pad_token_id": ids["pad"],
        "cls_token_id": ids["cls"],
        "bos_token_id": ids["cls"],
        "sep_token_id": ids["sep"],
        "eos_token_id": ids["sep"],
    }


# ------------------------------------------------------------------------------------------ weights
def expand(table: dict, base: str, num_layers: int) -> list[tuple[tuple[str, ...], str | None]]:
    """A table's entries with {base} and {i} filled in, one per layer: (HF names, our name or
    None)."""
    out = []
    for theirs, ours in table.items():
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for i in range(num_layers) if "{i}" in theirs[0] else [None]:
            out.append(
                (
                    tuple(t.format(base=base, i=i) for t in theirs),
                    None if ours is None else ours.format(i=i),
                )
            )
    return out


def table_for(cfg: ModelConfig) -> dict:
    """The family's table as this config reads it. Of DeBERTa's two head namings only the one
    config.json's `legacy` picks is the head, on loading and on saving; the other's keys are then
    unused, as in transformers."""
    if cfg.family != "deberta-v2":
        return KEYS[cfg.family]
    other = DEBERTA_HEADS[not cfg.legacy_head]  # head keys are plain strings, never QKV tuples
    return {
        theirs: None if str(theirs).startswith(other) else ours
        for theirs, ours in KEYS[cfg.family].items()
    }


def state_dict_from_hf(
    model: MaskedLM, hf_state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an HF state dict onto the model's names: (our state dict, our keys left freshly
    initialised).

    Keys the model has no use for are skipped with one note naming them, as transformers does.
    Missing weights and shape mismatches raise CheckpointError naming the keys."""
    cfg, expected = model.config, model.state_dict()
    # Legacy TF-era names: LayerNorm.gamma/beta are weight/bias.
    hf_state = {
        re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v
        for k, v in hf_state.items()
    }
    # With the family's prefix or, for a bare encoder, without: whichever finds more keys (the
    # prefix on a tie, so that an error names the keys a full checkpoint has).
    readings = [expand(table_for(cfg), base, cfg.num_layers) for base in (BASE[cfg.family], "")]
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
        state[ours] = (
            torch.cat([hf_state[n] for n in names]) if len(names) > 1 else hf_state[names[0]]
        )
        used.update(names)
    if missing:
        problem = f"checkpoint does not match a {cfg.family} model"
        if not used:  # not one key in common: most likely the weights of another family
            found = ", ".join(sorted({k.split(".")[0] + ".*" for k in hf_state}))
            problem += f": its keys are {found} (is model_type in config.json right?)"
        raise CheckpointError(f"{problem}; missing keys: {_summarise(missing)}")
    shapes = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()}
    wrong = [
        f"{'+'.join(wanted[k])} {have} vs {want}"
        for k, (have, want) in shapes.items()
        if have != want
    ]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointError(
            f"{len(wrong)} tensors do not have the shapes config.json gives them: "
            f"{'; '.join(wrong[:3])}{more}; the folder mixes files of two models"
        )
    unused = [k for k in hf_state if k not in used]
    if unused:
        log.info("ignored %d unused checkpoint keys (%s)", len(unused), _summarise(unused))
    return state, (head if new_head else [])


def state_dict_to_hf(model: MaskedLM) -> dict[str, torch.Tensor]:
    """Our state dict under HF's names, QKV cut back into query, key and value, ready for
    safetensors."""
    cfg, ours = model.config, model.state_dict()
    out = {}
    for names, name in expand(table_for(cfg), BASE[cfg.family], cfg.num_layers):
        if name not in ours:  # a key we drop (None), or a parameter this config does not have
            continue
        for n, part in zip(names, ours[name].chunk(len(names))):
            out[n] = part.detach().contiguous().cpu()
    return out


def _summarise(keys: list[str]) -> str:
    """Keys named compactly for one line, in their order: keys that differ only in a layer index are
    named once with * for it, a weight and its bias as `name.*`; a key on its own is named in
    full."""
    by_pattern: dict[str, list[str]] = {}
    for k in keys:
        by_pattern.setdefault(re.sub(r"(?<=\.)\d+(?=\.)", "*", k), []).append(k)
    names = [group[0] if len(group) == 1 else pattern for pattern, group in by_pattern.items()]
    by_parent: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent if leaf in ("weight", "bias") else name, []).append(name)
    return ", ".join(
        group[0] if len(group) == 1 else parent.removesuffix(".*") + ".*"
        for parent, group in by_parent.items()
    )


# ------------------------------------------------------------------------------------------ reading
def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, a sharded safetensors index, or
    pytorch_model.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(
                    f"{index} is not a valid shard index ({e}); re-save the model"
                ) from None
            state = {}
            for shard in shards:
                state.update(_read_file(folder / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _read_file(folder / name)
    raise CheckpointError(
        f"no weights in {str(folder)!r}: expected model.safetensors, a sharded index, or "
        "pytorch_model.bin"
    )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} is missing; the folder is incomplete")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        # weights_only: a .bin is a pickle, and a pickle from the internet can run code; this
        # refuses that.
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch raise many types for a damaged file
        raise CheckpointError(
            f"cannot read {str(path)!r} ({type(e).__name__}: {e}); the file is damaged"
        ) from None


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(
            f"model folder {str(folder)!r} does not exist; pass a local Hugging Face model folder"
        )
    if not path.is_file():
        raise CheckpointError(
            f"no config.json in {str(folder)!r}; this is not a Hugging Face model folder"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


# --------------------------------------------------------------------------------------- public API
def load_model(
    path: str | os.PathLike, device=None, dtype=None, *, kernels: bool = True
) -> MaskedLM:
    """Our MaskedLM with the weights of a local HF folder, in eval mode, with this device's fast
    paths installed (mlm.kernels.install) unless kernels=False."""
    folder = Path(path)
    check_device(device)
    model = MaskedLM(config_from_hf(read_hf_config(folder)))
    state, new_keys = state_dict_from_hf(model, read_hf_weights(folder))
    model.load_state_dict(state, strict=not new_keys)
    if new_keys:
        # An encoder-only checkpoint, or DeBERTa-v3's, which ships no head under the names its
        # config.json gives: transformers initialises a fresh head too.
        log.warning(
            "%s has no MLM head weights (%s): the head is newly initialised and must be trained "
            "before its predictions mean anything",
            folder,
            _head_names(model.config),
        )
    model = model.to(device=device, dtype=dtype).eval()
    if kernels:
        install(model)
    return model


def _head_names(cfg: ModelConfig) -> str:
    """The HF prefix of the head's keys in this config's table, for messages."""
    names = [
        n
        for names, ours in expand(table_for(cfg), "", 0)
        if ours and ours.startswith("head.")
        for n in names
    ]
    return os.path.commonprefix(names) + "*"


def load_pretrained(
    path: str | os.PathLike, device=None, dtype=None, *, kernels: bool = True
) -> tuple[MaskedLM, Tokenizer]:
    """(model, tokenizer) from a local Hugging Face-format folder; kernels=False gives the plain
    model."""
    model = load_model(path, device=device, dtype=dtype, kernels=kernels)
    tokenizer = Tokenizer.from_pretrained(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}; "
            "the folder mixes files of two models"
        )
    return model, tokenizer


def save_pretrained(model: MaskedLM, tokenizer: Tokenizer | None, path: str | os.PathLike) -> None:
    """Write model.safetensors, the tokenizer files and config.json; `transformers` loads the folder
    as is.

    Each file is written atomically (mlm/io.py): a reader sees the previous file or the new one,
    never part of one. The folder is not: over an existing save, a crash between two files leaves a
    mix of the two. config.json goes last, so an interrupted save into a new folder does not look
    like a model."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = safetensors.torch.save(state_dict_to_hf(model), metadata={"format": "pt"})
    atomic_write(folder / "model.safetensors", weights)
    if tokenizer is not None:
        tokenizer.save(folder)
    dtype = next(model.parameters()).dtype
    config = {**config_to_hf(model.config, tokenizer), "dtype": str(dtype).removeprefix("torch.")}
    atomic_write(folder / "config.json", json.dumps(config, indent=2, sort_keys=True))
