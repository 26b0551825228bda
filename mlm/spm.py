"""SentencePiece `spm.model` folders (DeBERTa-v2/v3) read with `tokenizers` alone.

A DeBERTa-v2/v3 folder carries its vocabulary as `spm.model`, a SentencePiece `ModelProto` in
protobuf's binary format, plus `tokenizer_config.json` and `added_tokens.json` (`[MASK]`, numbered
after the pieces). Neither `sentencepiece` nor `protobuf` is needed to use it: a small reader of the
wire format takes out the pieces and scores, and the pipeline is rebuilt the way transformers 5's
`DebertaV2Tokenizer` builds it, so the ids equal SentencePiece's own (and
`AutoTokenizer.from_pretrained(folder)`'s from transformers 5.25 on):

    normalizer      [lower-case] -> the model's own normaliser (its precompiled NFKC table,
                    `nmt_nfkc`) -> strip the right end -> each run of 2+ spaces to one
    pre-tokenizer   [punctuation split off] -> Metaspace: a space becomes "▁", every word starts
                    with one
    model           Unigram over the pieces' scores (the most likely split), unknown characters
                    -> [UNK]
    post-processor  [CLS] A [SEP]  and  [CLS] A [SEP] B [SEP]
    decoder         Metaspace: "▁" back to a space, the leading one dropped

The normaliser is SentencePiece's: the model was trained on text it had normalised, so "…" becomes
"...", a full-width "Ａ" an "A" and "ﬁ" "fi", as SentencePiece itself and transformers 4 and 5.25+
tokenize them. transformers 5.0 to 5.24 left the precompiled table out and tokenize such text
differently (to [UNK] where no piece holds the character). A model whose spm.model carries no table
(normaliser `identity`) gets transformers' whitespace rules and NFC instead, as every transformers 5
version gives it.

Whole-word masking: Metaspace splits the text into words, each beginning with "▁", and
`Encoding.word_ids` numbers them, so a token starts a word exactly when it starts with "▁" (or is an
added token such as [MASK])."""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from mlm.errors import TokenizerError
from mlm.io import read_json

# SentencePiece's piece types and model types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

# DebertaV2Tokenizer's defaults, in transformers' order of special-token attributes: the order in
# which tokens missing from the vocabulary get new ids.
DEBERTA_SPECIALS = {
    "bos": "[CLS]",
    "eos": "[SEP]",
    "unk": "[UNK]",
    "sep": "[SEP]",
    "pad": "[PAD]",
    "cls": "[CLS]",
    "mask": "[MASK]",
}
ROLES = ("mask", "pad", "cls", "sep", "unk")
# how an added token is matched in text
ADDED_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word", "normalized")
# What `Tokenizer.save` must write into tokenizer_config.json beside tokenizer.json:
# DebertaV2Tokenizer takes only the vocabulary, added tokens and post-processor from tokenizer.json
# and rebuilds the rest from these (and, when no "[UNK]" piece scores 0.0, takes the unknown id from
# `unk_id`, else guesses 1).
SAVE_CONFIG_KEYS = (
    "tokenizer_class",
    "do_lower_case",
    "split_by_punct",
    "add_prefix_space",
    "unk_id",
)


@dataclass
class SpmModel:
    """The fields of a SentencePiece `ModelProto` that tokenization needs; defaults are the
    .proto's."""

    # (piece, score, type) in id order
    pieces: list[tuple[str, float, int]] = field(default_factory=list)
    model_type: int = 1  # trainer_spec.model_type: 1 unigram, 2 bpe, 3 word, 4 char
    unk_id: int = 0  # trainer_spec.unk_id
    # trainer_spec: unknown characters as <0xNN> byte pieces (transformers ignores it)
    byte_fallback: bool = False
    normalizer_name: str = ""  # normalizer_spec.name, e.g. "nmt_nfkc"
    # the normaliser compiled to a table (a double-array trie + strings)
    precompiled_charsmap: bytes = b""
    # a space is put before the text, so its first word looks like any other
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True  # runs of spaces become one, leading and trailing ones go
    escape_whitespaces: bool = True  # spaces become "▁" before the pieces are matched


# ------------------------------------------------------------------------------------ protobuf
# reader A message is a sequence of fields, each a varint key (field number << 3 | wire type) and a
# value: wire type 0 a varint, 1 eight bytes, 2 a varint length then that many bytes (strings,
# bytes, nested messages), 5 four bytes (float). Types 3 and 4 (groups) are long deprecated and
# never in spm.model.
VARINT, I64, LEN, I32 = 0, 1, 2, 5

# field number -> (name, wire type) for the fields we keep; all others are skipped.
MODEL_FIELDS = {1: ("pieces", LEN), 2: ("trainer_spec", LEN), 3: ("normalizer_spec", LEN)}
PIECE_FIELDS = {1: ("piece", LEN), 2: ("score", I32), 3: ("type", VARINT)}
TRAINER_FIELDS = {3: ("model_type", VARINT), 35: ("byte_fallback", VARINT), 40: ("unk_id", VARINT)}
NORMALIZER_FIELDS = {
    1: ("normalizer_name", LEN),
    2: ("precompiled_charsmap", LEN),
    3: ("add_dummy_prefix", VARINT),
    4: ("remove_extra_whitespaces", VARINT),
    5: ("escape_whitespaces", VARINT),
}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it: 7 bits a byte, low bits first, high bit =
    more."""
    if pos < len(buf) and buf[pos] < 0x80:  # one byte: nearly every key, length and piece type
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("a number runs past the end of the data")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("a number longer than 10 bytes")


def _message(buf: bytes, schema: dict[int, tuple[str, int]]) -> dict[str, list]:
    """The known fields of one message, each a list of raw values (ints or bytes) in file order."""
    found: dict[str, list] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(buf, pos)
        elif wire in (I64, LEN, I32):
            size, pos = (8, pos) if wire == I64 else (4, pos) if wire == I32 else _varint(buf, pos)
            if pos + size > end:
                raise ValueError(f"field {number} runs past the end of the data")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"field {number} has wire type {wire}, which spm.model never uses")
        if number == 0:
            raise ValueError("a field numbered 0")
        if number in schema:
            name, expected = schema[number]
            if wire != expected:
                raise ValueError(f"field {name!r} has wire type {wire}, expected {expected}")
            found.setdefault(name, []).append(value)
    return found


def _int32(value: int) -> int:
    """protobuf writes a negative int32 as its 64-bit two's complement (pad_id -1 is ten bytes)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def parse_spm(data: bytes) -> SpmModel:
    """Decode the bytes of an spm.model; ValueError (or UnicodeDecodeError) when they are not
    one."""
    top = _message(data, MODEL_FIELDS)
    model = SpmModel()
    for raw in top.get("pieces", []):
        f = _message(raw, PIECE_FIELDS)
        piece = f["piece"][-1].decode("utf-8") if "piece" in f else ""
        score = struct.unpack("<f", f["score"][-1])[0] if "score" in f else 0.0
        model.pieces.append((piece, score, f["type"][-1] if "type" in f else NORMAL))
    # A message field given twice is merged by protobuf; the last value of each scalar wins.
    trainer = {
        k: v[-1]
        for raw in top.get("trainer_spec", [])
        for k, v in _message(raw, TRAINER_FIELDS).items()
    }
    model.model_type = trainer.get("model_type", model.model_type)
    model.byte_fallback = bool(trainer.get("byte_fallback", False))
    model.unk_id = _int32(trainer.get("unk_id", 0))
    spec = {
        k: v[-1]
        for raw in top.get("normalizer_spec", [])
        for k, v in _message(raw, NORMALIZER_FIELDS).items()
    }
    model.normalizer_name = spec.get("normalizer_name", b"").decode("utf-8")
    model.precompiled_charsmap = bytes(spec.get("precompiled_charsmap", b""))
    for name in ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        setattr(model, name, bool(spec.get(name, True)))
    return model


def read_spm(path: str | Path) -> SpmModel:
    """Read an spm.model file; a missing, corrupt or truncated one is a TokenizerError naming it."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path} does not exist; copy the model's spm.model into the folder")
    try:
        model = parse_spm(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(
            f"{path} is cut short or not a SentencePiece model ({e}); download spm.model again"
        ) from None
    if not model.pieces:
        raise TokenizerError(f"{path} holds no vocabulary pieces; download spm.model again")
    if not 0 <= model.unk_id < len(model.pieces):
        raise TokenizerError(
            f"{path} names unknown-piece id {model.unk_id} of {len(model.pieces)}; download "
            "spm.model again"
        )
    return model


# ------------------------------------------------------------------------------------------ builder
def build_from_spm(folder: str | Path) -> tuple[Backend, dict[str, str], dict]:
    """DeBERTa-v2/v3's tokenizer from spm.model, tokenizer_config.json and added_tokens.json.

    Returns the backend, the special tokens by role (mask, pad, cls, sep, unk) and the flags that
    `Tokenizer.save` writes into tokenizer_config.json (see SAVE_CONFIG_KEYS).
    """
    folder = Path(folder)
    spm = read_spm(folder / "spm.model")
    if spm.model_type != 1:
        kind = MODEL_TYPES.get(spm.model_type, f"type {spm.model_type}")
        raise TokenizerError(
            f"{folder / 'spm.model'} is a SentencePiece {kind} model; only unigram models "
            "(DeBERTa-v2/v3) work here"
        )
    config = read_json(folder / "tokenizer_config.json", TokenizerError)
    flags = {
        "do_lower_case": bool(config.get("do_lower_case", False)),
        "split_by_punct": bool(config.get("split_by_punct", False)),
        "add_prefix_space": bool(config.get("add_prefix_space", True)),
    }

    named, extras, declared, listed = _added_tokens(folder, config)

    vocab = [(piece, score) for piece, score, _ in spm.pieces]
    # DebertaV2Tokenizer finds [UNK] by (piece, score 0.0), else uses the model's own unknown id.
    unk = (named["unk"].content, 0.0)
    unk_id = vocab.index(unk) if unk in vocab else spm.unk_id
    backend = Backend(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    set_deberta_pipeline(backend, **flags, charsmap=spm.precompiled_charsmap)

    # Added in transformers' order: the declared tokens, then named and extra special tokens still
    # missing, then the model's control pieces (special), which keep their ids. User-defined pieces
    # stay with the model, matched inside the normalised text as SentencePiece matches them (after a
    # word's "▁").
    tokens, seen = [], set()
    pieces = [
        AddedToken(p, normalized=False, special=True)
        for p, _, kind in spm.pieces
        if kind == CONTROL
    ]
    for token in [t for _, t in declared] + list(named.values()) + extras + pieces:
        if token.content not in seen:
            seen.add(token.content)
            tokens.append(token)
    backend.add_tokens(tokens)
    source = folder / ("tokenizer_config.json" if listed is not None else "added_tokens.json")
    for token_id, token in declared:
        if backend.token_to_id(token.content) != token_id:
            raise TokenizerError(
                f"{source} gives {token.content!r} id {token_id}, but after the {len(vocab)} "
                "pieces of spm.model "
                f"it gets id {backend.token_to_id(token.content)}; number added tokens on from "
                f"{len(vocab)}, in order"
            )

    cls_token, sep_token = named["cls"].content, named["sep"].content
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[
            (cls_token, backend.token_to_id(cls_token)),
            (sep_token, backend.token_to_id(sep_token)),
        ],
    )
    specials = {role: named[role].content for role in ROLES}
    return backend, specials, {"tokenizer_class": "DebertaV2Tokenizer", **flags, "unk_id": unk_id}


def _added_tokens(folder: Path, config: dict) -> tuple[dict, list, list, dict | None]:
    """The tokens transformers adds to the pieces: the named special ones by role, the extra special
    ones, the declared ones with their ids (in id order), and the config's added_tokens_decoder."""
    # Named special tokens: tokenizer_config.json, else special_tokens_map.json (which transformers
    # reads only when the config has no `added_tokens_decoder`), else DebertaV2Tokenizer's defaults.
    listed = config.get("added_tokens_decoder")
    specials_map = (
        {} if listed is not None else read_json(folder / "special_tokens_map.json", TokenizerError)
    )
    given = {
        role: config.get(f"{role}_token", specials_map.get(f"{role}_token"))
        for role in DEBERTA_SPECIALS
    }
    named = {role: _added_token(value or DEBERTA_SPECIALS[role]) for role, value in given.items()}
    # Extra special tokens count only from the config: transformers 5 drops
    # special_tokens_map.json's list.
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extras = [_added_token(v) for v in (extras.values() if isinstance(extras, dict) else extras)]
    special_contents = {t.content for t in [*named.values(), *extras]}

    # Tokens numbered after (or among) the pieces. added_tokens.json says only "token": id;
    # transformers makes a token special, and matched on the raw text, only if the config names it:
    # a real deberta-v3's config names none, so its [MASK] is matched after normalisation
    # (lower-cased text still hits it).
    declared: list[tuple[int, AddedToken]] = []
    if listed is not None:
        for token_id, fields in listed.items():
            fields = {
                k: v for k, v in fields.items() if k in ("content", *ADDED_TOKEN_FLAGS, "special")
            }
            declared.append((int(token_id), AddedToken(**fields)))
    else:
        explicit = {_content(v) for v in given.values() if v} | {t.content for t in extras}
        for token, token_id in read_json(folder / "added_tokens.json", TokenizerError).items():
            is_special = token in explicit
            declared.append(
                (int(token_id), AddedToken(token, normalized=not is_special, special=is_special))
            )
    declared.sort(key=lambda pair: pair[0])
    for _, token in declared:
        if token.content in special_contents:
            token.special = True

    return named, extras, declared, listed


def set_deberta_pipeline(
    backend: Backend,
    *,
    do_lower_case: bool,
    split_by_punct: bool,
    add_prefix_space: bool,
    charsmap: bytes = b"",
) -> None:
    """Normaliser, pre-tokenizer and decoder as transformers' DebertaV2Tokenizer sets them from its
    flags.

    charsmap: the spm.model's precompiled normaliser (SentencePiece's own normalisation); empty for
    a vocabulary trained here, which normalises by NFC. transformers applies this to a DeBERTa
    tokenizer.json as well, keeping that file's vocabulary, added tokens, post-processor and
    precompiled table."""
    steps = [normalizers.Lowercase()] if do_lower_case else []
    if charsmap:
        steps += [
            normalizers.Precompiled(charsmap),
            normalizers.Strip(left=False, right=True),
            normalizers.Replace(Regex(r" {2,}"), " "),
        ]
    else:
        steps += [
            normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
            normalizers.NFC(),
            normalizers.Strip(left=False, right=True),
        ]
    backend.normalizer = normalizers.Sequence(steps)
    # "always" puts a "▁" before every piece of text between added tokens, "first" only at the very
    # start.
    scheme = "always" if add_prefix_space else "first"
    splits = [pre_tokenizers.Punctuation(behavior="isolated")] if split_by_punct else []
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, metaspace])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)


def precompiled_charsmap(tokenizer_json: dict) -> bytes:
    """The precompiled normaliser table in a tokenizer.json's normaliser, b"" when it has none."""
    normalizer = tokenizer_json.get("normalizer") or {}
    steps = (
        normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    )
    for step in steps:
        if step.get("type") == "Precompiled" and step.get("precompiled_charsmap"):
            return base64.b64decode(step["precompiled_charsmap"])
    return b""


def _content(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else str(value)


def _added_token(value) -> AddedToken:
    """A named special token; a dict (an AddedToken saved by transformers) keeps its matching
    flags."""
    if isinstance(value, dict):
        flags = {k: value[k] for k in ADDED_TOKEN_FLAGS if k in value}
        return AddedToken(value["content"], special=True, **flags)
    return AddedToken(str(value), special=True)
