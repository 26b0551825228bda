"""DeBERTa-v2/v3: the BERT blocks with disentangled attention, relative positions added to the
scores.

    scores[i, j] = (q_i . k_j  +  q_i . pos_k[r]  +  k_j . pos_q[r]) / sqrt(D * (1 + terms))
                    content       c2p                 p2c          r = the row of distance i - j

pos_q, pos_k are one table of 2S relative-position embeddings shared by every layer (LayerNormed
once, dropped out again in each layer), projected by the layer's own W_q, W_k (v3: share_att_key) or
by projections of their own (v2). v3 has no absolute positions and no token types, buckets distances
logarithmically past +-S/2, and zeroes the embeddings of padded positions.

Shapes as in bert.py; S the relative span (the table has 2S rows), R = 2S.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm.model import bert
from mlm.model.config import ModelConfig


class RelativePositions(nn.Module):
    """The relative-position table, and each query-key pair's row in it.

    Query i and key j use row S + d(i, j), clamped into the table, where d(i, j) = i - j: plain, or,
    with position_buckets, kept exact up to +-buckets/2 and spread logarithmically up to
    +-max_distance beyond."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.span = cfg.relative_span  # S
        self.buckets = cfg.position_buckets
        self.max_distance = cfg.max_distance
        self.table = nn.Embedding(2 * cfg.relative_span, cfg.hidden_size)
        self.norm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_relative else None
        )

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (normalised) table, (R, C), and each query-key pair's row in it, (T, T)."""
        table = self.table.weight if self.norm is None else self.norm(self.table.weight)  # (R, C)
        S, device = self.span, table.device
        # (T, T): i - j
        d = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]
        if self.buckets > 0:
            mid = self.buckets // 2
            far = d.abs().clamp(min=mid)  # the log is only read where |d| > mid
            # float32 throughout, as the checkpoints were trained: ceil turns a last-bit difference
            # into a bucket.
            log_range = torch.tensor((self.max_distance - 1) / mid, device=device).log()
            log_d = mid + torch.ceil((far / mid).log() / log_range * (mid - 1))  # (T, T), >= mid
            d = torch.where(d.abs() <= mid, d, (log_d * d.sign()).long())
        return table, (d + S).clamp(0, 2 * S - 1)  # (R, C), (T, T)


def position_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_q: torch.Tensor | None,
    pos_k: torch.Tensor | None,
    index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """c2p + p2c, (B, H, T, T), to add to the scores. q, k (B, H, T, D); pos_q, pos_k (H, R, D) or
    None for a term the config leaves out; index (T, T) the table row of each pair.

        c2p[i, j] = q_i . pos_k[r] * scale    the query's content, the key's position relative to it
        p2c[i, j] = k_j . pos_q[r] * scale    the key's content, that same relative position

    p2c's row is derived from transformers' code, which the checkpoints were trained with: it
    gathers row S - d(j, i) of k_j's products; d is odd (bucketing keeps the sign), so that is S +
    d(i, j), the row c2p uses (the paper writes delta(j, i) for p2c). The scale goes in before the
    products, so fp16 holds them where the unscaled products would overflow."""
    B, H, T, _ = q.shape
    rows = index.expand(B, H, T, T)
    bias = q.new_zeros(())
    if pos_k is not None:
        c2p = (q * scale) @ pos_k.transpose(-1, -2)  # (B, H, T, R): each query against every row
        bias = bias + c2p.gather(-1, rows)  # (B, H, T, T)
    if pos_q is not None:
        p2c = k @ (pos_q * scale).transpose(-1, -2)  # (B, H, T, R): each key against every row
        # [i, j] from key j's row
        bias = bias + p2c.gather(-1, rows.transpose(-1, -2)).transpose(-1, -2)
    return bias


class DisentangledAttention(bert.Attention):
    """BERT's attention with DeBERTa's position terms added to the scores, as SDPA's float mask.

    `position_bias` is the function above; `mlm.kernels.install` may put an equal, faster one in its
    place."""

    position_bias = staticmethod(position_bias)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.terms, self.share_att_key = cfg.position_terms, cfg.share_att_key
        if not cfg.share_att_key:  # v2 style: positions get projections of their own
            C = cfg.hidden_size
            self.pos_key = nn.Linear(C, C) if "c2p" in self.terms else None
            self.pos_query = nn.Linear(C, C) if "p2c" in self.terms else None
        # the shared table, dropped out again in every layer
        self.rel_dropout = nn.Dropout(cfg.hidden_dropout)

    def attend(self, q, k, v, mask, positions) -> torch.Tensor:
        """Scores, content and position alike, are divided by sqrt(D * (1 + terms)); the mask
        becomes a float bias (B, H, T, T), -inf where hidden."""
        table, index = positions  # (R, C), (T, T)
        B, H, T, D = q.shape
        scale = (D * (1 + len(self.terms))) ** -0.5
        pos_q, pos_k = self.project_positions(self.rel_dropout(table))  # (R, C) or None, each

        def heads(t: torch.Tensor | None) -> torch.Tensor | None:  # (R, C) -> (H, R, D)
            return None if t is None else t.view(-1, H, D).transpose(0, 1)

        bias = self.position_bias(q, k, heads(pos_q), heads(pos_k), index, scale)  # (B, H, T, T)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        return self.sdpa(
            q, k, v, attn_mask=bias, dropout_p=self.p if self.training else 0.0, scale=scale
        )

    def project_positions(
        self, table: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The table through W_q (for p2c) and W_k (for c2p): (R, C) each, None for a term left
        out."""
        if not self.share_att_key:
            pos_q = self.pos_query(table) if self.pos_query is not None else None
            pos_k = self.pos_key(table) if self.pos_key is not None else None
            return pos_q, pos_k
        # The content projections, sliced out of the fused QKV: one product for both terms.
        C = table.shape[-1]
        first, last = (0 if "p2c" in self.terms else C), (2 * C if "c2p" in self.terms else C)
        # (R, C) or (R, 2C)
        pos = F.linear(table, self.qkv.weight[first:last], self.qkv.bias[first:last])
        return (pos[:, :C] if "p2c" in self.terms else None), (
            pos[:, -C:] if "c2p" in self.terms else None
        )


class Encoder(bert.Encoder):
    """The BERT encoder with disentangled attention and the relative-position table it shares."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, attention=DisentangledAttention)
        self.relative = RelativePositions(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        if attention_mask is not None:
            # DeBERTa zeroes padded positions; real positions never see them either way (keys are
            # masked).
            x = x * attention_mask[..., None].to(x.dtype)
        mask = bert.attention_mask_for(attention_mask, doc_ids)
        positions = self.relative(input_ids.shape[1])  # table (R, C), index (T, T)
        for block in self.blocks:
            x = block(x, mask, positions=positions)
        return x
