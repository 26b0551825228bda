"""The encoders, written as the math. Read in this order:

config.py      ModelConfig: every family's settings, one dataclass
bert.py        embeddings, attention, post-LN block, encoder: BERT, RoBERTa, DistilBERT
deberta.py     DeBERTa-v2/v3's disentangled attention and relative positions, on BERT's blocks
masked_lm.py   the encoder of a family, the MLM head tied to the embeddings, the loss
"""

from mlm.model.config import ACTIVATIONS, DTYPES, FAMILIES, ModelConfig
from mlm.model.masked_lm import MaskedLM

__all__ = ["ACTIVATIONS", "DTYPES", "FAMILIES", "MaskedLM", "ModelConfig"]
