"""ModernBERT: pre-LN blocks with rotary positions, GeGLU, and local attention in most layers.

    x = dropout(LN(word[ids]))                        no position or token-type table
    for layer l:
        x = x + Wo attn_l(LN(x))                      no LN before layer 0's attention
        x = x + W2 (act(a) * g),  [a, g] = W1 LN(x)   GeGLU: the first half is activated
    h = LN(x)                                         the final norm

Every layer rotates q and k by their positions (RoPE over the whole head, its two halves paired),
with one base in the global layers and another in the local ones. A global layer attends over the
whole sequence; a local one only within `local_attention // 2` positions on each side (the bound
included, as transformers has it). Layer l is global when l % global_attn_every_n_layers == 0.

Local attention is computed a chunk of w = local_attention // 2 queries at a time against the 3w
keys around it, so it costs O(T x window) and never builds a (T, T) score matrix. Global attention
is SDPA's, which on the CPU and on GPUs runs fused (flash or memory-efficient) kernels.

Shapes: B batch, T tokens, C hidden, H heads, D head dim, w the half window, n chunks of w queries,
N real tokens packed end to end (varlen).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm.model import bert
from mlm.model.config import ACTIVATIONS, ModelConfig


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
        self.dropout = nn.Dropout(cfg.embedding_dropout)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.dropout(self.norm(self.word(input_ids)))  # (B, T, C); token types do not exist


def rotary(
    positions: torch.Tensor, D: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, (..., D): angle_k = position / theta^(2k / D) for k <
    D/2, repeated for the second half. In fp32 whatever the model's dtype (a bf16 product of
    positions and frequencies loses the position), then cast to it, as transformers does."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, D, 2, device=positions.device, dtype=torch.float32) / D
    )
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x rotated by the angles: each pair (x_k, x_{k + D/2}) turned as a 2-d vector, in fp32."""
    half = x.shape[-1] // 2
    x32 = x.float()
    turned = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + turned * sin).to(x.dtype)


class Window(NamedTuple):
    """What the local layers of one batch share: which keys each chunk of queries may see."""

    half: int  # w: a query sees keys within w positions on either side
    allowed: torch.Tensor  # (B * n, 1, w, 3w) bool


def local_window(segments: torch.Tensor, half: int) -> Window:
    """The window of every chunk of w queries, from each position's segment (B, T): the document (or
    row) it belongs to, -1 for padding. A key is seen when it is within w positions, in the query's
    segment and not padding; every query also sees itself, so that no row is empty."""
    B, T = segments.shape
    w, device = half, segments.device
    n = math.ceil(T / w)
    queries = torch.arange(n * w, device=device).view(n, w)  # (n, w)
    keys = torch.arange(-w, (n + 1) * w, device=device).unfold(0, 3 * w, w)  # (n, 3w)
    band = (queries[:, :, None] - keys[:, None, :]).abs() <= w  # (n, w, 3w)
    seg_q = F.pad(segments, (0, n * w - T), value=-1).view(B, n, w)
    seg_k = F.pad(segments, (w, (n + 1) * w - T), value=-1).unfold(1, 3 * w, w)  # (B, n, 3w)
    same = (seg_q[..., :, None] == seg_k[..., None, :]) & (
        seg_k[..., None, :] >= 0
    )  # (B, n, w, 3w)
    itself = queries[:, :, None] == keys[:, None, :]
    allowed = band & same | itself  # (B, n, w, 3w)
    return Window(w, allowed.view(B * n, 1, w, 3 * w))


def windows(t: torch.Tensor, w: int) -> torch.Tensor:
    """The 3w keys (or values) around each chunk of w queries: (B, H, T, D) -> (B * n, H, 3w, D)."""
    B, H, T, D = t.shape
    n = math.ceil(T / w)
    padded = F.pad(t, (0, 0, w, (n + 1) * w - T))  # (B, H, (n + 2) w, D)
    out = padded.unfold(2, 3 * w, w)  # (B, H, n, D, 3w)
    return out.permute(0, 2, 1, 4, 3).reshape(B * n, H, 3 * w, D)


class Attention(bert.Attention):
    """BERT's attention with rotary positions, global or local, and dropout after the output too."""

    def __init__(self, cfg: ModelConfig, is_global: bool):
        nn.Module.__init__(self)
        C = cfg.hidden_size
        self.num_heads, self.p, self.is_global = cfg.num_heads, cfg.attention_dropout, is_global
        self.theta = cfg.global_rope_theta if is_global else cfg.local_rope_theta
        self.qkv = nn.Linear(C, 3 * C, bias=cfg.attention_bias)
        self.proj = nn.Linear(C, C, bias=cfg.attention_bias)
        self.out_dropout = nn.Dropout(cfg.attention_dropout)

    def forward(
        self, x: torch.Tensor, mask, ragged: bert.Ragged | None = None, positions=None
    ) -> torch.Tensor:
        """x (B, T, C), or (N, C) packed with ragged; mask: the global layers' SDPA mask; positions:
        the layers' shared Context."""
        ctx = positions
        cos, sin = ctx.rotary_global if self.is_global else ctx.rotary_local
        C = x.shape[-1]
        H, D = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).split(C, dim=-1)
        lead = x.shape[:-1]  # (B, T) or (N,)
        q = rotate(
            q.view(*lead, H, D), cos[..., None, :], sin[..., None, :]
        )  # heads share the angles
        k = rotate(k.view(*lead, H, D), cos[..., None, :], sin[..., None, :])
        v = v.view(*lead, H, D)
        p = self.p if self.training else 0.0
        if ragged is not None and self.is_global:
            y = self.attend_nested(q, k, v, ragged, p)  # (N, C)
        elif ragged is not None:  # the packed stream as one row: the window stays in each sequence
            y = (
                self.attend_local(
                    q[None].transpose(1, 2),
                    k[None].transpose(1, 2),
                    v[None].transpose(1, 2),
                    ctx.window,
                    p,
                )[0]
                .transpose(0, 1)
                .reshape(-1, C)
            )
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            if self.is_global:
                y = self.sdpa(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D)
            else:
                y = self.attend_local(q, k, v, ctx.window, p)
            y = y.transpose(1, 2).reshape(*lead, C)
        return self.out_dropout(self.proj(y))

    def attend_local(self, q, k, v, window: Window, p: float) -> torch.Tensor:
        """Local attention of q, k, v (B, H, T, D) -> (B, H, T, D), a chunk of w queries at a
        time."""
        B, H, T, D = q.shape
        w = window.half
        n = math.ceil(T / w)
        chunks = (
            F.pad(q, (0, 0, 0, n * w - T))
            .view(B, H, n, w, D)
            .transpose(1, 2)
            .reshape(B * n, H, w, D)
        )
        y = self.sdpa(chunks, windows(k, w), windows(v, w), attn_mask=window.allowed, dropout_p=p)
        return (
            y.view(B, n, H, w, D).transpose(1, 2).reshape(B, H, n * w, D)[:, :, :T]
        )  # (B, H, T, D)

    def attend_nested(self, q, k, v, ragged: bert.Ragged, p: float) -> torch.Tensor:
        """Global attention over the packed sequences (N, H, D) each, by nested tensors (see
        bert.py)."""
        N, H, D = q.shape

        def nested(t: torch.Tensor) -> torch.Tensor:  # (N, H, D) -> (S, H, j, D), j ragged
            jagged = torch.nested.nested_tensor_from_jagged(
                t.reshape(N, H * D).contiguous(),
                ragged.offsets,
                min_seqlen=ragged.min_len,
                max_seqlen=ragged.max_len,
            )
            return jagged.unflatten(-1, (H, D)).transpose(1, 2)

        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="The PyTorch API of nested tensors is in prototype stage"
            )
            y = self.sdpa(nested(q), nested(k), nested(v), dropout_p=p)  # (S, H, j, D)
        return y.transpose(1, 2).flatten(-2).values()  # (N, C)


class Block(nn.Module):
    """Pre-LN block: x = x + Attn(LN(x)); x = x + GeGLU(LN(x)). Layer 0 has no norm before
    attention: the embeddings' norm just ran."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        C, eps, bias = cfg.hidden_size, cfg.layer_norm_eps, cfg.norm_bias
        self.attn_norm = nn.Identity() if index == 0 else nn.LayerNorm(C, eps=eps, bias=bias)
        self.attn = Attention(cfg, is_global=cfg.layer_types[index] == "global")
        self.mlp_norm = nn.LayerNorm(C, eps=eps, bias=bias)
        self.fc1 = nn.Linear(
            C, 2 * cfg.intermediate_size, bias=cfg.mlp_bias
        )  # the input, then the gate
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.mlp_dropout = nn.Dropout(cfg.hidden_dropout)
        self.fc2 = nn.Linear(cfg.intermediate_size, C, bias=cfg.mlp_bias)

    def forward(
        self, x: torch.Tensor, mask, ragged: bert.Ragged | None = None, positions=None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask, ragged, positions)
        a, gate = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.fc2(self.mlp_dropout(self.act(a) * gate))


class Context(NamedTuple):
    """What every layer of one forward shares: the rotary angles of each kind of layer, and the
    local layers' window."""

    rotary_global: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (T, D), or (N, D) packed
    rotary_local: tuple[torch.Tensor, torch.Tensor]
    window: Window


class Encoder(nn.Module):
    """Embeddings, the pre-LN blocks, the final norm: the last hidden states (B, T, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)

    def context(
        self, positions: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype
    ) -> Context:
        cfg = self.cfg
        D = cfg.hidden_size // cfg.num_heads
        return Context(
            rotary(positions, D, cfg.global_rope_theta, dtype),
            rotary(positions, D, cfg.local_rope_theta, dtype),
            local_window(segments, cfg.local_attention // 2),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, T, C)
        B, T, _ = x.shape
        device = x.device
        # Each token's segment: its document (doc_ids), else its row; -1 for padding.
        segments = (
            doc_ids.long()
            if doc_ids is not None
            else torch.zeros(B, T, dtype=torch.long, device=device)
        )
        if attention_mask is not None:
            segments = segments.masked_fill(attention_mask == 0, -1)
        positions = torch.arange(
            T, device=device
        )  # the block's own positions: RoPE is relative anyway
        if self.cfg.varlen and (attention_mask is not None or doc_ids is not None):
            packed, ragged, real = bert.pack(x, attention_mask, doc_ids)  # (N, C)
            starts = ragged.offsets[:-1]
            sequence = torch.zeros(packed.shape[0], dtype=torch.long, device=device)
            sequence[starts[1:]] = 1
            sequence = sequence.cumsum(0)[None]  # (1, N): which sequence each packed token is in
            ctx = self.context(positions.expand(B, T)[real], sequence, x.dtype)
            for block in self.blocks:
                packed = block(packed, None, ragged, ctx)
            return bert.unpack(self.final_norm(packed), real)
        mask = bert.attention_mask_for(attention_mask, doc_ids)
        ctx = self.context(positions, segments, x.dtype)
        for block in self.blocks:
            x = block(x, mask, positions=ctx)
        return self.final_norm(x)


def init_weights(model: nn.Module) -> None:
    """transformers' initialisation of a ModernBERT from scratch, over BERT's (zero biases,
    LayerNorms at identity): normals truncated at +-cutoff x std; the residual branches' output
    projections (Wo, the GeGLU's W2) and the head's dense layer scaled down by sqrt(2 x layers)."""
    cfg = model.config
    std, cut = cfg.initializer_range, cfg.initializer_cutoff_factor
    out = std / math.sqrt(2 * cfg.num_layers)

    def normal(weight: torch.Tensor, s: float) -> None:
        nn.init.trunc_normal_(weight, mean=0.0, std=s, a=-cut * s, b=cut * s)

    normal(model.encoder.embeddings.word.weight, std)
    for block in model.encoder.blocks:
        normal(block.attn.qkv.weight, std)
        normal(block.attn.proj.weight, out)
        normal(block.fc1.weight, std)
        normal(block.fc2.weight, out)
    normal(model.head.dense.weight, out)
