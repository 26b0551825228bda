"""mlm: BERT-family masked language modelling, written to be read.

Public API:
    load_pretrained(path, device=None, dtype=None, kernels=True) -> (model, tokenizer)
    kernels.install(model, device, cpu_gemm="auto")   (load_pretrained's, unless kernels=False)
    save_pretrained(model, tokenizer, path)
    fill_mask(model, tokenizer, texts, top_k=5, targets=None)
    mask_tokens(input_ids, *, mask_token_id, vocab_size, special_ids, ...) -> (masked, labels)
"""

from mlm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    MLMError,
    TokenizerError,
    UnsupportedModelError,
)
from mlm.fillmask import fill_mask
from mlm.hf import load_pretrained, save_pretrained
from mlm.masking import mask_eval_blocks, mask_tokens
from mlm.model import MaskedLM, ModelConfig
from mlm.tokenizer import Tokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InputError",
    "MLMError",
    "TokenizerError",
    "UnsupportedModelError",
    "MaskedLM",
    "ModelConfig",
    "Tokenizer",
    "load_pretrained",
    "save_pretrained",
    "fill_mask",
    "mask_tokens",
    "mask_eval_blocks",
]
