"""Training a tokenizer on a corpus: a vocabulary learnt from text, put into the pipeline `Tokenizer` loads.

A trainer learns only the vocabulary (and, for BPE, the merges). The result is then rebuilt by the same
builders that load pretrained tokenizers (`build_wordpiece`, `build_byte_level_bpe` in mlm/tokenizer.py),
so a trained tokenizer and a downloaded one run the identical normalise → split → model → special-token
pipeline, and `transformers.AutoTokenizer` loads a saved one with the same ids.

Special tokens take the first ids, in each family's order:
  wordpiece  [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4   (BERT's vocab.txt has them at 0, 100..103)
  bpe        <s> <pad> </s> <unk> <mask>    = 0..4   (RoBERTa's first four; its <mask> is last, ours is 4)
"""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer as Backend, models, normalizers, pre_tokenizers, trainers

from mlm.errors import ConfigError, DataError
from mlm.tokenizer import DEFAULT_SPECIALS, Tokenizer, build_byte_level_bpe, build_wordpiece

SPECIAL_ORDER = {"wordpiece": ("pad", "unk", "cls", "sep", "mask"), "bpe": ("cls", "pad", "sep", "unk", "mask")}
DEFAULT_VOCAB_SIZE = {"wordpiece": 30522, "bpe": 50265}  # BERT's and RoBERTa's


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int | None = None,
    *,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a BERT-style WordPiece or RoBERTa-style byte-level BPE vocabulary on texts.

    vocab_size defaults to BERT's 30522 or RoBERTa's 50265; a small corpus gives fewer. `lowercase`
    applies to WordPiece only: byte-level BPE keeps case, as RoBERTa does. texts is read once; a Corpus
    names itself in the error when it holds no documents.
    """
    if kind not in DEFAULT_SPECIALS:
        raise ConfigError(f"tokenizer kind must be wordpiece or bpe, not {kind!r}")
    specials = DEFAULT_SPECIALS[kind]
    special_tokens = [specials[role] for role in SPECIAL_ORDER[kind]]
    vocab_size = vocab_size or DEFAULT_VOCAB_SIZE[kind]
    # Byte-level BPE starts from all 256 bytes; below that it could not spell every text.
    smallest = len(special_tokens) + (256 if kind == "bpe" else 1)
    if vocab_size < smallest:
        raise ConfigError(f"vocab_size {vocab_size} is too small for {kind}; pass --vocab-size {smallest} or more")

    if kind == "wordpiece":
        backend = Backend(models.WordPiece(unk_token=specials["unk"]))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens, show_progress=False
        )
    else:
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    backend.train_from_iterator(texts, trainer)

    trained = json.loads(backend.to_str())["model"]
    if len(trained["vocab"]) <= len(special_tokens):
        source = getattr(texts, "description", "the texts given")
        raise DataError(f"no documents in {source} to train a tokenizer on; check --data and --text-field")
    if kind == "wordpiece":
        rebuilt = build_wordpiece(trained["vocab"], specials, lowercase=lowercase)
        extra = {"do_lower_case": lowercase}
    else:
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
        rebuilt = build_byte_level_bpe(trained["vocab"], merges, specials, mask_lstrip=True)
        extra = {"add_prefix_space": False}
    return Tokenizer(rebuilt, specials, extra_config=extra)
