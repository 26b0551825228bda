"""DeBERTa-v2/v3 ("deberta-v2") against `transformers.DebertaV2ForMaskedLM`, switch by switch.

Every checkpoint is a tiny random one that transformers itself builds and saves
(conftest.make_hf_checkpoint), beside a deberta-v3-like spm.model tokenizer folder whose model has
more embedding rows than the tokenizer has tokens, as deberta-v3's 128,100 rows for 128,001 tokens.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXTRA_ROWS, make_hf_checkpoint
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import (
    AutoModelForMaskedLM,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2Model,
    pipeline,
)

import mlm
from mlm.hf import expand, load_model, table_for
from mlm.hf_tables import BASE, KEYS
from mlm.masking import IGNORE_INDEX
from mlm.model import MaskedLM, ModelConfig
from mlm.model.deberta import RelativePositions

ROOT = Path(__file__).resolve().parents[1]

# Overrides of conftest's deberta-v3-like config, one switch (or an awkward pair) at a time.
SWITCHES = {
    "v3-like": {},
    # clamp to max_relative_positions = max_position_embeddings
    "no-buckets": dict(position_buckets=-1),
    # T > 6: clamping shows
    "no-buckets-clamped": dict(position_buckets=-1, max_relative_positions=6),
    # T > 12: past the log scale
    "buckets-short-range": dict(position_buckets=6, max_relative_positions=12),
    "own-position-projections": dict(share_att_key=False),  # v2 style: pos_key_proj, pos_query_proj
    "c2p-only": dict(pos_att_type="c2p"),
    "p2c-only": dict(pos_att_type=["p2c"]),
    "p2c-only-own-projection": dict(pos_att_type="p2c", share_att_key=False),
    "lm-predictions-head": dict(legacy=False),
    "narrow-embeddings": dict(embedding_size=30),  # embed_proj, and a head that maps back to 30
    "absolute-positions-and-types": dict(position_biased_input=True, type_vocab_size=2),
    "no-table-norm": dict(norm_rel_ebd="none"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> the folder for SWITCHES[name], built once per module."""
    root, built = tmp_path_factory.mktemp("deberta"), {}

    def build(name: str) -> Path:
        if name not in built:
            built[name] = make_hf_checkpoint(
                "deberta-v2", root / name, seed=len(built), **SWITCHES[name]
            )
        return built[name]

    return build


def batch(cfg: ModelConfig, seed: int = 0, B: int = 4, T: int = 19):
    """Right-padded random ids (rows of 19, 13, 3 and 18 tokens), token types on the second half,
    labels at ~30%."""
    g = torch.Generator().manual_seed(seed)
    # the rows past the tokenizer's tokens included
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    attention = (torch.arange(T)[None, :] < torch.tensor([T, T - 6, 3, T - 1])[:, None]).long()
    ids[attention == 0] = cfg.pad_token_id
    types = (torch.arange(T) >= T // 2).long().expand(B, T) if cfg.type_vocab_size else None
    labels = torch.where(
        (torch.rand(B, T, generator=g) < 0.3) & attention.bool(), ids, IGNORE_INDEX
    )
    return ids, attention, types, labels


def both(folder: Path):
    return AutoModelForMaskedLM.from_pretrained(folder).eval(), load_model(folder)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", SWITCHES)
def test_logits_and_loss_match_transformers(checkpoint, name):
    ref, ours = both(checkpoint(name))
    ids, attention, types, labels = batch(ours.config)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=attention, token_type_ids=types, labels=labels)
        got = ours(ids, attention, token_type_ids=types)
        loss = ours(ids, attention, token_type_ids=types, labels=labels)
    real = attention.bool()
    assert got.shape == expected.logits.shape
    assert_close(got[real], expected.logits[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[real].topk(5).indices, expected.logits[real].topk(5).indices)
    assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name",
    [
        "v3-like",
        "own-position-projections",
        "p2c-only",
        "lm-predictions-head",
        "narrow-embeddings",
        "absolute-positions-and-types",
    ],
)
def test_gradients_match_transformers(checkpoint, name):
    """d(loss)/d(every parameter), ours mapped to HF's names through the key table (QKV cut in
    three)."""
    ref, ours = both(checkpoint(name))
    ids, attention, types, labels = batch(ours.config, seed=1)
    ref(
        input_ids=ids, attention_mask=attention, token_type_ids=types, labels=labels
    ).loss.backward()
    ours(ids, attention, token_type_ids=types, labels=labels).backward()
    theirs = dict(ref.named_parameters())
    ours_by_name = dict(ours.named_parameters())
    compared = set()
    for names, name_ in expand(table_for(ours.config), BASE["deberta-v2"], ours.config.num_layers):
        if name_ not in ours_by_name:
            continue
        expected = torch.cat([theirs[n].grad for n in names])
        assert_close(ours_by_name[name_].grad, expected, atol=1e-5, rtol=1e-4, msg=name_)
        compared.add(name_)
    assert compared == set(ours_by_name)  # every parameter of ours was compared


def test_relative_index_is_transformers_for_long_sequences():
    """The table row of every query-key pair, as transformers computes it, up to deberta-v3's 512
    tokens."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    for buckets, max_rel, T in [
        (256, -1, 512),
        (256, 512, 300),
        (8, -1, 64),
        (6, 12, 40),
        (0, 6, 20),
        (0, -1, 64),
    ]:
        cfg = ModelConfig(
            family="deberta-v2",
            hidden_size=8,
            num_heads=2,
            max_position_embeddings=max(T, 64),
            position_buckets=buckets,
            max_relative_positions=max_rel,
        )
        table, index = RelativePositions(cfg)(T)
        span = cfg.relative_span
        assert table.shape[0] == 2 * span
        x = torch.zeros(1, T, 1)
        d = build_relative_position(x, x, bucket_size=buckets or -1, max_position=cfg.max_distance)[
            0
        ]
        assert torch.equal(index, (d + span).clamp(0, 2 * span - 1)), (buckets, max_rel, T)


def real_v3_like(src: Path, folder: Path, **config_changes) -> Path:
    """What microsoft/deberta-v3-* ship, at a tiny size: pytorch_model.bin holding the encoder, an
    unused absolute position table, the discriminator's mask_predictions.* and an
    lm_predictions.lm_head.*, but no cls.predictions.*; a config.json without `legacy` (so, legacy:
    cls.predictions.* is the head)."""
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    state = {
        k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("cls.")
    }
    g = torch.Generator().manual_seed(9)
    C, V = 45, state["deberta.embeddings.word_embeddings.weight"].shape[0]
    shapes = {
        "deberta.embeddings.position_embeddings.weight": (64, C),
        "mask_predictions.dense.weight": (C, C),
        "mask_predictions.dense.bias": (C,),
        "mask_predictions.LayerNorm.weight": (C,),
        "mask_predictions.LayerNorm.bias": (C,),
        "mask_predictions.classifier.weight": (1, C),
        "mask_predictions.classifier.bias": (1,),
        "lm_predictions.lm_head.dense.weight": (C, C),
        "lm_predictions.lm_head.dense.bias": (C,),
        "lm_predictions.lm_head.LayerNorm.weight": (C,),
        "lm_predictions.lm_head.LayerNorm.bias": (C,),
        "lm_predictions.lm_head.bias": (V,),
    }
    state.update({k: torch.randn(shape, generator=g) * 0.1 for k, shape in shapes.items()})
    torch.save(state, folder / "pytorch_model.bin")
    config = json.loads((src / "config.json").read_text())
    config.pop("legacy")
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def test_real_v3_like_checkpoint_gets_a_fresh_head_with_one_note_each(checkpoint, tmp_path, caplog):
    folder = real_v3_like(checkpoint("v3-like"), tmp_path / "v3")
    with caplog.at_level("INFO", logger="mlm"):
        model = load_model(folder)
    notes = [r.getMessage() for r in caplog.records if r.name == "mlm"]
    assert len(notes) == 2
    assert notes[0].startswith("ignored 12 unused checkpoint keys")
    for group in (
        "deberta.embeddings.position_embeddings.weight",
        "mask_predictions.",
        "lm_predictions.lm_head.",
    ):
        assert group in notes[0]
    assert "no MLM head weights (cls.predictions.*)" in notes[1] and "must be trained" in notes[1]
    # fresh, as transformers'
    assert torch.all(model.head.decoder.bias == 0) and torch.all(model.head.norm.weight == 1)

    ref, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    # transformers also starts the head afresh
    assert {k.split(".")[0] for k in info["missing_keys"]} == {"cls"}
    encoder = DebertaV2Model.from_pretrained(folder).eval()
    ids, attention, _, _ = batch(model.config, seed=3)
    real = attention.bool()
    with torch.no_grad():
        expected = encoder(input_ids=ids, attention_mask=attention).last_hidden_state
        assert_close(model.encode(ids, attention)[real], expected[real], atol=1e-5, rtol=1e-5)


def test_real_v3_like_checkpoint_with_legacy_false_uses_lm_predictions(
    checkpoint, tmp_path, caplog
):
    """The naming config.json picks decides: legacy=false reads lm_predictions.lm_head.* as the
    head."""
    folder = real_v3_like(checkpoint("v3-like"), tmp_path / "v3", legacy=False)
    with caplog.at_level("INFO", logger="mlm"):
        model = load_model(folder)
    notes = [r.getMessage() for r in caplog.records if r.name == "mlm"]
    assert len(notes) == 1 and notes[0].startswith("ignored 7 unused checkpoint keys")
    ref, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"]
    ids, attention, _, _ = batch(model.config, seed=4)
    real = attention.bool()
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids, attention_mask=attention).logits
        assert_close(model(ids, attention)[real], expected[real], atol=1e-5, rtol=1e-5)


# Configurations that, between them, make transformers write every key it has for DeBERTa-v2.
TINY = dict(
    vocab_size=50,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=9,
    relative_attention=True,
    pos_att_type="p2c|c2p",
    share_att_key=False,
    norm_rel_ebd="layer_norm",
    position_biased_input=True,
    type_vocab_size=2,
)


def test_table_names_every_key_transformers_writes_and_no_other():
    """Parameters and buffers of the masked-LM model with each head naming, of the bare encoder
    under the prefix, of a narrow-embedding model; plus v3's mask_predictions.*, which no
    transformers class has."""
    written = set()
    for changes in ({}, {"legacy": False}, {"embedding_size": 6}):
        model = DebertaV2ForMaskedLM(DebertaV2Config(**TINY, **changes))
        written |= set(model.state_dict()) | {n for n, _ in model.named_buffers()}
    bare = DebertaV2Model(DebertaV2Config(**TINY))
    written |= {"deberta." + n for n in [*bare.state_dict(), *(n for n, _ in bare.named_buffers())]}
    table = {
        n
        for names, _ in expand(KEYS["deberta-v2"], BASE["deberta-v2"], num_layers=2)
        for n in names
    }
    assert table - written == {n for n in table if n.startswith("mask_predictions.")}
    assert written <= table


def test_sharded_bin_checkpoint(checkpoint, tmp_path):
    """pytorch_model-0000k-of-00003.bin shards and their index, as transformers 4 wrote them (5
    writes safetensors)."""
    folder = checkpoint("own-position-projections")
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for k in range(3):
        shard = f"pytorch_model-{k + 1:05d}-of-00003.bin"
        torch.save({n: state[n] for n in names[k::3]}, tmp_path / shard)
        weight_map.update({n: shard for n in names[k::3]})
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    model = load_model(tmp_path)
    ref = AutoModelForMaskedLM.from_pretrained(folder).eval()
    ids, _, _, _ = batch(model.config, seed=5)
    with torch.no_grad():
        assert_close(model(ids), ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- fill-mask
MASKED = [
    "The parser returns a [MASK] of the arguments.",
    "Return the [MASK] value, and the <mask> of it.",
    "[MASK]",
    "A much longer text, so that the batch needs padding: the [MASK] is written to the file.",
]


def assert_same_result(ours, ref):
    assert type(ours) is type(ref) and len(ours) == len(ref)
    if ref and isinstance(ref[0], list):
        for a, b in zip(ours, ref):
            assert_same_result(a, b)
        return
    for a, b in zip(ours, ref):
        assert (a["token"], a["token_str"], a["sequence"]) == (
            b["token"],
            b["token_str"],
            b["sequence"],
        )
        assert abs(a["score"] - b["score"]) < 1e-4


@pytest.mark.parametrize("name", ["v3-like", "lm-predictions-head", "narrow-embeddings"])
def test_fill_mask_equals_pipeline(checkpoint, name):
    folder = checkpoint(name)
    model, tokenizer = mlm.load_pretrained(folder)
    fill = pipeline("fill-mask", model=str(folder), device="cpu")
    # the pipeline knows only the model's own spelling
    texts = [t.replace("<mask>", "[MASK]") for t in MASKED]
    for text, result in zip(texts, mlm.fill_mask(model, tokenizer, MASKED, top_k=6)):
        assert_same_result(result, fill(text, top_k=6))
    targets = ["the", "value", "zzzq"]  # the last is not a piece: its first token stands in
    assert_same_result(
        mlm.fill_mask(model, tokenizer, MASKED[0], top_k=10, targets=targets),
        fill(texts[0], top_k=10, targets=targets),
    )


def test_fill_mask_rows_past_the_tokenizer_decode_as_the_pipeline_does(checkpoint, tmp_path):
    """deberta-v3 has embedding rows no token maps to; where the head ranks them first, the pipeline
    shows them with an empty token_str and drops them from the sequence, and so do we."""
    folder = shutil.copytree(checkpoint("v3-like"), tmp_path / "rows")
    model, tokenizer = mlm.load_pretrained(folder)
    with torch.no_grad():
        model.head.decoder.bias[-EXTRA_ROWS:] += 8.0
    mlm.save_pretrained(model, None, folder)
    fill = pipeline("fill-mask", model=str(folder), device="cpu")
    ours = mlm.fill_mask(model, tokenizer, MASKED[:2], top_k=4)
    assert {c["token"] for c in ours[0]} <= set(
        range(tokenizer.vocab_size, model.config.vocab_size)
    )
    assert ours[0][0]["token_str"] == ""
    for result, text in zip(ours, MASKED[:2]):
        assert_same_result(result, fill(text.replace("<mask>", "[MASK]"), top_k=4))


# ---------------------------------------------------------------------------------------- the model
def tiny(**changes) -> MaskedLM:
    torch.manual_seed(0)
    return MaskedLM(
        ModelConfig(
            **{
                **dict(
                    family="deberta-v2",
                    vocab_size=97,
                    hidden_size=48,
                    num_layers=2,
                    num_heads=4,
                    intermediate_size=40,
                    max_position_embeddings=64,
                    type_vocab_size=0,
                    position_biased_input=False,
                    position_buckets=8,
                    layer_norm_eps=1e-7,
                    hidden_dropout=0.0,
                    attention_dropout=0.0,
                ),
                **changes,
            }
        )
    )


def test_document_mask_equals_running_each_document_alone():
    """Relative positions do not depend on where a document starts, so no position trick is
    needed."""
    model = tiny().eval()
    ids = torch.randint(5, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [-1] * 2])  # two documents, then padding
    with torch.no_grad():
        packed = model.encode(ids, doc_ids >= 0, doc_ids=doc_ids)[0]  # (T, C)
        for doc in (0, 1):
            at = doc_ids[0] == doc
            assert_close(packed[at], model.encode(ids[:, at])[0], atol=1e-5, rtol=1e-5)
        # without the mask
        assert not torch.allclose(packed[:14], model.encode(ids[:, :14])[0], atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(dtype):
    model = tiny()
    ids = torch.randint(5, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[1, 12:] = 0
    labels = torch.where(
        torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3, ids, IGNORE_INDEX
    )
    reference = model(ids, attention, labels=labels)
    with torch.autocast("cpu", dtype=dtype):
        loss = model(ids, attention, labels=labels)
    loss.backward()
    assert_close(loss.float(), reference, atol=0.05, rtol=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fp16_does_not_overflow_where_transformers_does(tmp_path):
    """Scores of ~1e5 before the 1/sqrt(3D) scale: transformers' c2p product overflows fp16; ours
    scales first."""
    model = tiny(num_heads=1, hidden_size=64, intermediate_size=64).eval()
    # q = k = 100 x, and position keys 100 x (normalised table): products ~ 1e5
    with torch.no_grad():
        model.encoder.blocks[0].attn.qkv.weight[:128].copy_(100 * torch.eye(64).repeat(2, 1))
        model.encoder.blocks[0].attn.qkv.bias.zero_()
    ids = torch.randint(5, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.encode(ids)
        c2p = (
            model.encoder.blocks[0].attn.qkv(model.encoder.embeddings(ids))[..., :64]
            @ (100 * model.encoder.relative(24)[0]).T
        )
        # the unscaled product does not fit in fp16
        assert c2p.abs().max() > torch.finfo(torch.float16).max
        with torch.autocast("cpu", dtype=torch.float16):
            got = model.encode(ids)
    assert torch.isfinite(got).all()
    assert_close(got.float(), expected, atol=0.05, rtol=0.02)

    mlm.save_pretrained(model, None, tmp_path)
    ref = DebertaV2ForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        theirs = ref.deberta(input_ids=ids).last_hidden_state
    assert not torch.isfinite(theirs).all()  # the case is one transformers' fp16 cannot run


def test_config_refusals_are_one_line():
    with pytest.raises(mlm.ConfigError, match="varlen is not supported for deberta-v2"):
        ModelConfig(family="deberta-v2", varlen=True)
    with pytest.raises(mlm.ConfigError, match="position_terms 'p2p'"):
        ModelConfig(family="deberta-v2", position_terms=("p2p",))
    with pytest.raises(mlm.ConfigError, match="DeBERTa's"):
        ModelConfig(family="bert", position_biased_input=False)


BAD_CONFIGS = {
    "conv": (dict(conv_kernel_size=3), "conv_kernel_size 3"),
    "head-size": (dict(attention_head_size=7), "attention_head_size 7"),
    "z-steps": (dict(z_steps=2), "z_steps 2"),
    "no-relative": (dict(relative_attention=False), "relative_attention=false"),
    "p2p": (dict(pos_att_type="p2c|p2p"), "pos_att_type 'p2c|p2p'"),
    "unnamed-head": (dict(legacy=False, embedding_size=30), "legacy=false with embedding_size 30"),
}
BAD_TOKENIZERS = {"no-spm-model": None, "corrupt-spm-model": b"not a sentencepiece model\n"}


def run_infer(folder):
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), "--model", str(folder), "a [MASK]"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def bad_folder(src: Path, folder: Path, case: str) -> Path:
    shutil.copytree(src, folder)
    if case in BAD_CONFIGS:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **BAD_CONFIGS[case][0]}))
    elif BAD_TOKENIZERS[case] is None:
        (folder / "spm.model").unlink()
    else:
        (folder / "spm.model").write_bytes(BAD_TOKENIZERS[case])
    return folder


@pytest.mark.parametrize("case", [*BAD_CONFIGS, *BAD_TOKENIZERS])
def test_bad_folders_are_one_line_errors(checkpoint, tmp_path, case):
    folder = bad_folder(checkpoint("v3-like"), tmp_path / case, case)
    error = mlm.UnsupportedModelError if case in BAD_CONFIGS else mlm.TokenizerError
    with pytest.raises(error) as e:
        mlm.load_pretrained(folder)
    message = str(e.value)
    assert "\n" not in message
    assert (BAD_CONFIGS[case][1] if case in BAD_CONFIGS else "spm.model") in message


@pytest.mark.parametrize("case", ["conv", "corrupt-spm-model"])
def test_infer_on_a_bad_folder_exits_2_with_one_line(checkpoint, tmp_path, case):
    out = run_infer(bad_folder(checkpoint("v3-like"), tmp_path / case, case))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (BAD_CONFIGS[case][1] if case in BAD_CONFIGS else "spm.model") in out.stderr
