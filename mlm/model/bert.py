"""The BERT encoder, as the math: embeddings, then post-LN blocks of self-attention and an MLP.

    x = LN(word[ids] + position[0..T-1] + token_type[segments])    then dropout
    for each block:
        x = LN(x + dropout(Attention(x)))                          LayerNorm after each residual add
        x = LN(x + dropout(W2 act(W1 x + b1) + b2))

RoBERTa and DistilBERT are this encoder with other config values (positions that skip padding, no
token types, no dropout after DistilBERT's attention); DeBERTa (deberta.py) keeps the blocks and
changes the attention scores. Every op is torch's own (nn.Linear, nn.Embedding, nn.LayerNorm,
nn.Dropout, SDPA); `mlm.kernels.install` puts faster equal ones in their place from outside.

Shape legend: B batch, T tokens, C = hidden_size, E = embedding_size, H heads, D = C // H head dim,
N real tokens packed end to end (varlen), S sequences among them.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm.model.config import ACTIVATIONS, ModelConfig


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # DeBERTa may embed narrower, then project up to C
        E, C = cfg.embedding_size, cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, E, padding_idx=cfg.pad_token_id)
        self.position = (
            nn.Embedding(cfg.max_position_embeddings, E) if cfg.position_biased_input else None
        )
        self.token_type = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size else None
        self.proj = nn.Linear(E, C, bias=False) if E != C else None
        self.norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.pad_token_id, self.position_offset = cfg.pad_token_id, cfg.position_offset

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.word(input_ids)  # (B, T, E)
        if self.position_offset:
            # RoBERTa: real tokens are numbered from pad_token_id + 1 and padding keeps position
            # pad_token_id.
            real = (input_ids != self.pad_token_id).int()
            positions = torch.cumsum(real, dim=1) * real + (self.position_offset - 1)  # (B, T)
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
        return self.dropout(self.norm(x))


class Ragged(NamedTuple):
    """Sequences packed end to end: sequence s is rows offsets[s] to offsets[s + 1] - 1.

    The shortest and longest lengths are read to the host once per batch, here, and handed to every
    layer's nested tensors, which would otherwise each compute them (a device sync per layer on a
    GPU)."""

    offsets: torch.Tensor  # (S + 1,) int64, from 0 to N
    min_len: int
    max_len: int


def pack(
    x: torch.Tensor, attention_mask: torch.Tensor | None, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, Ragged, torch.Tensor]:
    """The real tokens of x (B, T, C) end to end, (N, C); where each sequence (a row, or a document
    of one) starts; and which positions were real, (B, T)."""
    B, T, _ = x.shape
    if attention_mask is None:
        real = torch.ones(B, T, dtype=torch.bool, device=x.device)
    else:
        real = attention_mask.bool()
    # A sequence starts at each row's first real token and wherever the document changes.
    starts = real & (real.cumsum(dim=1) == 1)  # (B, T)
    if doc_ids is not None:
        starts[:, 1:] |= doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = starts[real]  # (N,) among the real tokens, in row order
    end = starts.new_tensor([starts.numel()], dtype=torch.long)
    offsets = torch.cat([starts.nonzero().flatten(), end])  # (S + 1,)
    low, high = offsets.diff().aminmax()
    low, high = torch.stack([low, high]).tolist()  # one host read
    return x[real], Ragged(offsets, low, high), real


def unpack(packed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: (N, C) back to (B, T, C), zeros at the padded positions."""
    B, T = real.shape
    return packed.new_zeros(B, T, packed.shape[-1]).masked_scatter(real[..., None], packed)


def attention_mask_for(
    attention_mask: torch.Tensor | None, doc_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """The boolean mask SDPA takes (True = may attend), or None when every token sees every
    token."""
    if doc_ids is not None:
        mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, T)
        if attention_mask is not None:
            # Hide padded keys too, but let every token see itself so no row of the mask is empty
            # (NaN).
            mask = mask & attention_mask[:, None, None, :].bool()
            mask = mask | torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
        return mask
    if attention_mask is not None:
        # (B, 1, 1, T): hide padded keys from all queries
        return attention_mask[:, None, None, :].bool()
    return None


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(D) + mask) v per head, with one fused QKV
    projection (HF keeps three; the key table splits it).

    `sdpa` is F.scaled_dot_product_attention; `mlm.kernels.install` may put an equal one in its
    place."""

    sdpa = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.p = cfg.attention_dropout  # on the attention probabilities, inside SDPA
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        ragged: Ragged | None = None,
        positions=None,
    ) -> torch.Tensor:
        """x (B, T, C), or (N, C) packed with ragged; mask bool, True where a query may look at a
        key: (B, 1, 1, T) for padding, (B, 1, T, T) for documents. positions: what a family's
        attention needs of the token positions besides the mask (DeBERTa's relative table); None
        here."""
        if ragged is not None:
            return self.proj(self.attend_varlen(x, ragged))
        B, T, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        y = self.attend(q, k, v, mask, positions)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def attend(self, q, k, v, mask, positions) -> torch.Tensor:
        return self.sdpa(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)

    def attend_varlen(self, x: torch.Tensor, ragged: Ragged) -> torch.Tensor:
        """Attention over S sequences packed end to end in x (N, C); sequence s is
        x[offsets[s]:offsets[s+1]].

        Nested (jagged) tensors give SDPA one ragged batch: no padding is computed and no token sees
        another sequence, with no (T, T) mask at all (on CUDA, the varlen FlashAttention kernels).
        """
        N, C = x.shape
        H = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, C) -> (S, H, j, D), j ragged
            nested = torch.nested.nested_tensor_from_jagged(  # (S, j, C)
                t.contiguous(), ragged.offsets, min_seqlen=ragged.min_len, max_seqlen=ragged.max_len
            )
            return nested.unflatten(-1, (H, C // H)).transpose(1, 2)  # (S, H, j, D)

        q, k, v = self.qkv(x).split(C, dim=1)  # 3 x (N, C)
        with warnings.catch_warnings():
            # On the CPU, SDPA converts jagged nested tensors to the older nested layout, which
            # warns once per process that it is a prototype.
            warnings.filterwarnings(
                "ignore", message="The PyTorch API of nested tensors is in prototype stage"
            )
            y = self.sdpa(heads(q), heads(k), heads(v), dropout_p=self.p if self.training else 0.0)
        return y.transpose(1, 2).flatten(-2).values()  # (N, C)


class Block(nn.Module):
    """Post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: ModelConfig, attention: type[Attention] = Attention):
        super().__init__()
        self.attn = attention(cfg)
        # DistilBERT adds the attention output to the residual without dropout; BERT and RoBERTa
        # drop it.
        self.attn_dropout = nn.Dropout(0.0 if cfg.family == "distilbert" else cfg.hidden_dropout)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.mlp_dropout = nn.Dropout(cfg.hidden_dropout)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        ragged: Ragged | None = None,
        positions=None,
    ) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, mask, ragged, positions)))
        return self.mlp_norm(x + self.mlp_dropout(self.fc2(self.act(self.fc1(x)))))


class Encoder(nn.Module):
    """Embeddings, then the post-LN blocks: the last hidden states (B, T, C)."""

    def __init__(self, cfg: ModelConfig, attention: type[Attention] = Attention):
        super().__init__()
        self.varlen = cfg.varlen
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList([Block(cfg, attention) for _ in range(cfg.num_layers)])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        if self.varlen and (attention_mask is not None or doc_ids is not None):
            # Every block on the N real tokens only, each sequence attending to itself; positions
            # were embedded in the padded layout, so they are the dense path's.
            packed, ragged, real = pack(x, attention_mask, doc_ids)  # (N, C)
            for block in self.blocks:
                packed = block(packed, None, ragged)
            return unpack(packed, real)  # (B, T, C), zeros where padded
        mask = attention_mask_for(attention_mask, doc_ids)
        for block in self.blocks:
            x = block(x, mask)
        return x
