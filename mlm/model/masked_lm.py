"""The masked language model: a family's encoder, then the MLM head, and the loss on the labelled
rows.

    h = Encoder(ids)                            (B, T, C)   bert.py, deberta.py
    logits = LN(act(h W_d + b_d)) W_e^T + b     (B, T, V)   W_e the word embeddings (tied)
    loss = mean over labelled positions of cross_entropy(logits, labels)

With labels the head runs on the labelled rows only: at 15% masking that skips about 85% of the
vocabulary projection, the largest matmul in a small model.

Shapes: B batch, T tokens, C hidden, E embedding width, V vocabulary, N rows the head scores.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlm.errors import InputError
from mlm.masking import IGNORE_INDEX
from mlm.model import bert, deberta, modernbert
from mlm.model.config import ACTIVATIONS, ModelConfig

ENCODERS = {
    "bert": bert.Encoder,
    "roberta": bert.Encoder,
    "distilbert": bert.Encoder,
    "deberta-v2": deberta.Encoder,
    "modernbert": modernbert.Encoder,
}


class Decoder(nn.Module):
    """logits = h W^T + b: W the word embeddings, handed in at each call (the tie), b the decoder's
    own bias (none where the config says so)."""

    def __init__(self, vocab_size: int, bias: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight, self.bias)  # (..., V)

    def loss(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (fp32) of the rows h (N, E) against targets (N,), IGNORE_INDEX rows
        skipped; 0, not 0/0, when no row is labelled."""
        total = F.cross_entropy(
            self(h, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class MLMHead(nn.Module):
    """Transform (dense + act + LayerNorm), then the decoder tied to the word embeddings.

    DeBERTa's two namings of the head (cls.predictions.*, lm_predictions.lm_head.*) both compute
    this; the legacy one maps to embedding_size, the width of the word embeddings it is tied to."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.embedding_size, bias=cfg.classifier_bias)
        self.act = ACTIVATIONS[cfg.head_act]
        self.norm = nn.LayerNorm(cfg.embedding_size, eps=cfg.layer_norm_eps, bias=cfg.norm_bias)
        self.decoder = Decoder(cfg.vocab_size, bias=cfg.decoder_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The transform: (..., C) -> (..., E), ready for the decoder."""
        return self.norm(self.act(self.dense(h)))


class MaskedLM(nn.Module):
    """A BERT-family encoder with its MLM head.

    `model(input_ids)` gives logits (B, T, V); with `labels` (IGNORE_INDEX where nothing is
    predicted) it gives the mean cross-entropy over the labelled positions, running the head on
    those rows only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = ENCODERS[cfg.family](cfg)
        self.head = MLMHead(cfg)
        self.apply(self._init_weights)
        if cfg.family == "modernbert":
            modernbert.init_weights(self)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, LayerNorm =
        # identity.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.word

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states (B, T, C).

        attention_mask (B, T): 1 for real tokens, 0 for padding; padded keys are hidden from every
        query, so padding never changes the outputs at real positions. doc_ids (B, T): document
        number of each token in a packed block; tokens attend only within their own document
        (padding, given its own id such as -1, is then a document of its own). Absolute positions
        still count from the start of the block; DeBERTa's relative ones need no such care."""
        T = input_ids.shape[1]
        if T > self.config.max_tokens:
            raise InputError(
                f"sequence of {T} tokens is longer than the model's limit of "
                f"{self.config.max_tokens}; "
                "truncate the input or use a shorter block size"
            )
        return self.encoder(input_ids, attention_mask, token_type_ids, doc_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) for hidden states (..., C): any subset of rows, or all of
        them."""
        return self.head.decoder(self.head(hidden), self.word_embeddings.weight)

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

        max_predictions (BERT's max_predictions_per_seq): score a fixed M rows per sequence,
        labelled positions first, padded with ignored rows. Shapes then do not depend on the mask,
        so torch.compile sees one graph; a row with more than M labels loses the excess, so use it
        with masks whose count per row is bounded (static masking)."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, doc_ids)  # (B, T, C)
        if labels is None:
            return self.logits(hidden)  # (B, T, V)
        rows, targets = self.labelled_rows(hidden, labels, max_predictions)  # (N, C), (N,)
        return self.head.decoder.loss(self.head(rows), self.word_embeddings.weight, targets)

    @staticmethod
    def labelled_rows(
        hidden: torch.Tensor, labels: torch.Tensor, max_predictions: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of hidden (B, T, C) that the head scores, and their targets: (N, C), (N,).

        Without max_predictions, every labelled position in row order. With it, M rows per sequence
        (see forward), where targets are IGNORE_INDEX for the padding rows."""
        if max_predictions is None:
            picked = labels != IGNORE_INDEX  # (B, T)
            return hidden[picked], labels[picked]  # (N, C), (N,)
        C = hidden.shape[-1]
        # (B, T)
        labelled_first = (labels != IGNORE_INDEX).int().argsort(dim=1, descending=True, stable=True)
        order = labelled_first[:, :max_predictions]  # (B, M)
        rows = hidden.gather(1, order[..., None].expand(-1, -1, C)).view(-1, C)  # (B*M, C)
        return rows, labels.gather(1, order).view(-1)  # (B*M, C), (B*M,)

    def set_dropout(self, p: float) -> None:
        """One dropout probability everywhere: embeddings, attention probabilities, residual
        branches."""
        self.config.hidden_dropout = self.config.attention_dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            if isinstance(module, bert.Attention):
                module.p = p

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
