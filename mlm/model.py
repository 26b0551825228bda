"""The BERT-family encoder for masked language modelling, in one file.

One encoder covers four checkpoint families; what differs between them is a config field:
  BERT        learned positions 0..T-1, token-type embeddings, post-LN blocks, MLM head with `hidden_act`
  RoBERTa     positions start at pad_token_id + 1 and skip padding, a single token type, head act = gelu
  DistilBERT  no token types, no dropout after the attention projection, head act = `activation`
  DeBERTa     "deberta-v2" (v2 and v3): disentangled attention, i.e. relative positions added to the scores
              as content-to-position and position-to-content terms; v3 has no absolute positions and no
              token types, buckets distances logarithmically, eps 1e-7; optionally narrower embeddings
All four are post-LN (LayerNorm after each residual add, eps inside the square root) and tie the MLM
decoder to the word embeddings, with a separate decoder bias.

Shape legend: B batch, T tokens, C = hidden_size, H heads, D = C // H head dim, V vocabulary,
N rows picked for the head (the masked positions), S DeBERTa's relative span (its table has 2S rows),
R the rows of it that T tokens reach.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm.kernels import (Tie, attention, decoder_weight, disentangled_bias, dropout, embedding, linear, linear_cross_entropy,
                     vocab_logits)
from mlm.errors import ConfigError, InputError
from mlm.masking import IGNORE_INDEX

FAMILIES = ("bert", "roberta", "distilbert", "deberta-v2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names the CLIs take
ACTIVATIONS = {
    "gelu": F.gelu,  # the exact erf form, as in the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),  # the same tanh formula, written differently
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class ModelConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12  # hidden_size must divide evenly into heads
    intermediate_size: int = 3072  # width of the MLP inside each block, 4x hidden in BERT
    max_position_embeddings: int = 512  # rows of the position table; RoBERTa spends pad_token_id + 1 of them
    type_vocab_size: int = 2  # segment A/B embeddings; 1 in RoBERTa, 0 = none (DistilBERT)
    hidden_act: str = "gelu"  # MLP activation
    head_act: str = "gelu"  # MLM head activation: RoBERTa hard-codes exact gelu whatever hidden_act says
    layer_norm_eps: float = 1e-12  # BERT's value, far below PyTorch's 1e-5 default
    pad_token_id: int = 0  # its word-embedding row gets no gradient; RoBERTa positions skip it
    position_offset: int = 0  # RoBERTa: pad_token_id + 1, positions count only non-pad tokens
    hidden_dropout: float = 0.1  # after embeddings, the attention projection (not DistilBERT) and the MLP
    attention_dropout: float = 0.1  # on the attention probabilities
    initializer_range: float = 0.02  # std of the normal init for a model trained from scratch
    family: str = "bert"  # "bert" | "roberta" | "distilbert" | "deberta-v2": key names and config.json on save
    varlen: bool = False  # attention per sequence (nested tensors): padding is skipped, documents kept apart
    # DeBERTa-v2/v3 (family "deberta-v2"), defaults as in v3; the BERT families keep the first two as they are.
    embedding_size: int = 0  # word-embedding width when narrower than hidden_size (projected up); 0 = hidden_size
    position_biased_input: bool = True  # add absolute position embeddings; v3 has relative positions only
    pos_att_type: str = "p2c|c2p"  # position terms beside content-to-content: c2p, p2c or both ("|" between)
    position_buckets: int = 256  # distances past +-buckets/2 share log-spaced buckets (v3); 0 = plain clamping
    max_relative_positions: int = -1  # where clamping (or the log scale) ends; -1 = max_position_embeddings
    share_att_key: bool = True  # positions go through the content W_q, W_k (v3), not their own projections
    norm_relative: bool = True  # LayerNorm on the relative-position table (HF's norm_rel_ebd = "layer_norm")
    legacy_head: bool = True  # the MLM head's HF names: cls.predictions.* (legacy) or lm_predictions.lm_head.*

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; use one of {', '.join(FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; change one of them"
            )
        for name in ("hidden_act", "head_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(f"unsupported {name} {getattr(self, name)!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.family != "deberta-v2":
            if not self.position_biased_input or self.embedding_size not in (0, self.hidden_size):
                raise ConfigError(f"position_biased_input=False and embedding_size are DeBERTa's; {self.family} "
                                  "checkpoints have neither: use family deberta-v2 or drop them")
            return
        unknown = set(self.position_terms) - {"c2p", "p2c"}
        if unknown or not self.position_terms:
            raise ConfigError(f"pos_att_type {self.pos_att_type!r} is not supported; use c2p, p2c or p2c|c2p")
        if not self.legacy_head and self.embedding_size not in (0, self.hidden_size):
            raise ConfigError("legacy_head=False (lm_predictions.lm_head) needs embedding_size = hidden_size; "
                              "use the legacy head or drop embedding_size")
        if self.varlen:
            raise ConfigError("varlen is not supported for deberta-v2: its position bias needs the padded "
                              "(B, T, T) layout; drop --varlen (document attention works without it)")

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table allows (RoBERTa's offset uses up some rows)."""
        return self.max_position_embeddings - self.position_offset

    @property
    def position_terms(self) -> list[str]:
        """DeBERTa's position terms, ["c2p", "p2c"] or one of them; [] for the BERT families."""
        if self.family != "deberta-v2":
            return []
        return [t.strip() for t in self.pos_att_type.lower().split("|") if t.strip()]

    @property
    def relative_span(self) -> int:
        """DeBERTa's S: relative positions index a table of 2S rows, S of them for distances below zero."""
        return self.position_buckets if self.position_buckets > 0 else self.max_distance

    @property
    def max_distance(self) -> int:
        """The relative distance where DeBERTa's clamping or log scale ends."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) by mlm/kernels/cpu_linear.py: oneDNN for fp32 on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Dropout(nn.Dropout):
    """nn.Dropout (same `p`, same train/eval switch) by mlm/kernels/cpu_dropout.py: a cheaper draw on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.embedding_size or cfg.hidden_size  # DeBERTa may embed narrower, then project up to C
        self.word = nn.Embedding(cfg.vocab_size, E, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, E) if cfg.position_biased_input else None
        self.token_type = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size else None
        self.proj = Linear(E, cfg.hidden_size, bias=False) if E != cfg.hidden_size else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, tie: Tie | None = None,
    ) -> torch.Tensor:
        """tie: the loss goes through the tied decoder, whose gradient the lookup's then joins in place."""
        B, T = input_ids.shape
        x = embedding(input_ids, self.word.weight, self.word.padding_idx, tie)  # (B, T, E)
        if self.cfg.position_offset:
            # RoBERTa: real tokens are numbered from pad_token_id + 1 and padding keeps position pad_token_id.
            real = (input_ids != self.cfg.pad_token_id).int()
            positions = torch.cumsum(real, dim=1) * real + (self.cfg.position_offset - 1)  # (B, T)
            x = x + self.position(positions)
        elif self.position is not None:
            x = x + self.position(torch.arange(T, device=input_ids.device).expand(B, T))
        if self.token_type is not None:
            if token_type_ids is None:  # no segments given: all segment A, as HF does
                x = x + self.token_type.weight[0]
            else:
                x = x + self.token_type(token_type_ids)
        if self.proj is not None:
            x = self.proj(x)  # (B, T, C)
        x = self.norm(x)
        if self.cfg.family == "deberta-v2" and attention_mask is not None:
            # DeBERTa zeroes padded positions; real positions never see them either way (keys are masked).
            x = x * attention_mask[..., None].to(x.dtype)
        return self.dropout(x)


class RelativePositions(nn.Module):
    """DeBERTa's relative-position embeddings, one table of 2S rows shared by every layer.

    Query i and key j use row S + d(i, j), clamped into the table, where d(i, j) = i - j: plain, or, with
    position_buckets, kept exact up to +-buckets/2 and spread logarithmically up to +-max_distance beyond.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.table = nn.Embedding(2 * cfg.relative_span, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_relative else None

    def rows(self, T: int) -> tuple[int, int]:
        """First and last row that T tokens can use (|d| < T): 255 of deberta-v3's 512 at T = 128.

        From T and the config alone, no tensors, so that torch.compile sees fixed shapes. Past the exact
        range the bucket is computed in float64 here, float32 in forward: one row of margin covers that.
        """
        S, mid = self.cfg.relative_span, self.cfg.position_buckets // 2
        reach = T - 1
        if self.cfg.position_buckets > 0 and T - 1 > mid:
            log_range = math.log((self.cfg.max_distance - 1) / mid) if self.cfg.max_distance - 1 > mid else 0.0
            reach = mid + math.ceil(math.log((T - 1) / mid) / log_range * (mid - 1)) + 1 if log_range else S
        return max(0, S - reach), min(2 * S - 1, S + reach)

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (normalised) rows T tokens can use, (R, C), and each query-key pair's row among them, (T, T)."""
        first, last = self.rows(T)
        table = self.table.weight[first : last + 1]  # (R, C)
        table = table if self.norm is None else self.norm(table)
        S, buckets, device = self.cfg.relative_span, self.cfg.position_buckets, table.device
        d = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]  # (T, T): i - j
        if buckets > 0:
            mid = buckets // 2
            far = d.abs().clamp(min=mid)  # the log is only read where |d| > mid
            # float32 throughout, as the checkpoints were trained: ceil turns a last-bit difference into a bucket.
            log_range = torch.tensor((self.cfg.max_distance - 1) / mid, device=device).log()
            log_d = mid + torch.ceil((far / mid).log() / log_range * (mid - 1))  # (T, T), >= mid
            d = torch.where(d.abs() <= mid, d, (log_d * d.sign()).long())
        return table, (d + S).clamp(0, 2 * S - 1) - first  # (R, C), (T, T)


class Ragged(NamedTuple):
    """Sequences packed end to end: sequence s is rows offsets[s] to offsets[s + 1] - 1.

    The shortest and longest lengths are read to the host once per batch, here, and handed to every layer's
    nested tensors, which would otherwise each compute them (a device sync per layer on a GPU).
    """

    offsets: torch.Tensor  # (S + 1,) int64, from 0 to N
    min_len: int
    max_len: int

    @classmethod
    def from_offsets(cls, offsets: torch.Tensor) -> Ragged:
        lengths = offsets.diff()  # (S,)
        low, high = torch.stack([lengths.min(), lengths.max()]).tolist()  # one host read
        return cls(offsets, low, high)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (HF keeps three; the mapping table splits it).

    DeBERTa adds its position terms (disentangled_bias) to the scores as SDPA's float bias, so the fused
    attention kernels still run it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.terms = cfg.position_terms  # [] outside DeBERTa
        self.share_att_key = cfg.share_att_key
        if self.terms and not cfg.share_att_key:  # v2 style: positions get projections of their own
            self.pos_key = Linear(cfg.hidden_size, cfg.hidden_size) if "c2p" in self.terms else None
            self.pos_query = Linear(cfg.hidden_size, cfg.hidden_size) if "p2c" in self.terms else None
        if self.terms:  # DeBERTa drops out the shared position table again in every layer
            self.rel_dropout = Dropout(cfg.hidden_dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, ragged: Ragged | None = None,
        rel: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        p_drop = self.dropout if self.training else 0.0
        if ragged is not None:
            return self.proj(self._varlen(x, ragged, p_drop))
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, H, T, D)
        # mask: bool, True where a query may look at a key; (B, 1, 1, T) for padding, (B, 1, T, T) for documents.
        scale = None  # SDPA's 1 / sqrt(D)
        if self.terms:
            # DeBERTa: the mask becomes a float bias (B, H, T, T), -inf where hidden; scores, content and
            # position alike, are divided by sqrt(D * (1 + terms)).
            scale = (C // self.num_heads * (1 + len(self.terms))) ** -0.5
            mask = self._position_bias(q, k, *rel, mask, scale)
        y = attention(q, k, v, mask, p_drop, scale)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)

    def _position_bias(self, q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                       mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """DeBERTa's position terms for this layer, with the mask folded in as -inf: (B, H, T, T).

            c2p[i, j] = q_i . pos_k[r] * scale    the query's content against the key's position relative to it
            p2c[i, j] = k_j . pos_q[r] * scale    the key's content against that same relative position
            r = index[i, j], the table row of d(i, j) = i - j

        p2c's row is derived from transformers' code, which the checkpoints were trained with: it gathers row
        S - d(j, i) of k_j's products; d is odd (bucketing keeps the sign), so that is S + d(i, j), the row
        c2p uses (the paper writes delta(j, i) for p2c). The scale goes in before the products, so fp16
        holds them where the unscaled products would overflow. mlm/kernels/disentangled_bias.py computes both
        without a gather.
        """
        B, H, T, D = q.shape
        C = H * D
        table = self.rel_dropout(table)  # (R, C)
        if self.share_att_key:  # the content projections, sliced out of the fused QKV: W_q for p2c, W_k for c2p
            first, last = (0 if "p2c" in self.terms else C), (2 * C if "c2p" in self.terms else C)
            pos = linear(table, self.qkv.weight[first:last], self.qkv.bias[first:last])  # (R, C) or both: (R, 2C)
            pos_q = pos[:, :C] if "p2c" in self.terms else None  # (R, C)
            pos_k = pos[:, -C:] if "c2p" in self.terms else None  # (R, C)
        else:
            pos_q = self.pos_query(table) if self.pos_query is not None else None  # (R, C)
            pos_k = self.pos_key(table) if self.pos_key is not None else None  # (R, C)

        def heads(t: torch.Tensor | None) -> torch.Tensor | None:  # (R, C) -> (H, R, D)
            return None if t is None else t.view(-1, H, D).transpose(0, 1)

        bias = disentangled_bias(q, k, heads(pos_q), heads(pos_k), index, scale)  # (B, H, T, T)
        return bias if mask is None else bias.masked_fill(~mask, float("-inf"))

    def _varlen(self, x: torch.Tensor, ragged: Ragged, p_drop: float) -> torch.Tensor:
        """Attention over S sequences packed end to end in x (N, C); sequence s is x[offsets[s]:offsets[s+1]].

        Nested (jagged) tensors give SDPA one ragged batch: no padding is computed and no token sees
        another sequence, with no (T, T) mask at all (on CUDA, the varlen FlashAttention kernels).
        """
        N, C = x.shape
        H = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, C) -> (S, H, j, D), j ragged
            nested = torch.nested.nested_tensor_from_jagged(  # (S, j, C)
                t.contiguous(), ragged.offsets, min_seqlen=ragged.min_len, max_seqlen=ragged.max_len)
            return nested.unflatten(-1, (H, C // H)).transpose(1, 2)  # (S, H, j, D)

        q, k, v = self.qkv(x).split(C, dim=1)  # 3 x (N, C)
        with warnings.catch_warnings():
            # On the CPU, SDPA converts jagged nested tensors to the older nested layout, which warns
            # once per process that it is a prototype.
            warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
            y = attention(heads(q), heads(k), heads(v), None, p_drop)  # (S, H, j, D)
        return y.transpose(1, 2).flatten(-2).values()  # (N, C)


class Block(nn.Module):
    """Post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]
        # DistilBERT adds the attention output to the residual without dropout; BERT and RoBERTa drop it.
        self.attn_dropout = Dropout(0.0 if cfg.family == "distilbert" else cfg.hidden_dropout)
        self.mlp_dropout = Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, ragged: Ragged | None = None,
                rel: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, mask, ragged, rel)))
        x = self.mlp_norm(x + self.mlp_dropout(self.fc2(self.act(self.fc1(x)))))
        return x


class MLMHead(nn.Module):
    """Transform (dense + act + LayerNorm), then the decoder: the word embeddings, transposed, plus a bias.

    DeBERTa's two namings of the head (cls.predictions.*, lm_predictions.lm_head.*) both compute this; the
    legacy one maps to embedding_size, the width of the word embeddings it is tied to.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.embedding_size or cfg.hidden_size
        self.dense = Linear(cfg.hidden_size, E)
        self.act = ACTIVATIONS[cfg.head_act]
        self.norm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the decoder's own bias, not tied to anything

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class MaskedLM(nn.Module):
    """A BERT-family encoder with its MLM head.

    `model(input_ids)` gives logits (B, T, V); with `labels` (IGNORE_INDEX where nothing is predicted) it
    gives the mean cross-entropy over the labelled positions, running the head on those rows only: at 15%
    masking that skips about 85% of the vocabulary projection, the largest matmul in a small model.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.relative = RelativePositions(cfg) if cfg.family == "deberta-v2" else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = MLMHead(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, LayerNorm = identity.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, MLMHead):
            nn.init.zeros_(module.bias)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        tie: Tie | None = None,
    ) -> torch.Tensor:
        """Last hidden states (B, T, C).

        attention_mask (B, T): 1 for real tokens, 0 for padding; padded keys are hidden from every query,
        so padding never changes the outputs at real positions.
        doc_ids (B, T): document number of each token in a packed block; tokens attend only within their
        own document (padding, given its own id such as -1, is then a document of its own). Absolute
        positions still count from the start of the block; DeBERTa's relative ones need no such care.
        tie: links the word lookup to the caller's decoder (mlm/kernels/cpu_embedding.py).
        """
        B, T = input_ids.shape
        if T > self.config.max_tokens:
            raise InputError(
                f"sequence of {T} tokens is longer than the model's limit of {self.config.max_tokens}; "
                "truncate the input or use a shorter block size"
            )
        x = self.embeddings(input_ids, token_type_ids, attention_mask, tie)  # (B, T, C)
        if self.config.varlen and (attention_mask is not None or doc_ids is not None):
            return self._encode_varlen(x, attention_mask, doc_ids)
        mask = attention_mask_for(attention_mask, doc_ids)
        rel = self.relative(T) if self.relative is not None else None  # DeBERTa: table (R, C), index (T, T)
        for block in self.blocks:
            x = block(x, mask, rel=rel)
        return x

    def _encode_varlen(self, x: torch.Tensor, attention_mask: torch.Tensor | None, doc_ids: torch.Tensor | None):
        """The blocks on real tokens only, packed end to end, each sequence (row or document) attending to itself.

        Embeddings were computed in the padded layout, so positions are those of the dense path. Every
        linear layer then runs on N real tokens instead of B x T. Padded positions come back as zeros.
        """
        B, T, C = x.shape
        real = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                     device=x.device)
        # A sequence starts at each row's first real token and wherever the document changes.
        starts = real & (real.cumsum(dim=1) == 1)  # (B, T)
        if doc_ids is not None:
            starts[:, 1:] |= doc_ids[:, 1:] != doc_ids[:, :-1]
        starts = starts[real]  # (N,) among the real tokens, in row order
        offsets = torch.cat([starts.nonzero().flatten(), starts.new_tensor([starts.numel()], dtype=torch.long)])
        ragged = Ragged.from_offsets(offsets)
        packed = x[real]  # (N, C)
        for block in self.blocks:
            packed = block(packed, None, ragged)
        return x.new_zeros(B, T, C).masked_scatter(real[..., None], packed)  # (B, T, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) for hidden states (..., C): any subset of rows, or all of them."""
        return vocab_logits(self.head.transform(hidden), self.embeddings.word.weight, self.head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        max_predictions: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V); with labels, the mean cross-entropy over labelled positions (a scalar).

        max_predictions (BERT's max_predictions_per_seq): score a fixed M rows per sequence, labelled
        positions first, padded with ignored rows. Shapes then do not depend on the mask, so
        torch.compile sees one graph; a row with more than M labels loses the excess, so use it with
        masks whose count per row is bounded (static masking).
        """
        if labels is None:
            return self.logits(self.encode(input_ids, attention_mask, token_type_ids, doc_ids))  # (B, T, V)
        tie = Tie()  # the tied weight's two gradients, the lookup's and the decoder's, summed in place
        hidden = self.encode(input_ids, attention_mask, token_type_ids, doc_ids, tie)  # (B, T, C)
        rows, targets = self.labelled_rows(hidden, labels, max_predictions)  # (N, C), (N,)
        # The decoder matmul and the loss together: a fused, chunked kernel on GPU, plain PyTorch elsewhere.
        weight = decoder_weight(self.embeddings.word.weight, tie)
        return linear_cross_entropy(self.head.transform(rows), weight, self.head.bias, targets)

    @staticmethod
    def labelled_rows(
        hidden: torch.Tensor, labels: torch.Tensor, max_predictions: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of hidden (B, T, C) that the head scores, and their targets: (N, C), (N,).

        Without max_predictions, every labelled position in row order. With it, M rows per sequence (see
        forward), where targets are IGNORE_INDEX for the padding rows.
        """
        if max_predictions is None:
            picked = labels != IGNORE_INDEX  # (B, T)
            return hidden[picked], labels[picked]  # (N, C), (N,)
        C = hidden.shape[-1]
        labelled_first = (labels != IGNORE_INDEX).int().argsort(dim=1, descending=True, stable=True)  # (B, T)
        order = labelled_first[:, :max_predictions]  # (B, M)
        rows = hidden.gather(1, order[..., None].expand(-1, -1, C)).view(-1, C)  # (B*M, C)
        return rows, labels.gather(1, order).view(-1)  # (B*M, C), (B*M,)

    def set_dropout(self, p: float) -> None:
        """One dropout probability everywhere: embeddings, attention probabilities, residual branches."""
        self.config.hidden_dropout = self.config.attention_dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            if isinstance(module, Attention):
                module.dropout = p

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def attention_mask_for(attention_mask: torch.Tensor | None, doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The boolean mask SDPA takes (True = may attend), or None when every token sees every token."""
    if doc_ids is not None:
        mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, T)
        if attention_mask is not None:
            # Hide padded keys too, but let every token see itself so no row of the mask is empty (NaN).
            mask = mask & attention_mask[:, None, None, :].bool()
            mask = mask | torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
        return mask
    if attention_mask is not None:
        return attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): hide padded keys from all queries
    return None
