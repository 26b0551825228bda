"""mlm: BERT-family masked language modelling, written to be read.

Public API:
    load_pretrained(path, device=None, dtype=None, kernels=True) -> (model, tokenizer)
    kernels.install(model, device, cpu_gemm="auto")   (what load_pretrained does unless kernels=False)
    save_pretrained(model, tokenizer, path)
    fill_mask(model, tokenizer, texts, top_k=5, targets=None)
    mask_tokens(input_ids, *, mask_token_id, vocab_size, special_ids, ...) -> (masked_input_ids, labels)
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
from mlm.hf import load_pretrained, save_pretrained
from mlm.model import MaskedLM, ModelConfig
from mlm.tokenizer import Tokenizer
from mlm.masking import mask_eval_blocks, mask_tokens
from mlm.fillmask import fill_mask

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "InputError", "MLMError", "TokenizerError",
    "UnsupportedModelError", "MaskedLM", "ModelConfig", "Tokenizer", "load_pretrained", "save_pretrained",
    "fill_mask", "mask_tokens", "mask_eval_blocks",
]
