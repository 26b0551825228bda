"""Tokenizer: a thin layer over the `tokenizers` library that knows the model family's special
tokens.

A Hugging Face folder carries its tokenizer in one of three forms, tried in this order:
  1. `tokenizer.json`             the full serialised pipeline (what every recent checkpoint ships)
  2. `vocab.txt`                  WordPiece (BERT, DistilBERT); lower-casing from the config
  3. `vocab.json` + `merges.txt`  byte-level BPE (RoBERTa, DistilRoBERTa)
Forms 2 and 3 are rebuilt here the way `transformers` builds them, so the token ids are the same as
`AutoTokenizer.from_pretrained` on the same folder.

Special tokens (mask, pad, cls/bos, sep/eos, unk) come from `tokenizer_config.json` or
`special_tokens_map.json`; when neither names them, the family's defaults apply: `[MASK]`-style
names for WordPiece vocabularies and `<mask>`-style names for byte-level BPE."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import (
    Tokenizer as Backend,
)

from mlm.errors import TokenizerError
from mlm.io import atomic_write, read_json
from mlm.spm import SAVE_CONFIG_KEYS, build_from_spm, precompiled_charsmap, set_deberta_pipeline

ROLES = ("mask", "pad", "cls", "sep", "unk")
DEFAULT_SPECIALS = {
    "wordpiece": {"mask": "[MASK]", "pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]"},
    "bpe": {"mask": "<mask>", "pad": "<pad>", "cls": "<s>", "sep": "</s>", "unk": "<unk>"},
    "unigram": {"mask": "[MASK]", "pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "unk": "[UNK]"},
}
# ModernBERT's byte-level BPE names its special tokens BERT's way.
MODERNBERT_SPECIALS = DEFAULT_SPECIALS["wordpiece"]
# The classes that take a tokenizer.json as it is, where the family classes rebuild parts of it.
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# What tokenizer_config.json names, so that AutoTokenizer rebuilds the same pipeline.
TOKENIZER_CLASSES = {
    "wordpiece": "BertTokenizer",
    "bpe": "RobertaTokenizer",
    "unigram": "DebertaV2Tokenizer",
}
# The spellings users type for a mask; fill-mask maps any of them to the model's own mask token.
MASK_ALIASES = ("[MASK]", "<mask>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its special tokens.

    `kind` is "wordpiece" (BERT, DistilBERT), "bpe" (byte-level BPE: RoBERTa, DistilRoBERTa) or
    "unigram" (SentencePiece: DeBERTa-v2/v3); it decides how word boundaries are read for whole-word
    masking."""

    # One token and its id per role in ROLES (cls is RoBERTa's bos, sep its eos).
    mask_token: str
    mask_token_id: int
    pad_token: str
    pad_token_id: int
    cls_token: str
    cls_token_id: int
    sep_token: str
    sep_token_id: int
    unk_token: str
    unk_token_id: int

    def __init__(
        self,
        backend: Backend,
        specials: dict[str, str],
        *,
        model_max_length: int = 512,
        clean_up_tokenization_spaces: bool = False,
        extra_config: dict | None = None,
    ):
        self.backend = backend
        self.kind = _kind_of(backend)
        self.specials = dict(specials)
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.extra_config = dict(extra_config or {})
        ids = {role: _special_id(backend, self.specials[role], role) for role in ROLES}
        self.mask_token, self.mask_token_id = self.specials["mask"], ids["mask"]
        self.pad_token, self.pad_token_id = self.specials["pad"], ids["pad"]
        self.cls_token, self.cls_token_id = self.specials["cls"], ids["cls"]
        self.sep_token, self.sep_token_id = self.specials["sep"], ids["sep"]
        self.unk_token, self.unk_token_id = self.specials["unk"], ids["unk"]
        # Ids that masking must never choose and that decoding with skip_special_tokens drops.
        self.special_ids = sorted({backend.token_to_id(t) for t in self.specials.values()})

    # -------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load the tokenizer of a local Hugging Face-format folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(
                f"tokenizer folder {str(folder)!r} does not exist; pass a local model folder"
            )
        config = read_json(folder / "tokenizer_config.json", TokenizerError)
        specials_map = read_json(folder / "special_tokens_map.json", TokenizerError)

        if (folder / "tokenizer.json").is_file():
            backend = Backend.from_file(str(folder / "tokenizer.json"))
            # Some files (all-MiniLM-L6-v2's) switch on padding/truncation; batching is done here
            # instead.
            backend.no_padding()
            backend.no_truncation()
            kind = _kind_of(backend)
            if kind == "unigram" and str(config.get("tokenizer_class", "")).startswith("DebertaV2"):
                # transformers keeps the vocabulary, added tokens and precompiled normaliser table,
                # and rebuilds the rest from the flags.
                charsmap = precompiled_charsmap(json.loads(backend.to_str()))
                set_deberta_pipeline(
                    backend,
                    do_lower_case=config.get("do_lower_case", False),
                    split_by_punct=config.get("split_by_punct", False),
                    add_prefix_space=config.get("add_prefix_space", True),
                    charsmap=charsmap,
                )
        # DeBERTa-v2/v3 folders ship only the SentencePiece model
        elif (folder / "spm.model").is_file():
            backend, specials, extra = build_from_spm(folder)
            return cls(
                backend, specials, model_max_length=_model_max_length(config), extra_config=extra
            )
        elif (folder / "vocab.txt").is_file():
            kind = "wordpiece"
            backend = None
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            kind = "bpe"
            backend = None
        else:
            raise TokenizerError(
                f"no tokenizer in {str(folder)!r}: expected tokenizer.json, spm.model, vocab.txt, "
                "or vocab.json + merges.txt"
            )

        specials = dict(DEFAULT_SPECIALS[kind])
        for role in ROLES:
            value = config.get(f"{role}_token", specials_map.get(f"{role}_token"))
            if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
                value = value.get("content")
            if value:
                specials[role] = value

        if backend is None and kind == "wordpiece":
            backend = build_wordpiece(
                _read_vocab_txt(folder / "vocab.txt"),
                specials,
                lowercase=config.get("do_lower_case", True),
                strip_accents=config.get("strip_accents"),
                chinese_chars=config.get("tokenize_chinese_chars", True),
            )
        elif backend is None:
            vocab = read_json(folder / "vocab.json", TokenizerError)
            merges = _read_merges(folder / "merges.txt")
            backend = build_byte_level_bpe(
                vocab,
                merges,
                specials,
                add_prefix_space=config.get("add_prefix_space", False),
                mask_lstrip=False,
            )

        kept = ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "add_prefix_space")
        if kind == "unigram":
            kept = SAVE_CONFIG_KEYS
        keep = {k: config[k] for k in kept if k in config}
        # ModernBERT's: tokenizer.json as it is
        if config.get("tokenizer_class") in GENERIC_CLASSES:
            keep["tokenizer_class"] = config["tokenizer_class"]
        return cls(
            backend,
            specials,
            model_max_length=_model_max_length(config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            extra_config=keep,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into a folder,
        each whole."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.files().items():
            atomic_write(folder / name, text)

    def files(self) -> dict[str, str]:
        """The text of each file in TOKENIZER_FILES, as `save` writes them."""
        tokens = {f"{role}_token": self.specials[role] for role in ROLES}
        if self.kind == "bpe":  # RoBERTa names cls/sep as bos/eos too
            tokens.update(bos_token=self.cls_token, eos_token=self.sep_token)
        config = {
            "tokenizer_class": TOKENIZER_CLASSES[self.kind],
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            **self.extra_config,
            **tokens,
        }
        return {
            "tokenizer.json": self.backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(tokens, indent=2),
        }

    # ------------------------------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True):
        """`tokenizers.Encoding`s for many texts, encoded in parallel by the Rust library."""
        return self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def __call__(
        self, texts: str | Sequence[str], *, max_length: int | None = None, truncation: bool = False
    ) -> dict[str, torch.Tensor]:
        """Encode and right-pad a batch: {"input_ids", "attention_mask"} as (B, T) int64 tensors."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.encode_batch(texts)
        rows = [e.ids for e in encodings]
        if truncation:
            limit = max_length or self.model_max_length
            # keep the final sep
            rows = [r if len(r) <= limit else r[: limit - 1] + [r[-1]] for r in rows]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def word_starts(self, encoding) -> list[bool]:
        """True at the first token of each word, and at every special token (a word on its own).

        Word ids come from the pre-tokenizer: BERT's splits on spaces and punctuation, byte-level
        BPE's keeps a leading space with its word (" world" is one word), as HF's whole-word masking
        assumes; SentencePiece's Metaspace starts a word at each piece that begins with "▁"."""
        starts, previous = [], None
        for word in encoding.word_ids:
            starts.append(word is None or word != previous)
            previous = word
        return starts

    # ------------------------------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # transformers (5.25) skips the clean-up for byte-level BPE, whose decoder already gives the
        # text's own spaces back (ModernBERT's tokenizer_config.json asks for it all the same).
        if self.clean_up_tokenization_spaces and self.kind != "bpe":
            return clean_up_spaces(text)
        return text

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]


# ------------------------------------------------------------------------------------------
# fingerprints A prepared dataset records both, so token ids are never read with a tokenizer that
# means other words by them.
def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer.json text that `Tokenizer.save` writes: names the whole pipeline."""
    return hashlib.sha256(tokenizer.backend.to_str(pretty=True).encode("utf-8")).hexdigest()


def vocab_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of the token → id table: equal exactly when token ids mean the same to two tokenizers,
    even when one was loaded from tokenizer.json and the other rebuilt from vocab.txt."""
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(by_id, ensure_ascii=False).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------- builders
def _model_max_length(config: dict) -> int:
    max_len = config.get("model_max_length", 512)
    # HF's huge sentinel: "unset"
    return max_len if isinstance(max_len, int) and max_len <= 1_000_000 else 512


def _special_id(backend: Backend, token: str, role: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise TokenizerError(
            f"the {role} token {token!r} is not in the vocabulary; name the right one in "
            "tokenizer_config.json"
        )
    return token_id


def _kind_of(backend: Backend) -> str:
    """ "unigram" for a SentencePiece model (DeBERTa's), "bpe" for a byte-level pre-tokenizer
    (RoBERTa's), else "wordpiece"."""
    if isinstance(backend.model, models.Unigram):
        return "unigram"
    return "bpe" if isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel) else "wordpiece"


def build_wordpiece(
    vocab: dict[str, int],
    specials: dict[str, str],
    *,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    chinese_chars: bool = True,
) -> Backend:
    """BERT's pipeline: clean + (lower-case) normalise, split on spaces/punctuation, WordPiece,
    [CLS] .. [SEP]."""
    backend = Backend(
        models.WordPiece(vocab, unk_token=specials["unk"], max_input_chars_per_word=100)
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=chinese_chars,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    _add_specials(backend, specials, mask_lstrip=False)
    cls_token, sep_token = specials["cls"], specials["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[
            (cls_token, backend.token_to_id(cls_token)),
            (sep_token, backend.token_to_id(sep_token)),
        ],
    )
    return backend


def build_byte_level_bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    specials: dict[str, str],
    *,
    add_prefix_space: bool = False,
    mask_lstrip: bool = True,
) -> Backend:
    """RoBERTa's pipeline: bytes to printable characters, BPE with no unk, <s> .. </s>.

    `mask_lstrip` lets "a <mask>" put the mask where the word " x" would be, as RoBERTa was trained
    (its own tokenizer.json sets it). `transformers` 5 does not set it when it rebuilds a tokenizer
    from vocab.json + merges.txt, so loading that form passes False to give the same ids."""
    backend = Backend(
        models.BPE(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    _add_specials(backend, specials, mask_lstrip=mask_lstrip)
    backend.post_processor = processors.RobertaProcessing(
        (specials["sep"], backend.token_to_id(specials["sep"])),
        (specials["cls"], backend.token_to_id(specials["cls"])),
        trim_offsets=True,
        add_prefix_space=add_prefix_space,
    )
    return backend


def build_modernbert_bpe(
    vocab: dict[str, int], merges: list[tuple[str, str]]
) -> tuple[Backend, dict]:
    """ModernBERT's pipeline over trained pieces: NFC, bytes to printable characters with no prefix
    space, BPE; the special tokens after the pieces, the [MASK] taking the space before it (lstrip,
    so that "a [MASK]" predicts the word " x"); [CLS] A [SEP]. Returns the backend and its
    specials by role."""
    backend = Backend(
        models.BPE(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = MODERNBERT_SPECIALS
    backend.add_special_tokens(
        [
            AddedToken(specials[role], special=True, normalized=False, lstrip=role == "mask")
            for role in ("unk", "cls", "sep", "pad", "mask")
        ]  # ModernBERT's order: [UNK] at 50280
    )
    cls_token, sep_token = specials["cls"], specials["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(t, backend.token_to_id(t)) for t in (cls_token, sep_token)],
    )
    return backend, specials


def _add_specials(backend: Backend, specials: dict[str, str], *, mask_lstrip: bool) -> None:
    # Registered as special added tokens so "[MASK]" in a text is one token, never split or
    # lower-cased.
    backend.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False, lstrip=mask_lstrip and role == "mask")
            for role, tok in specials.items()
        ]
    )


def clean_up_spaces(text: str) -> str:
    """HF's `clean_up_tokenization_spaces`: glue punctuation and English contractions back on."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


# ----------------------------------------------------------------------------------------- file I/O


def _read_vocab_txt(path: Path) -> dict[str, int]:
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return {tok.rstrip("\r"): i for i, tok in enumerate(tokens)}


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    return merges
