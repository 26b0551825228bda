"""FLOPs per token of a masked-LM step, for utilisation: model FLOPs (MFU) and hardware FLOPs (HFU).

What is counted: matmuls only, 2 FLOPs per multiply-add; a backward pass costs twice its forward
(the gradients of the inputs and of the weights), so a training step is 3x an inference forward. Per
token of a sequence of T tokens, forward, with L layers of width C, MLP width I, vocabulary V, word
embeddings of width E (= C but in DeBERTa variants that embed narrower and project up):

    linear layers   2 x L x (4 C^2 + 2 C I)    Q, K, V and the output projection; the MLP's two
                                               (ModernBERT's GeGLU: 3 C I, its input is 2 I wide)
    attention       2 x L x 2 C T              the scores Q K^T, and their weighted sum of V
                                               (ModernBERT's local layers: T -> min(T, 2w + 1),
                                               the keys within w = local_attention / 2)
    DeBERTa         2 x L x C T per term       each position term (c2p, p2c) scores every
                                               query-key pair once more, as Q K^T does
    embeddings      2 x E C                    the projection up to C, only when E != C
    head            2 x (C E + E V)            the transform (dense) and the tied decoder

Left out: embedding lookups, LayerNorms, activations, softmax, dropout, the optimizer (a few percent
at BERT sizes); and DeBERTa's projection of its table of 2k relative positions through W_q and W_k,
done once per layer and step whatever the batch, so no per-token count can hold it (deberta-v3-base,
2k = 512: about 8% on top of the linear layers at 8 x 128 tokens a step, about 1% at 64 x 128).

Model FLOPs are what the model needs, the same number for any implementation: the full-vocabulary
head counted for every token, as MFU is usually reported, so that work an implementation skips shows
as speed.

Hardware FLOPs are the matmul work done, in two places different from the model count:
  - the head counts only on the rows it runs on: mlm's training step runs it on the masked rows
    (about 15% of the tokens), transformers' on every row; in inference both run it everywhere;
  - DeBERTa's position terms: transformers scores each query (or key) against every one of the 2k
    table rows and then gathers the T it needs, 2 x L x C x 2k per term, not C T; mlm's relative
    shift (mlm/kernels/disentangled_bias.py) scores it against T + ceil(T/2) - 1 rows: the caller
    passes the count for the kernel it installed (`mlm.kernels.position_rows`);
  - ModernBERT's local layers: transformers scores every query against all T keys and masks the
    band (T keys per query); mlm scores chunks of w queries against the 3w keys around them.
"""

from __future__ import annotations

import torch

from mlm.model import ModelConfig

__all__ = ["PEAK_TFLOPS", "hardware_flops_per_token", "model_flops_per_token", "peak_flops"]

# Dense peak TFLOP/s by a fragment of torch.cuda.get_device_name(), first match wins. "fp32" is the
# non-tensor-core rate; "tf32" applies when float32 matmuls may use TF32 (--tf32,
# set_float32_matmul_precision).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
    "H100 NVL": {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60},
    "H100": {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67},  # SXM
    # before "H200": the first match wins
    "H200 NVL": {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60},
    # SXM: the H100 SXM's compute, more memory
    "H200": {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67},
    "A100": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
}


def linear_flops(config: ModelConfig) -> int:
    """Forward FLOPs per token of the linear layers: the blocks', and the embeddings' projection."""
    C, I, E = config.hidden_size, config.intermediate_size, config.embedding_size
    mlp = 3 if config.family == "modernbert" else 2  # GeGLU: C -> 2I, then I -> C
    return config.num_layers * 2 * (4 * C * C + mlp * C * I) + (2 * E * C if E != C else 0)


def attention_flops(
    config: ModelConfig, seq: int, position_rows: int | None = None, local_keys: int | None = None
) -> int:
    """Forward FLOPs per token of the attention products: content scores and weighted sum over seq
    keys (ModernBERT's local layers: over local_keys, by default the min(seq, 2w + 1) in the
    window), and each DeBERTa position term against position_rows rows of the table (default seq:
    one per query-key pair)."""
    C, terms = config.hidden_size, len(config.position_terms)
    position_rows = seq if position_rows is None else position_rows
    per_layer = [2 * seq + terms * position_rows] * config.num_layers
    if config.family == "modernbert":
        if local_keys is None:
            local_keys = min(seq, config.local_attention + 1)
        per_layer = [2 * (seq if t == "global" else local_keys) for t in config.layer_types]
    return 2 * C * sum(per_layer)


def head_flops(config: ModelConfig) -> int:
    """Forward FLOPs of the MLM head for one row: the transform and the full-vocabulary decoder."""
    C, E = config.hidden_size, config.embedding_size
    return 2 * (C * E + E * config.vocab_size)


def model_flops_per_token(config: ModelConfig, seq: int, training: bool) -> int:
    """Model FLOPs per token (see the module docstring): the head counted for every token."""
    passes = 3 if training else 1
    return passes * (linear_flops(config) + attention_flops(config, seq) + head_flops(config))


def hardware_flops_per_token(
    config: ModelConfig,
    seq: int,
    training: bool,
    head_rows_fraction: float,
    position_rows: int | None = None,
    local_keys: int | None = None,
) -> float:
    """Hardware FLOPs per token: the head on head_rows_fraction of the tokens (the rows it runs on),
    DeBERTa's position terms against position_rows rows of the relative table each (default: the
    whole table of 2k, as transformers and mlm's plain model compute them; mlm's kernel: its
    `position_rows(seq)`), and ModernBERT's local layers over local_keys keys a query (default seq,
    as transformers computes them; mlm: 3w)."""
    passes = 3 if training else 1
    rows = (position_rows or 2 * config.relative_span) if config.position_terms else None
    return passes * (
        linear_flops(config)
        + attention_flops(config, seq, rows, local_keys or seq)
        + head_rows_fraction * head_flops(config)
    )


def peak_flops(device: torch.device, dtype: str, override: float | None = None) -> float | None:
    """The device's dense peak in FLOP/s for this dtype, or None when unknown (then no MFU is
    reported)."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = dtype
    if dtype == "fp32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[key] * 1e12
    return None
