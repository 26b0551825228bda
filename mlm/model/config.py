"""ModelConfig: one dataclass for every family, each field with the reason it exists.

What differs between BERT, RoBERTa and DistilBERT is a field here; DeBERTa's disentangled attention
and ModernBERT's rotary, local attention have sections of their own. Derived settings are resolved
once, in __post_init__: an `embedding_size` of 0 is the hidden size, the families without relative
positions have no position terms, ModernBERT's layer types follow from
global_attn_every_n_layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlm.errors import ConfigError

FAMILIES = ("bert", "roberta", "distilbert", "deberta-v2", "modernbert")
# the names the CLIs take
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS = {
    "gelu": F.gelu,  # the exact erf form, as in the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    # the same tanh formula, written differently
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
POSITION_TERMS = ("c2p", "p2c")  # DeBERTa: content-to-position, position-to-content
# A family's own settings for a model trained from scratch, over ModelConfig's defaults (BERT's); a
# checkpoint brings its config.json instead. ModernBERT's are ModernBERT-base's shape and recipe.
FROM_SCRATCH = {
    "deberta-v2": dict(type_vocab_size=0, position_biased_input=False, layer_norm_eps=1e-7),
    "modernbert": dict(
        type_vocab_size=0,
        num_layers=22,
        intermediate_size=1152,
        max_position_embeddings=8192,
        layer_norm_eps=1e-5,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        classifier_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        embedding_dropout=0.0,
    ),
}


@dataclass
class ModelConfig:
    # rows of the word embeddings; may exceed the tokenizer's tokens (DeBERTa-v3)
    vocab_size: int = 30522
    hidden_size: int = 768  # C, the width of every token's vector between blocks
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # hidden_size must divide evenly into heads
    intermediate_size: int = 3072  # width of the MLP inside each block, 4x hidden in BERT
    # rows of the position table; RoBERTa spends pad_token_id + 1 of them
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # segment A/B embeddings; 1 in RoBERTa, 0 = none (DistilBERT)
    hidden_act: str = "gelu"  # MLP activation
    # MLM head activation: RoBERTa hard-codes exact gelu whatever hidden_act says
    head_act: str = "gelu"
    layer_norm_eps: float = 1e-12  # BERT's value, far below PyTorch's 1e-5 default
    pad_token_id: int = 0  # its word-embedding row gets no gradient; RoBERTa positions skip it
    position_offset: int = 0  # RoBERTa: pad_token_id + 1, positions count only non-pad tokens
    # after embeddings, the attention projection (not DistilBERT) and the MLP
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1  # on the attention probabilities
    initializer_range: float = 0.02  # std of the normal init for a model trained from scratch
    # "bert" | "roberta" | "distilbert" | "deberta-v2": the blocks, keys and config.json
    family: str = "bert"
    # attention per sequence (nested tensors): padding is skipped, documents kept apart
    varlen: bool = False
    # DeBERTa-v2/v3 (family "deberta-v2"), defaults as in v3; the BERT families keep the first two
    # as they are.

    # word-embedding width when narrower than hidden_size (projected up); 0 = hidden_size
    embedding_size: int = 0
    # add absolute position embeddings; v3 has relative positions only
    position_biased_input: bool = True
    position_terms: tuple[str, ...] = POSITION_TERMS  # beside content-to-content: c2p, p2c or both
    # distances past +-buckets/2 share log-spaced buckets (v3); 0 = plain clamping
    position_buckets: int = 256
    # where clamping (or the log scale) ends; -1 = max_position_embeddings
    max_relative_positions: int = -1
    # positions go through the content W_q, W_k (v3), not their own projections
    share_att_key: bool = True
    # LayerNorm on the relative-position table (HF's norm_rel_ebd = "layer_norm")
    norm_relative: bool = True
    # the MLM head's HF names: cls.predictions.* (legacy) or lm_predictions.lm_head.*
    legacy_head: bool = True
    # ModernBERT (family "modernbert"). The BERT families keep the biases: they have them all.

    # "global" or "local", per layer; () = from global_attn_every_n_layers
    layer_types: tuple[str, ...] = ()
    global_attn_every_n_layers: int = 3  # layer l is global when l % n == 0, the others local
    local_attention: int = 128  # a local layer's window: local_attention // 2 on each side
    global_rope_theta: float = 160_000.0  # RoPE's base in the global layers
    local_rope_theta: float = 10_000.0  # and in the local ones
    embedding_dropout: float = 0.0  # after the embeddings' norm (hidden_dropout is the MLP's)
    norm_bias: bool = True  # LayerNorms with a bias; ModernBERT's have none
    attention_bias: bool = True  # Wqkv and Wo with biases
    mlp_bias: bool = True  # the GeGLU's two linear layers with biases
    classifier_bias: bool = True  # the head's dense layer with a bias
    decoder_bias: bool = True  # the decoder's own bias (ModernBERT keeps it)
    initializer_cutoff_factor: float = 2.0  # from scratch: normals truncated at +-factor x std
    cls_token_id: int = 50281  # config.json's cls/bos id (a tokenizer saved with the model wins)
    sep_token_id: int = 50282  # and its sep/eos id

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(
                f"unknown model family {self.family!r}; use one of {', '.join(FAMILIES)}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "change one of them"
            )
        for name in ("hidden_act", "head_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(
                    f"unsupported {name} {getattr(self, name)!r}; use one of "
                    f"{', '.join(ACTIVATIONS)}"
                )
        self.embedding_size = self.embedding_size or self.hidden_size
        if self.family == "modernbert":
            self._check_modernbert()
        elif not (
            self.norm_bias and self.attention_bias and self.mlp_bias and self.classifier_bias
        ):
            raise ConfigError(
                "norm_bias, attention_bias, mlp_bias and classifier_bias off are ModernBERT's; "
                f"{self.family} "
                "has every bias: use family modernbert or drop them"
            )
        if self.family != "deberta-v2":
            if not self.position_biased_input or self.embedding_size != self.hidden_size:
                raise ConfigError(
                    f"position_biased_input=False and embedding_size are DeBERTa's; {self.family} "
                    "checkpoints have neither: use family deberta-v2 or drop them"
                )
            self.position_terms = ()
            return
        terms = tuple(self.position_terms)
        if not terms or set(terms) - set(POSITION_TERMS) or len(set(terms)) != len(terms):
            raise ConfigError(
                f"position_terms {' '.join(terms)!r} is not supported; use c2p, p2c or both"
            )
        self.position_terms = tuple(t for t in POSITION_TERMS if t in terms)  # one order: c2p first
        if not self.legacy_head and self.embedding_size != self.hidden_size:
            raise ConfigError(
                "legacy_head=False (lm_predictions.lm_head) needs embedding_size = hidden_size; "
                "use the legacy head or drop embedding_size"
            )
        if self.varlen:
            raise ConfigError(
                "varlen is not supported for deberta-v2: its position bias needs the padded (B, T, "
                "T) "
                "layout; drop --varlen (document attention works without it)"
            )

    def _check_modernbert(self) -> None:
        if not self.layer_types:
            n = self.global_attn_every_n_layers
            if n < 1:
                raise ConfigError(f"global_attn_every_n_layers must be at least 1, not {n}")
            self.layer_types = tuple("local" if i % n else "global" for i in range(self.num_layers))
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {"global", "local"}:
            raise ConfigError(
                f"layer_types must name global or local for each of the {self.num_layers} layers, "
                f"not {' '.join(self.layer_types)!r}"
            )
        if self.local_attention < 2 or self.local_attention % 2:
            raise ConfigError(
                f"local_attention must be an even window of 2 or more, not {self.local_attention}"
            )
        if (
            self.embedding_size != self.hidden_size
            or self.position_offset
            or not self.position_biased_input
        ):
            raise ConfigError(
                "embedding_size, position_offset and position_biased_input are not ModernBERT's"
            )

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table allows (RoBERTa's offset uses up some rows)."""
        return self.max_position_embeddings - self.position_offset

    @property
    def relative_span(self) -> int:
        """DeBERTa's S: relative positions index a table of 2S rows, S of them for distances below
        zero."""
        return self.position_buckets if self.position_buckets > 0 else self.max_distance

    @property
    def max_distance(self) -> int:
        """The relative distance where DeBERTa's clamping or log scale ends."""
        if self.max_relative_positions >= 1:
            return self.max_relative_positions
        return self.max_position_embeddings
