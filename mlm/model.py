"""The BERT-family encoder for masked language modelling, in one file.

One encoder covers three checkpoint families; what differs between them is a config field:
  BERT        learned positions 0..T-1, token-type embeddings, post-LN blocks, MLM head with `hidden_act`
  RoBERTa     positions start at pad_token_id + 1 and skip padding, a single token type, head act = gelu
  DistilBERT  no token types, no dropout after the attention projection, head act = `activation`
All three are post-LN (LayerNorm after each residual add, eps 1e-12 inside the square root) and tie the
MLM decoder to the word embeddings, with a separate decoder bias.

Shape legend: B batch, T tokens, C = hidden_size, H heads, D = C // H head dim, V vocabulary,
N rows picked for the head (the masked positions).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention, dropout, linear, linear_cross_entropy
from mlm.errors import ConfigError, InputError
from mlm.masking import IGNORE_INDEX

FAMILIES = ("bert", "roberta", "distilbert")
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
    family: str = "bert"  # "bert" | "roberta" | "distilbert": key names and config.json format on save
    varlen: bool = False  # attention per sequence (nested tensors): padding is skipped, documents kept apart

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

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table allows (RoBERTa's offset uses up some rows)."""
        return self.max_position_embeddings - self.position_offset


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) by kernels/cpu_linear.py: oneDNN for fp32 on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Dropout(nn.Dropout):
    """nn.Dropout (same `p`, same train/eval switch) by kernels/cpu_dropout.py: a cheaper draw on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if self.cfg.position_offset:
            # RoBERTa: real tokens are numbered from pad_token_id + 1 and padding keeps position pad_token_id.
            real = (input_ids != self.cfg.pad_token_id).int()
            positions = torch.cumsum(real, dim=1) * real + (self.cfg.position_offset - 1)  # (B, T)
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.word(input_ids) + self.position(positions)  # (B, T, C)
        if self.token_type is not None:
            if token_type_ids is None:  # no segments given: all segment A, as HF does
                x = x + self.token_type.weight[0]
            else:
                x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (HF keeps three; the mapping table splits it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None = None) -> torch.Tensor:
        p_drop = self.dropout if self.training else 0.0
        if offsets is not None:
            return self.proj(self._varlen(x, offsets, p_drop))
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, H, T, D)
        # mask: bool, True where a query may look at a key; (B, 1, 1, T) for padding, (B, 1, T, T) for documents.
        y = attention(q, k, v, mask, p_drop)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)

    def _varlen(self, x: torch.Tensor, offsets: torch.Tensor, p_drop: float) -> torch.Tensor:
        """Attention over S sequences packed end to end in x (N, C); sequence s is x[offsets[s]:offsets[s+1]].

        Nested (jagged) tensors give SDPA one ragged batch: no padding is computed and no token sees
        another sequence, with no (T, T) mask at all (on CUDA, the varlen FlashAttention kernels).
        """
        N, C = x.shape
        H = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, C) -> (S, H, j, D), j ragged
            nested = torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets)  # (S, j, C)
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, mask, offsets)))
        x = self.mlp_norm(x + self.mlp_dropout(self.fc2(self.act(self.fc1(x)))))
        return x


class MLMHead(nn.Module):
    """Transform (dense + act + LayerNorm), then the decoder: the word embeddings, transposed, plus a bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.head_act]
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
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
    ) -> torch.Tensor:
        """Last hidden states (B, T, C).

        attention_mask (B, T): 1 for real tokens, 0 for padding; padded keys are hidden from every query,
        so padding never changes the outputs at real positions.
        doc_ids (B, T): document number of each token in a packed block; tokens attend only within their
        own document (padding, given its own id such as -1, is then a document of its own). Positions
        still count from the start of the block.
        """
        B, T = input_ids.shape
        if T > self.config.max_tokens:
            raise InputError(
                f"sequence of {T} tokens is longer than the model's limit of {self.config.max_tokens}; "
                "truncate the input or use a shorter block size"
            )
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        if self.config.varlen and (attention_mask is not None or doc_ids is not None):
            return self._encode_varlen(x, attention_mask, doc_ids)
        mask = attention_mask_for(attention_mask, doc_ids)
        for block in self.blocks:
            x = block(x, mask)
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
        packed = x[real]  # (N, C)
        for block in self.blocks:
            packed = block(packed, None, offsets)
        return x.new_zeros(B, T, C).masked_scatter(real[..., None], packed)  # (B, T, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) for hidden states (..., C): any subset of rows, or all of them."""
        return linear(self.head.transform(hidden), self.embeddings.word.weight, self.head.bias)

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
        hidden = self.encode(input_ids, attention_mask, token_type_ids, doc_ids)  # (B, T, C)
        if labels is None:
            return self.logits(hidden)  # (B, T, V)
        rows, targets = self.labelled_rows(hidden, labels, max_predictions)  # (N, C), (N,)
        # The decoder matmul and the loss together: a fused, chunked kernel on GPU, plain PyTorch elsewhere.
        return linear_cross_entropy(self.head.transform(rows), self.embeddings.word.weight, self.head.bias, targets)

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
