"""Our tokenizer against `transformers.AutoTokenizer` on the same folder: the same ids, tokens and
text."""

import json
import shutil

import pytest
from conftest import FAMILIES
from transformers import AutoTokenizer

import mlm
from mlm.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is [MASK].",
    "Héllo, WÖRLD! Don't split [MASK] or <mask>; naïve café 日本語 text.",
    "  leading and   repeated   spaces\tand tabs\n",
    "",
]


def assert_same(ours: Tokenizer, ref) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        )
    assert ours.mask_token_id == ref.mask_token_id and ours.pad_token_id == ref.pad_token_id
    assert ours.cls_token_id == ref.cls_token_id and ours.sep_token_id == ref.sep_token_id
    assert ours.vocab_size == len(ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_json_folders(hf_checkpoints, family):
    assert_same(
        Tokenizer.from_pretrained(hf_checkpoints[family]),
        AutoTokenizer.from_pretrained(hf_checkpoints[family]),
    )


def test_real_tokenizer_with_padding_switched_on_in_its_file(minilm_dir):
    """all-MiniLM-L6-v2's tokenizer.json enables padding to 128; ids must still be unpadded."""
    assert_same(Tokenizer.from_pretrained(minilm_dir), AutoTokenizer.from_pretrained(minilm_dir))


@pytest.mark.parametrize("lowercase", [True, False])
def test_vocab_txt_only(hf_checkpoints, tmp_path, lowercase):
    vocab = AutoTokenizer.from_pretrained(hf_checkpoints["bert"]).get_vocab()
    (tmp_path / "vocab.txt").write_text(
        "".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": lowercase, "tokenizer_class": "BertTokenizer"})
    )
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.kind == "wordpiece"
    assert_same(ours, AutoTokenizer.from_pretrained(tmp_path))


def test_vocab_json_and_merges(hf_checkpoints, tmp_path):
    ref = AutoTokenizer.from_pretrained(hf_checkpoints["roberta"])
    model = json.loads(ref.backend_tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "RobertaTokenizer"})
    )
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.kind == "bpe" and ours.mask_token == "<mask>"
    assert_same(ours, AutoTokenizer.from_pretrained(tmp_path))


def test_word_starts_follow_the_pre_tokenizer(hf_checkpoints):
    bert = Tokenizer.from_pretrained(hf_checkpoints["bert"])
    enc = bert.encode_batch(["unbelievable parsers, ok"])[0]
    starts = bert.word_starts(enc)
    for token, start in zip(enc.tokens, starts):
        assert start == (not token.startswith("##")), (token, start)
    roberta = Tokenizer.from_pretrained(hf_checkpoints["roberta"])
    enc = roberta.encode_batch(["unbelievable parsers, ok"])[0]
    starts = roberta.word_starts(enc)
    for i, (token, start) in enumerate(zip(enc.tokens, starts)):
        expected = i == 1 or token.startswith("Ġ") or token in ("<s>", "</s>", ",")
        assert start == expected, (token, start)


def test_saved_tokenizer_loads_in_transformers(hf_checkpoints, tmp_path):
    for family in ("bert", "roberta"):
        ours = Tokenizer.from_pretrained(hf_checkpoints[family])
        ours.save(tmp_path / family)
        assert_same(ours, AutoTokenizer.from_pretrained(tmp_path / family))


def test_missing_special_token_is_reported(hf_checkpoints, tmp_path):
    folder = shutil.copytree(hf_checkpoints["bert"], tmp_path / "t")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "mask_token": "[HOLE]"}))
    with pytest.raises(mlm.TokenizerError, match=r"mask token '\[HOLE\]' is not in the vocabulary"):
        Tokenizer.from_pretrained(folder)
