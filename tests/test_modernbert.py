"""ModernBERT against transformers' ModernBertForMaskedLM, on tiny random checkpoints (conftest.py).

The family-wide tests (test_model.py, test_fill_mask.py, test_infer_eval.py) already hold its
logits, loss, fill-mask and --eval to transformers'. Here: both config.json forms, the biases each
way, sequences many windows long, saving, the tokenizer, local attention in O(T x window), packing
with documents, RoPE in bf16, the initialisation, and training from scratch and from a checkpoint.
"""

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    EXTRA_ROWS,
    MODERNBERT_SPECIALS,
    RUN_ENV,
    from_scratch,
    make_hf_checkpoint,
    stdlib_docstrings,
)
from safetensors.torch import load_file
from test_fill_mask import assert_same_result
from torch.testing import assert_close
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

import mlm
from mlm.errors import UnsupportedModelError
from mlm.hf import config_from_hf, load_model
from mlm.model import MaskedLM, ModelConfig
from mlm.model.modernbert import rotary
from mlm.pipeline import Masking

ROOT = Path(__file__).resolve().parents[1]


def batch(vocab: int, pad: int, B: int = 3, T: int = 41, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 30:] = 0
    attention[2, 7:] = 0
    ids[attention == 0] = pad
    return ids, attention


def assert_logits_match(folder: Path, T: int = 41, atol: float = 2e-5):
    ref = AutoModelForMaskedLM.from_pretrained(folder).eval()
    ours, tokenizer = mlm.load_pretrained(folder)
    ids, attention = batch(tokenizer.vocab_size, tokenizer.pad_token_id, T=T)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=attention).logits
        got = ours(ids, attention)
        alone = ours(ids[2:, :7])
    real = attention.bool()
    assert got.shape == expected.shape
    assert_close(got[real], expected[real], atol=atol, rtol=1e-4)
    assert_close(alone[0], got[2, :7], atol=1e-5, rtol=1e-5)  # padding changes nothing real
    return ours


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("modernbert")
    variants = {
        "default": {},
        # every bias on but the decoder's: the other way round from the released checkpoints
        "biases": dict(
            norm_bias=True,
            attention_bias=True,
            mlp_bias=True,
            classifier_bias=True,
            decoder_bias=False,
        ),
        # four layers, global every third, and other RoPE bases and activations
        "every-3": dict(
            num_hidden_layers=4,
            global_attn_every_n_layers=3,
            global_rope_theta=5e5,
            local_rope_theta=1234.0,
            hidden_activation="gelu_pytorch_tanh",
            classifier_activation="silu",
        ),
    }
    return {
        name: make_hf_checkpoint("modernbert", root / name, seed=i, **kw)
        for i, (name, kw) in enumerate(variants.items())
    }


# ------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("variant", ["default", "biases", "every-3"])
def test_logits_equal_transformers_over_many_windows(folders, variant):
    """41 tokens and a window of +-4: the local layers cut most pairs; with and without padding."""
    model = assert_logits_match(folders[variant])
    cfg = model.config
    assert cfg.family == "modernbert" and cfg.local_attention == 8
    if variant == "biases":
        assert model.head.decoder.bias is None and model.encoder.blocks[1].attn.qkv.bias is not None
    if variant == "every-3":
        assert cfg.layer_types == ("global", "local", "local", "global")


def test_the_released_checkpoints_legacy_config_loads_the_same(folders, tmp_path):
    """ModernBERT-base's config.json has only global_attn_every_n_layers, global_rope_theta and
    local_rope_theta (and keys that do not change the MLM math); transformers 5 writes layer_types
    and rope_parameters. Both read the same, by us and by transformers."""
    folder = tmp_path / "legacy"
    shutil.copytree(folders["every-3"], folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        config.pop(key)
    config.update(
        global_attn_every_n_layers=3,
        global_rope_theta=5e5,
        local_rope_theta=1234.0,
        sparse_prediction=False,
        sparse_pred_ignore_index=-100,
        repad_logits_with_grad=True,
        reference_compile=True,
        deterministic_flash_attn=False,
        classifier_pooling="mean",
        classifier_dropout=0.1,
    )
    (folder / "config.json").write_text(json.dumps(config))
    ours = assert_logits_match(folder)
    assert ours.config == load_model(folders["every-3"]).config


def test_a_rope_type_other_than_the_default_is_refused(folders):
    config = json.loads((folders["default"] / "config.json").read_text())
    config["rope_parameters"]["sliding_attention"]["rope_type"] = "yarn"
    with pytest.raises(UnsupportedModelError, match="rope_type 'yarn' .* is not supported") as e:
        config_from_hf(config)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ saving
def test_saved_folders_load_in_transformers_with_no_missing_keys_and_the_same_logits(
    folders, tmp_path
):
    for name in ("default", "biases"):
        model, tokenizer = mlm.load_pretrained(folders[name])
        mlm.save_pretrained(model, tokenizer, tmp_path / name)
        ref, info = AutoModelForMaskedLM.from_pretrained(tmp_path / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        saved = json.loads((tmp_path / name / "config.json").read_text())
        # transformers 4.48+ reads the legacy keys, 5 the new ones: both are written, and agree.
        assert saved["global_attn_every_n_layers"] == 2 and saved["local_attention"] == 8
        assert saved["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]
        assert (
            saved["global_rope_theta"] == saved["rope_parameters"]["full_attention"]["rope_theta"]
        )
        # the special-token ids are the tokenizer's, not transformers' defaults (50281-50283)
        assert saved["pad_token_id"] == tokenizer.pad_token_id
        assert (saved["cls_token_id"], saved["bos_token_id"]) == (tokenizer.cls_token_id,) * 2
        assert (saved["sep_token_id"], saved["eos_token_id"]) == (tokenizer.sep_token_id,) * 2
        assert_logits_match(tmp_path / name)
        assert load_model(tmp_path / name).config == model.config


def test_a_layer_pattern_that_is_not_periodic_says_what_transformers_4_cannot_read(
    folders, tmp_path, caplog
):
    model, tokenizer = mlm.load_pretrained(folders["every-3"])
    model.config.layer_types = ("global", "global", "local", "global")
    with caplog.at_level("WARNING", logger="mlm"):
        mlm.save_pretrained(model, tokenizer, tmp_path / "odd")
    assert any("transformers 4 cannot read" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "odd" / "config.json").read_text())
    assert "global_attn_every_n_layers" not in saved
    ref = AutoModelForMaskedLM.from_pretrained(tmp_path / "odd")
    assert ref.config.layer_types == [
        "full_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ]


# --------------------------------------------------------------------------------- the tokenizer
AWKWARD = [
    "Return a [MASK] of the items.",
    "a[MASK]b",
    "two masks [MASK] and [MASK].",
    "space after [MASK] ",
    " leading space and  double  spaces",
    "tabs\tand\nnew lines",
    "Héllo wörld, naïve café; cafe\u0301 … ½ ™ ＡＢＣ",
    "emoji 😀👍🏽 and 日本語",
    "[CLS] [SEP] [PAD] [UNK] literal specials",
]


def test_tokens_and_fill_mask_equal_transformers(folders):
    folder = folders["default"]
    ours, ref = mlm.Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    for text in AWKWARD:
        assert ours.encode(text) == ref(text)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        )
    # The special tokens are after the pieces, and the embedding table has rows beyond them.
    model = load_model(folder)
    assert [
        ours.convert_ids_to_tokens([i])[0] for i in range(ours.vocab_size - 5, ours.vocab_size)
    ] == MODERNBERT_SPECIALS
    assert model.config.vocab_size == ours.vocab_size + EXTRA_ROWS
    fill = pipeline("fill-mask", model=str(folder), top_k=4)
    for text in ("Return a [MASK] of the items.", "two masks [MASK] and [MASK]."):
        expected = fill(text)
        assert_same_result(mlm.fill_mask(model, ours, text, top_k=4), expected)
    # token_str keeps the word's leading space, as the pipeline has it: ' x'
    assert any(c["token_str"].startswith(" ") for c in fill("Return a [MASK] of the items."))


def test_random_replacements_come_from_real_tokens_not_unused_rows(folders):
    """80/10/10's random ids are drawn from the tokenizer's tokens, never from the embedding rows
    past them."""
    from mlm.config import TrainConfig
    from mlm.masking import mask_tokens

    tokenizer = mlm.Tokenizer.from_pretrained(folders["default"])
    masking = Masking.of(TrainConfig(), tokenizer)
    assert (
        masking.vocab_size
        == tokenizer.vocab_size
        < load_model(folders["default"]).config.vocab_size
    )
    ids = torch.randint(0, 500, (64, 128))
    settings = {**masking.kwargs(), "mask_replace_prob": 0.0, "random_replace_prob": 1.0}
    masked, labels = mask_tokens(ids, row_seeds=torch.arange(64), **settings)
    assert (masked < tokenizer.vocab_size).all() and (labels != -100).sum() > 500


# ------------------------------------------------------------------------------ local attention
def spy_attention(model: MaskedLM) -> list:
    """Every SDPA call of the model's attention: (global?, q shape, mask shape or None)."""
    calls = []
    for block in model.encoder.blocks:
        real = block.attn.sdpa

        def recording(q, k, v, attn_mask=None, _real=real, _global=block.attn.is_global, **kw):
            calls.append(
                (_global, tuple(q.shape), None if attn_mask is None else tuple(attn_mask.shape))
            )
            return _real(q, k, v, attn_mask=attn_mask, **kw)

        block.attn.sdpa = recording
    return calls


@pytest.mark.parametrize("T", [1024, 8192])
def test_local_layers_never_build_a_t_by_t_matrix(T):
    """Local layers score chunks of w queries against 3w keys; global ones go to SDPA whole, with no
    (T, T) mask (padding is a (B, 1, 1, T) one), so its fused kernels run."""
    cfg = ModelConfig(
        family="modernbert",
        vocab_size=64,
        hidden_size=16,
        num_layers=3,
        num_heads=2,
        intermediate_size=16,
        global_attn_every_n_layers=3,
        local_attention=128,
        max_position_embeddings=8192,
        type_vocab_size=0,
    )
    model = MaskedLM(cfg).eval()
    calls = spy_attention(model)
    ids = torch.randint(5, 64, (1, T))
    attention = torch.ones_like(ids)
    attention[0, -3:] = 0
    with torch.no_grad():
        model.encode(ids, attention)
    chunks = math.ceil(T / 64)
    assert calls[0] == (True, (1, 2, T, 8), (1, 1, 1, T))
    assert calls[1] == calls[2] == (False, (chunks, 2, 64, 8), (chunks, 1, 64, 192))


def test_local_attention_is_the_banded_dense_attention():
    """The chunked computation equals softmax over the band |i - j| <= w written out densely."""
    from mlm.model import modernbert

    torch.manual_seed(0)
    B, H, T, D, w = 2, 3, 37, 4, 5
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    segments = torch.zeros(B, T, dtype=torch.long)
    segments[0, 20:] = 1  # two documents in row 0
    segments[1, 30:] = -1  # padding at the end of row 1
    attn = modernbert.Attention(
        ModelConfig(
            family="modernbert", hidden_size=H * D, num_heads=H, local_attention=2 * w, num_layers=1
        ),
        is_global=False,
    )
    got = attn.attend_local(q, k, v, modernbert.local_window(segments, w), 0.0)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = ((i - j).abs() <= w) & (segments[:, None, :, None] == segments[:, None, None, :])
    allowed = (allowed & (segments[:, None, None, :] >= 0)) | (i == j)
    expected = ((q @ k.transpose(-1, -2) / D**0.5).masked_fill(~allowed, float("-inf"))).softmax(
        -1
    ) @ v
    assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_memory_at_8192_tokens_stays_far_below_one_score_matrix(tmp_path):
    """One forward at 8,192 tokens, in a process of its own: the peak resident memory it adds is far
    below what a single fp32 (T, T) score matrix per head of one layer would take (8192^2 x 2 x 4 B
    = 512 MiB)."""
    code = """
import resource, torch
from mlm.model import MaskedLM, ModelConfig
torch.manual_seed(0)
cfg = ModelConfig(family="modernbert", vocab_size=64, hidden_size=16, num_layers=3, num_heads=2,
                  intermediate_size=16, local_attention=128, max_position_embeddings=8192)
model = MaskedLM(cfg).eval()
ids = torch.randint(5, 64, (1, 8192))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    model.encode(ids, torch.ones_like(ids))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=RUN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 128 * 2**20, done.stdout


# ------------------------------------------------------------------------------ packing documents
@pytest.mark.parametrize("varlen", [False, True], ids=["dense-mask", "varlen"])
def test_documents_in_a_packed_block_attend_as_if_alone(varlen):
    """Window and document boundaries together: a document in a packed block gives what it gives
    alone (RoPE is relative, so where it starts does not matter), with the dense (T, T) mask or
    varlen."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        family="modernbert",
        vocab_size=50,
        hidden_size=24,
        num_layers=3,
        num_heads=2,
        intermediate_size=20,
        global_attn_every_n_layers=2,
        local_attention=6,
        max_position_embeddings=64,
        type_vocab_size=0,
        varlen=varlen,
    )
    model = MaskedLM(cfg).eval()
    ids = torch.randint(5, 50, (2, 23))
    doc_ids = torch.tensor([[0] * 9 + [1] * 12 + [-1] * 2, [0] * 23])
    with torch.no_grad():
        packed = model.encode(ids, doc_ids >= 0, doc_ids=doc_ids)
        for row, doc in ((0, 0), (0, 1), (1, 0)):
            at = doc_ids[row] == doc
            assert_close(
                packed[row, at], model.encode(ids[row : row + 1, at])[0], atol=1e-5, rtol=1e-5
            )


def test_varlen_gives_the_dense_document_mask_and_its_gradients():
    results = []
    ids = torch.randint(5, 50, (2, 23), generator=torch.Generator().manual_seed(1))
    doc_ids = torch.tensor([[0] * 9 + [1] * 12 + [-1] * 2, [0] * 17 + [1] * 6])
    labels = torch.where(
        torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3, ids, -100
    )
    labels[doc_ids < 0] = -100
    for varlen in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(
            family="modernbert",
            vocab_size=50,
            hidden_size=24,
            num_layers=3,
            num_heads=2,
            intermediate_size=20,
            global_attn_every_n_layers=2,
            local_attention=6,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            max_position_embeddings=64,
            type_vocab_size=0,
            varlen=varlen,
        )
        model = MaskedLM(cfg)
        loss = model(ids, doc_ids >= 0, labels=labels, doc_ids=doc_ids)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (dense, g_dense), (var, g_var) = results
    assert_close(var, dense, atol=1e-6, rtol=1e-6)
    for name in g_dense:
        assert_close(g_var[name], g_dense[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------- RoPE, init
def test_rope_angles_are_fp32_in_a_bf16_model():
    """At position 8,000 a bf16 product of positions and frequencies is off by up to 32 radians; the
    angles are computed in fp32 and only cos and sin are cast."""
    positions = torch.arange(8192)
    cos, sin = rotary(positions, 64, 160000.0, torch.bfloat16)
    exact = positions.double()[:, None] / 160000.0 ** (torch.arange(0, 64, 2).double() / 64)
    exact = torch.cat([exact, exact], -1)
    assert cos.dtype == torch.bfloat16
    assert (cos.double() - exact.cos()).abs().max() < 1e-2 and (
        sin.double() - exact.sin()
    ).abs().max() < 1e-2
    naive = (
        positions.bfloat16()[:, None] * (1.0 / 160000.0 ** (torch.arange(0, 64, 2) / 64)).bfloat16()
    )
    assert (naive.double().cos() - exact[:, :32].cos()).abs().max() > 0.5  # what fp32 avoids


def test_initialisation_is_transformers_truncated_normal():
    torch.manual_seed(0)
    cfg = ModelConfig(
        family="modernbert",
        vocab_size=1000,
        hidden_size=64,
        num_layers=8,
        num_heads=4,
        intermediate_size=96,
        type_vocab_size=0,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        classifier_bias=False,
    )
    model = MaskedLM(cfg)
    std, out = 0.02, 0.02 / math.sqrt(2 * 8)
    weights = {
        "word": (model.encoder.embeddings.word.weight, std),
        "qkv": (model.encoder.blocks[3].attn.qkv.weight, std),
        "wo": (model.encoder.blocks[3].attn.proj.weight, out),
        "w2": (model.encoder.blocks[3].fc2.weight, out),
        "head": (model.head.dense.weight, out),
    }
    for name, (w, s) in weights.items():
        assert w.abs().max() <= 2 * s + 1e-7, name  # truncated at +-2 std
        # a normal truncated at +-2 sigma has a standard deviation of 0.88 sigma
        assert abs(w.std().item() / s - 0.88) < 0.05, (name, w.std().item() / s)
    assert model.encoder.blocks[0].attn_norm.__class__.__name__ == "Identity"
    assert model.head.decoder.bias is not None and torch.all(model.head.decoder.bias == 0)


# ------------------------------------------------------------------------------------- training
def run_train(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *from_scratch(args)]
    return subprocess.run(
        cmd, cwd=ROOT, env=RUN_ENV, capture_output=True, text=True, timeout=timeout
    )


SMALL = "--hidden-size 32 --num-layers 3 --num-heads 2 --intermediate-size 24 --local-attention 16"
SMALL += " --block-size 48 --global-batch-size 8 --eval-blocks 8 --log-every 5 --lr 3e-3 --warmup 2"


@pytest.mark.slow
def test_from_scratch_trains_its_own_tokenizer_and_exports_what_transformers_reads(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(stdlib_docstrings()))
    out = tmp_path / "run"
    done = run_train(
        "--family",
        "modernbert",
        "--data",
        corpus,
        "--vocab-size",
        700,
        *SMALL.split(),
        "--max-steps",
        20,
        "--schedule",
        "wsd",
        "--decay",
        5,
        "--mlm-probability",
        0.3,
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    evals = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    # ModernBERT's tokenizer layout: byte-level BPE pieces, then [UNK] [CLS] [SEP] [PAD] [MASK]
    tokenizer = mlm.Tokenizer.from_pretrained(out / "final")
    assert tokenizer.vocab_size == 700
    assert tokenizer.convert_ids_to_tokens(range(695, 700)) == MODERNBERT_SPECIALS
    ref_tokenizer = AutoTokenizer.from_pretrained(out / "final")
    for text in AWKWARD:
        assert tokenizer.encode(text) == ref_tokenizer(text)["input_ids"], text
    assert_logits_match(out / "final", T=48)
    config = json.loads((out / "final" / "config.json").read_text())
    assert (config["pad_token_id"], config["cls_token_id"], config["sep_token_id"]) == (
        698,
        696,
        697,
    )
    assert not (config["norm_bias"] or config["attention_bias"] or config["mlp_bias"])


@pytest.mark.slow
def test_continued_pretraining_from_a_modernbert_folder(folders, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(stdlib_docstrings()))
    out = tmp_path / "run"
    done = run_train(
        "--init",
        folders["default"],
        "--data",
        corpus,
        "--block-size",
        48,
        "--max-steps",
        12,
        "--global-batch-size",
        8,
        "--eval-blocks",
        8,
        "--lr",
        1e-3,
        "--warmup",
        2,
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = (
        load_file(folders["default"] / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert_logits_match(out / "final", T=48)


def test_the_modernbert_preset_means_what_the_paper_means():
    """Decoupled weight decay 1e-5 (scaled by the schedule only): AdamW's lr x weight_decay at the
    peak is 1e-5 whatever the lr; warmup, constant, then 1 - sqrt over the last 3%."""
    from mlm.config import parse_config

    sys.path.insert(0, str(ROOT))
    import train

    for lr in ("8e-4", "2e-4"):
        cfg = parse_config(["--preset", "modernbert", "--lr", lr])
        assert math.isclose(cfg.lr * cfg.weight_decay, 1e-5)
    assert (cfg.mlm_probability, cfg.betas, cfg.adam_eps, cfg.block_size) == (
        0.3,
        (0.9, 0.98),
        1e-6,
        1024,
    )
    assert (
        cfg.model["family"] == "modernbert" and cfg.tokenizer_kind == "bpe" and cfg.dropout == 0.0
    )
    factors = [train.lr_factor(s, cfg) for s in range(cfg.max_steps)]
    start = cfg.max_steps - round(0.03 * cfg.max_steps)
    assert factors[0] == 1 / 636 and factors[635] == 1.0 and factors[start - 1] == 1.0
    # 1 - sqrt(1/4)
    assert math.isclose(factors[start + (cfg.max_steps - start) // 4], 0.5, abs_tol=1e-3)
    assert 0 < factors[-1] < 0.01
