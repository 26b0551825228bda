"""spm.model read without sentencepiece or protobuf: the same fields as protobuf, the same ids as
SentencePiece.

SentencePiece itself is the ground truth of the ids: the model was trained on text its own
normaliser had normalised. transformers is compared where its version tokenizes as SentencePiece
does: 4.x and 5.25 on; 5.0 to 5.24 left the spm.model's precompiled normaliser out (see mlm/spm.py).

Small unigram models are trained here on stdlib docstrings with sentencepiece itself (a few
vocabulary sizes, pieces within and across words, user-defined and byte pieces, DeBERTa's and
SentencePiece's own special-piece layouts) and put in DeBERTa-v3-like folders: spm.model,
tokenizer_config.json, added_tokens.json with [MASK] numbered after the pieces, config.json naming
"deberta-v2"."""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stdlib_docstrings

sentencepiece = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")
transformers = pytest.importorskip("transformers")
_major, _minor = (int(part) for part in transformers.__version__.split(".")[:2])
# transformers 5.0-5.24 built DeBERTa's normaliser without the spm.model's table: other ids on
# awkward text.
FOLLOWS_SENTENCEPIECE = _major != 5 or _minor >= 25
as_transformers = pytest.mark.skipif(
    not FOLLOWS_SENTENCEPIECE,
    reason=f"transformers {transformers.__version__} leaves out SentencePiece's normaliser "
    "(5.0-5.24); "
    "test_ids_match_sentencepiece holds the ids",
)

from sentencepiece import sentencepiece_model_pb2 as model_pb2  # noqa: E402
from tokenizers import Regex, normalizers  # noqa: E402
from tokenizers import Tokenizer as Backend  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from mlm.errors import TokenizerError  # noqa: E402
from mlm.spm import (  # noqa: E402
    SAVE_CONFIG_KEYS,
    build_from_spm,
    parse_spm,
    precompiled_charsmap,
    read_spm,
    set_deberta_pipeline,
)

DEBERTA_IDS = dict(
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    pad_piece="[PAD]",
    bos_piece="[CLS]",
    eos_piece="[SEP]",
    unk_piece="[UNK]",
)
MODELS = {
    # deberta-v3's layout: [PAD] [CLS] [SEP] [UNK], then the pieces
    "v3": dict(vocab_size=1000, **DEBERTA_IDS),
    "small": dict(vocab_size=300, **DEBERTA_IDS),
    # pieces may hold "▁" inside
    "across_words": dict(vocab_size=500, split_by_whitespace=False, **DEBERTA_IDS),
    "symbols": dict(
        vocab_size=400, user_defined_symbols=["<url>", "@@"], byte_fallback=True, **DEBERTA_IDS
    ),
    # SentencePiece's own layout: <unk> <s> </s>, no [CLS] [SEP] [PAD] [UNK] pieces
    "plain": dict(vocab_size=400),
}
# folder -> (model, tokenizer_config.json, added_tokens.json after the pieces,
# special_tokens_map.json)
FOLDERS = {
    "deberta-v3": ("v3", {"do_lower_case": False, "vocab_type": "spm"}, ["[MASK]"], None),
    "lower": ("v3", {"do_lower_case": True, "vocab_type": "spm"}, ["[MASK]"], None),
    "punct": ("small", {"split_by_punct": True}, ["[MASK]"], None),
    # Naming [MASK] in the config makes transformers match it on the raw text instead of the
    # normalised one.
    "lower-punct-named": (
        "across_words",
        {"do_lower_case": True, "split_by_punct": True, "mask_token": "[MASK]"},
        ["[MASK]"],
        None,
    ),
    "no-added-tokens-file": ("across_words", {}, [], None),
    "specials-map": (
        "v3",
        {"do_lower_case": True},
        ["[MASK]"],
        {"mask_token": "[MASK]", "cls_token": "[CLS]"},
    ),
    "extra-specials": (
        "small",
        {"additional_special_tokens": ["[E1]", "[E2]"]},
        ["[MASK]", "[E1]"],
        None,
    ),
    "symbols": ("symbols", {"do_lower_case": False}, ["[MASK]"], None),
    "plain": ("plain", {}, ["[MASK]"], None),
}

TEXTS = [
    "",
    " ",
    "  \t\n  ",
    "The capital of France is [MASK].",
    "[MASK]",
    "x[MASK]y and two [MASK] [MASK] masks",
    "lower-cased [mask] and [Mask] masks",
    "literal [CLS] [SEP] [PAD] [UNK] [E1] [E2] <unk> <s> </s> <url>@@x",
    "Héllo wörld, naïve café; cafe\u0301 with a combining accent",
    "“curly” ‘quotes’ — dashes… «guillemets»",
    "runs   of    spaces",
    "tabs\tand\t\ttabs",
    "new\nlines\n\nand\r\nCRLF\r",
    "  leading and trailing  ",
    "digits 0123456789 3.14159 1,000,000 2024-01-31",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧",
    "full-width ＡＢＣ１２３, ligature ﬁ, circled ①, superscript ²",
    "nbsp\u00a0here, zero\u200bwidth, ideographic\u3000space",
    "a ▁ literal ▁▁ metaspace",
    "UPPER CASE and MiXeD case",
    "don't won't it's (parens) [brackets] {braces} a/b a-b a_b e.g.",
    "… ½ ™ ﬁ Ⅳ ㎏ ① ²",  # what NFKC folds: ellipsis, fractions, signs, ligatures, numerals, units
    "ＦＵＬＬ－ＷＩＤＴＨ ｔｅｘｔ，ｗｉｔｈ　ｓｐａｃｅｓ",
    "combining: e\u0301 a\u0308 n\u0303, precomposed: é ä ñ",
] + stdlib_docstrings(40)[::2]


def train(**options) -> bytes:
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_docstrings()),
        model_writer=out,
        minloglevel=2,
        num_threads=1,
        **options,
    )
    return out.getvalue()


def proto(data: bytes):
    model = model_pb2.ModelProto()
    model.ParseFromString(data)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {name: train(**options) for name, options in MODELS.items()}


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory) -> dict[str, Path]:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("spm")
    out = {}
    for name, (model, config, added, specials_map) in FOLDERS.items():
        folder = root / name
        folder.mkdir()
        (folder / "spm.model").write_bytes(models[model])
        (folder / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        n = len(proto(models[model]).pieces)
        if added:
            (folder / "added_tokens.json").write_text(
                json.dumps({token: n + i for i, token in enumerate(added)})
            )
        if specials_map is not None:
            (folder / "special_tokens_map.json").write_text(json.dumps(specials_map))
        out[name] = folder
    return out


# ------------------------------------------------------------------------------------- the reader
@pytest.mark.parametrize("name", MODELS)
def test_reader_matches_protobuf(models, name):
    ref, ours = proto(models[name]), parse_spm(models[name])
    assert ours.pieces == [(p.piece, p.score, p.type) for p in ref.pieces]
    assert (ours.model_type, ours.unk_id, ours.byte_fallback) == (
        ref.trainer_spec.model_type,
        ref.trainer_spec.unk_id,
        ref.trainer_spec.byte_fallback,
    )
    spec = ref.normalizer_spec
    assert (ours.normalizer_name, ours.precompiled_charsmap) == (
        spec.name,
        spec.precompiled_charsmap,
    )
    assert (ours.add_dummy_prefix, ours.remove_extra_whitespaces, ours.escape_whitespaces) == (
        spec.add_dummy_prefix,
        spec.remove_extra_whitespaces,
        spec.escape_whitespaces,
    )
    assert ours.normalizer_name == "nmt_nfkc" and len(ours.precompiled_charsmap) > 1000


def test_reader_skips_unknown_fields_and_merges_repeats_as_protobuf_does(models):
    """Unknown fields of every wire type, at the top and inside a piece; a second trainer_spec
    merges in."""

    def key(number, wire):  # a varint of one or two bytes
        k = number << 3 | wire
        return bytes([k]) if k < 0x80 else bytes([k & 0x7F | 0x80, k >> 7])

    def nested(number, message):
        return key(number, 2) + bytes([len(message)]) + message

    piece = model_pb2.ModelProto.SentencePiece(
        piece="▁extra", score=-7.5, type=1
    ).SerializeToString()
    piece += (
        key(9, 0)
        + b"\x96\x01"
        + key(10, 1)
        + bytes(8)
        + key(11, 5)
        + bytes(4)
        + key(12, 2)
        + b"\x02ab"
    )
    # pad_id -1 takes ten bytes
    trainer = model_pb2.TrainerSpec(unk_id=2, pad_id=-1).SerializeToString()
    unknown = (
        key(99, 0)
        + b"\xff\xff\x03"
        + key(98, 1)
        + bytes(8)
        + key(97, 5)
        + bytes(4)
        + key(96, 2)
        + b"\x03xyz"
    )
    data = models["small"] + unknown + nested(1, piece) + nested(2, trainer)
    ref, ours = proto(data), parse_spm(data)
    assert ours.pieces == [(p.piece, p.score, p.type) for p in ref.pieces]
    assert ours.pieces[-1] == ("▁extra", -7.5, 1)
    assert ours.unk_id == ref.trainer_spec.unk_id == 2
    assert ours.model_type == ref.trainer_spec.model_type == 1


CORRUPT = {  # how the good bytes of an spm.model go bad
    "missing": None,
    "empty": lambda data: b"",
    "first-bytes": lambda data: data[:3],
    "cut-in-half": lambda data: data[: len(data) // 2],
    "last-byte-missing": lambda data: data[:-1],
    "json": lambda data: b'{"model": "not protobuf"}',
    "text": lambda data: b"not a model\n",
    "bpe": lambda data: train(vocab_size=300, model_type="bpe"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_a_bad_spm_model_is_a_one_line_error(models, tmp_path, case):
    if CORRUPT[case] is not None:
        (tmp_path / "spm.model").write_bytes(CORRUPT[case](models["small"]))
    with pytest.raises(TokenizerError) as e:
        build_from_spm(tmp_path)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "spm.model") in message, message
    assert (
        "unigram"
        if case == "bpe"
        else "spm.model into the folder"
        if case == "missing"
        else "again"
    ) in message


def test_an_added_token_numbered_out_of_place_is_an_error(folders, tmp_path):
    folder = tmp_path / "gap"
    folder.mkdir()
    (folder / "spm.model").write_bytes((folders["deberta-v3"] / "spm.model").read_bytes())
    (folder / "added_tokens.json").write_text(json.dumps({"[MASK]": 5000}))
    with pytest.raises(TokenizerError, match=r"added_tokens.json gives '\[MASK\]' id 5000"):
        build_from_spm(folder)


@as_transformers
# ------------------------------------------------------------------------------ ids as transformers
@pytest.mark.parametrize("name", FOLDERS)
def test_ids_and_text_match_transformers(folders, name):
    backend, specials, _ = build_from_spm(folders[name])
    ref = AutoTokenizer.from_pretrained(folders[name])
    assert type(ref).__name__ == "DebertaV2Tokenizer"
    for text, second in zip(TEXTS, TEXTS[1:] + TEXTS[:1]):
        ours = backend.encode(text)
        assert ours.ids == ref(text)["input_ids"], text
        second = second or "b"  # transformers takes an empty second text for no pair at all
        pair, ref_pair = backend.encode(text, second), ref(text, second)
        assert pair.ids == ref_pair["input_ids"] and pair.type_ids == ref_pair["token_type_ids"], (
            text,
            second,
        )
        for ids in (ours.ids, pair.ids):
            for skip in (False, True):
                assert backend.decode(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip
                )
    for role, token in specials.items():
        assert token == getattr(ref, f"{role}_token")
        assert backend.token_to_id(token) == getattr(ref, f"{role}_token_id")
    assert backend.get_vocab_size(with_added_tokens=True) == len(ref)


@as_transformers
@pytest.mark.parametrize("name", FOLDERS)
def test_the_whole_pipeline_is_transformers(folders, name):
    """Beyond the texts tried: normaliser, pre-tokenizer, model, added tokens, post-processor,
    decoder."""
    backend, _, _ = build_from_spm(folders[name])
    ref = AutoTokenizer.from_pretrained(folders[name]).backend_tokenizer
    assert json.loads(backend.to_str()) == json.loads(ref.to_str())


@pytest.mark.parametrize("name", FOLDERS)
def test_word_ids_start_a_word_at_each_metaspace(folders, name):
    """Whole-word masking reads word starts off `word_ids`; with Metaspace they are the tokens that
    begin with "▁", plus added tokens ([MASK], user-defined pieces) and the [CLS]/[SEP] the
    post-processor adds."""
    backend, _, _ = build_from_spm(folders[name])
    # An added token found in the text shows as its content, normalised if it is matched on
    # normalised text (a lower-cased text shows [MASK] as "[mask]"); [UNK] standing for unknown
    # characters shows those.
    added = {
        (i, backend.normalizer.normalize_str(t.content) if t.normalized else t.content)
        for i, t in backend.get_added_tokens_decoder().items()
    }
    for text in TEXTS:
        encoding = backend.encode(text)
        starts, previous = [], None
        for word in encoding.word_ids:
            starts.append(word is None or word != previous)
            previous = word
        marked = [
            w is None or tok.startswith("▁") or (i, tok) in added
            for i, tok, w in zip(encoding.ids, encoding.tokens, encoding.word_ids)
        ]
        assert starts == marked, (text, encoding.tokens)


@as_transformers
# --------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("name", ["deberta-v3", "lower-punct-named", "extra-specials", "plain"])
def test_saved_files_load_in_transformers(folders, tmp_path, name):
    """What `Tokenizer.save` writes (tokenizer.json, tokenizer_config.json with the returned flags
    and the role tokens, no spm.model) loads in transformers as the same tokenizer."""
    backend, specials, extra = build_from_spm(folders[name])
    assert set(extra) == set(SAVE_CONFIG_KEYS)
    (tmp_path / "tokenizer.json").write_text(backend.to_str(pretty=True))
    config = {
        "model_max_length": 512,
        **extra,
        **{f"{role}_token": token for role, token in specials.items()},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({f"{r}_token": t for r, t in specials.items()})
    )
    ref, saved = (
        AutoTokenizer.from_pretrained(folders[name]),
        AutoTokenizer.from_pretrained(tmp_path),
    )
    assert type(saved).__name__ == "DebertaV2Tokenizer"
    for text in TEXTS:
        assert saved(text)["input_ids"] == ref(text)["input_ids"] == backend.encode(text).ids, text
    assert json.loads(saved.backend_tokenizer.to_str()) == json.loads(backend.to_str())


@as_transformers
def test_a_transformers_4_file_tokenizes_as_its_spm_model(folders, tmp_path):
    """A tokenizer.json written by transformers 4 (its DebertaV2Converter's normaliser) is rebuilt
    from the flags and the file's precompiled table, as transformers 5.25 does: the ids of the
    spm.model folder."""
    backend, _, _ = build_from_spm(folders["lower-punct-named"])
    charsmap = read_spm(folders["lower-punct-named"] / "spm.model").precompiled_charsmap
    backend.normalizer = normalizers.Sequence(
        [  # transformers 4's DebertaV2Converter
            normalizers.Lowercase(),
            normalizers.Strip(),
            normalizers.Precompiled(charsmap),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    flags = {"do_lower_case": True, "split_by_punct": True, "add_prefix_space": True}
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "DebertaV2Tokenizer", **flags})
    )
    ref, spm_folder = (
        AutoTokenizer.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(folders["lower-punct-named"]),
    )
    ours = Backend.from_file(str(tmp_path / "tokenizer.json"))
    set_deberta_pipeline(ours, **flags, charsmap=precompiled_charsmap(json.loads(ours.to_str())))
    for text in TEXTS:
        assert ours.encode(text).ids == ref(text)["input_ids"] == spm_folder(text)["input_ids"], (
            text
        )


# ------------------------------------------------------------------------------ ids as
# SentencePiece SentencePiece knows nothing of the tokens added after its pieces ([MASK]), nor of
# transformers' flags (lower- casing, punctuation splits): it is asked about the folders without
# those flags, on the texts without added tokens. Two choices of transformers that mlm keeps, where
# SentencePiece differs: a model trained with split_by_whitespace=False (pieces across words,
# "across_words") is still split at every space (Metaspace), and byte_fallback is not used (an
# unknown character is [UNK], not its UTF-8 bytes). No DeBERTa release has either.
AS_SPM = ["deberta-v3", "symbols", "plain"]


@pytest.mark.parametrize("name", AS_SPM)
def test_ids_match_sentencepiece(folders, name):
    backend, _, _ = build_from_spm(folders[name])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folders[name] / "spm.model"))
    added = [t.content for t in backend.get_added_tokens_decoder().values()]
    texts = [text for text in TEXTS if not any(token in text for token in added)]
    compared = 0
    for text in texts:
        expected = sp.encode(text)
        if any(sp.IsByte(i) for i in expected):
            continue  # byte_fallback: see above
        assert backend.encode(text, add_special_tokens=False).ids == expected, text
        compared += 1
    assert compared >= 30, compared


def test_sentencepiece_normalisation_folds_what_nfkc_folds(folders):
    """The charsmap at work, by the pieces themselves: "…" is three dots, full-width letters are
    ASCII."""
    backend, _, _ = build_from_spm(folders["deberta-v3"])
    for awkward, plain in [
        ("dashes…", "dashes..."),
        ("ＡＢＣ１２３", "ABC123"),
        ("ﬁne", "fine"),
        ("x\u3000y", "x y"),
    ]:
        assert backend.encode(awkward).ids == backend.encode(plain).ids, awkward


# ---------------------------------------------------------------------------- run-time dependencies
def test_no_sentencepiece_protobuf_or_transformers_at_run_time(folders):
    code = f"""
import sys
BLOCKED = ("sentencepiece", "google", "transformers")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from mlm.spm import build_from_spm
backend, specials, _ = build_from_spm({str(folders["deberta-v3"])!r})
ids = backend.encode("Hello [MASK]").ids
assert ids[-2:] == [backend.token_to_id("[MASK]"), backend.token_to_id("[SEP]")]
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@as_transformers
@pytest.mark.parametrize("name", ["deberta-v3", "lower-punct-named", "plain"])
def test_mlm_tokenizer_loads_spm_folders_and_saves_what_transformers_reads(folders, tmp_path, name):
    """Through mlm's own Tokenizer: the same ids as AutoTokenizer on the spm.model folder, and a
    saved folder that both mlm and transformers load back to the same ids."""
    from mlm.tokenizer import Tokenizer

    ours, ref = (
        Tokenizer.from_pretrained(folders[name]),
        AutoTokenizer.from_pretrained(folders[name]),
    )
    assert (
        ours.kind == "unigram"
        and ours.mask_token_id == ref.mask_token_id
        and ours.vocab_size == len(ref)
    )
    ours.save(tmp_path)
    again, saved_ref = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == again.encode(text) == saved_ref(text)["input_ids"] == ids, text
