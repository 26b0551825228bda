"""Loading and saving Hugging Face folders: what real checkpoints contain, and the round trip
back."""

import json
import shutil

import pytest
import torch
import transformers
from conftest import FAMILIES
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig, BertForPreTraining, pipeline

import mlm
from mlm.hf import expand, load_model
from mlm.hf_tables import BASE, KEYS


def copy_folder(src, dst, drop=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def sample_ids(model, B=3, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, model.config.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_ours_to_transformers(hf_checkpoints, tmp_path, family):
    model, tokenizer = mlm.load_pretrained(hf_checkpoints[family])
    with torch.no_grad():  # change every weight so the round trip cannot pass by accident
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mlm.save_pretrained(model, tokenizer, tmp_path / "out")

    ref, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = sample_ids(model)
    with torch.no_grad():
        assert_close(ref.eval()(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)

    # ... and back: our loader reads what we wrote, bit for bit.
    again = load_model(tmp_path / "out")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name

    # The saved tokenizer serves transformers' own fill-mask pipeline.
    fill = pipeline("fill-mask", model=str(tmp_path / "out"), device="cpu")
    assert len(fill(f"the value of {fill.tokenizer.mask_token} is returned.", top_k=3)) == 3


def test_save_over_an_existing_folder_replaces_files(hf_checkpoints, tmp_path):
    model, tokenizer = mlm.load_pretrained(hf_checkpoints["bert"])
    mlm.save_pretrained(model, tokenizer, tmp_path / "out")
    with torch.no_grad():
        model.head.decoder.bias.fill_(0.5)
    mlm.save_pretrained(model, tokenizer, tmp_path / "out")
    assert torch.all(load_model(tmp_path / "out").head.decoder.bias == 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # no temporary file left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_encoder_only_checkpoint_without_prefix_gets_a_new_head(hf_checkpoints, tmp_path, caplog):
    folder = copy_folder(hf_checkpoints["bert"], tmp_path / "enc", drop=("model.safetensors",))
    state = load_file(hf_checkpoints["bert"] / "model.safetensors")
    encoder = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    encoder["pooler.dense.weight"] = torch.zeros(45, 45)
    encoder["pooler.dense.bias"] = torch.zeros(45)
    save_file(encoder, folder / "model.safetensors")
    with caplog.at_level("INFO", logger="mlm"):
        model = load_model(folder)
    assert "newly initialised" in caplog.text and "pooler" in caplog.text
    reference = load_model(hf_checkpoints["bert"])
    ids = sample_ids(model)
    with torch.no_grad():
        assert_close(model.encode(ids), reference.encode(ids))


def test_pretraining_checkpoint_with_nsp_head_legacy_names_and_bin_format(tmp_path, caplog):
    """BertForPreTraining saved as pytorch_model.bin with TF-era LayerNorm.gamma/beta names."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=97,
        hidden_size=30,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=31,
    )
    ref = BertForPreTraining(cfg).eval()
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in ref.state_dict().items()
    }
    state["cls.predictions.decoder.weight"] = ref.bert.embeddings.word_embeddings.weight.clone()
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "model_type": "bert"}))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with caplog.at_level("INFO", logger="mlm"):
        model = load_model(tmp_path)
    assert "seq_relationship" in caplog.text
    ids = sample_ids(model)
    with torch.no_grad():
        assert_close(model(ids), ref(input_ids=ids).prediction_logits, atol=1e-5, rtol=1e-5)


def test_sharded_safetensors(hf_checkpoints, tmp_path):
    ref = AutoModelForMaskedLM.from_pretrained(hf_checkpoints["roberta"])
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path)
    ids = sample_ids(model)
    with torch.no_grad():
        assert_close(model(ids), ref.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def folder_with(src, folder, state):
    """A copy of the checkpoint folder src whose weights are state."""
    copy_folder(src, folder, drop=("model.safetensors",))
    save_file(state, folder / "model.safetensors")
    return folder


def test_unknown_missing_and_mismatched_keys_are_listed(hf_checkpoints, tmp_path, caplog):
    state = load_file(hf_checkpoints["bert"] / "model.safetensors")

    # A key no table knows is skipped, and the note names it; the weights load as without it.
    rotary = "bert.encoder.layer.0.attention.self.rotary.weight"
    extra = folder_with(
        hf_checkpoints["bert"], tmp_path / "extra", {**state, rotary: torch.zeros(3)}
    )
    with caplog.at_level("INFO", logger="mlm"):
        model = load_model(extra)
    assert f"ignored 1 unused checkpoint keys ({rotary})" in caplog.text
    reference = load_model(hf_checkpoints["bert"]).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name

    without = {k: v for k, v in state.items() if "layer.1.output.dense.weight" not in k}
    missing = folder_with(hf_checkpoints["bert"], tmp_path / "missing", without)
    with pytest.raises(
        mlm.CheckpointError, match=r"missing keys: bert\.encoder\.layer\.1\.output\.dense\.weight$"
    ):
        load_model(missing)

    config = json.loads((hf_checkpoints["bert"] / "config.json").read_text())
    wrong = copy_folder(hf_checkpoints["bert"], tmp_path / "wrong")
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(mlm.CheckpointError) as e:
        load_model(wrong)
    # fc1's weight and bias and fc2's weight, in each of the 2 layers: the first three named, then
    # the count.
    assert str(e.value) == (
        "6 tensors do not have the shapes config.json gives them: "
        "bert.encoder.layer.0.intermediate.dense.weight (37, 45) vs (40, 45); "
        "bert.encoder.layer.1.intermediate.dense.weight (37, 45) vs (40, 45); "
        "bert.encoder.layer.0.intermediate.dense.bias (37,) vs (40,) and 3 more; "
        "the folder mixes files of two models"
    )


def test_checkpoint_with_extra_heads_loads_like_transformers(hf_checkpoints, tmp_path, caplog):
    """Domain checkpoints ship task and auxiliary heads beside the MLM head; transformers skips
    them, so do we."""
    state = load_file(hf_checkpoints["bert"] / "model.safetensors")
    heads = {
        "bert.pooler.dense.weight": torch.randn(45, 45),
        "bert.pooler.dense.bias": torch.randn(45),
        "cls.seq_relationship.weight": torch.randn(2, 45),
        "cls.seq_relationship.bias": torch.randn(2),
        "classifier.weight": torch.randn(3, 45),
        "classifier.bias": torch.randn(3),
        "cls.aux.dense.weight": torch.randn(7, 45),
        "some_head.0.weight": torch.randn(5),
        "some_head.1.weight": torch.randn(5),
    }
    folder = folder_with(hf_checkpoints["bert"], tmp_path / "heads", {**state, **heads})
    with caplog.at_level("INFO", logger="mlm"):
        model = load_model(folder)
    notes = [r.getMessage() for r in caplog.records if r.name == "mlm"]
    assert len(notes) == 1 and notes[0].startswith("ignored 9 unused checkpoint keys")
    for group in (
        "bert.pooler.dense.*",
        "cls.seq_relationship.*",
        "classifier.*",
        "cls.aux.dense.weight",
        "some_head.*.weight",
    ):
        assert group in notes[0]

    ref, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == set(heads)
    ids = sample_ids(model)
    with torch.no_grad():
        assert_close(model(ids), ref.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config_family, weights_family",
    [("bert", "roberta"), ("bert", "distilbert"), ("roberta", "bert"), ("distilbert", "bert")],
)
def test_weights_of_another_family_are_refused_in_one_short_line(
    hf_checkpoints, tmp_path, config_family, weights_family
):
    state = load_file(hf_checkpoints[weights_family] / "model.safetensors")
    folder = folder_with(hf_checkpoints[config_family], tmp_path / "mixed", state)
    with pytest.raises(
        mlm.CheckpointError,
        match=rf"does not match a {config_family} model: its keys are .*"
        rf"{weights_family}\.\*.*model_type.*missing keys: {config_family}\.embeddings\.",
    ) as err:
        load_model(folder)
    message = str(err.value)
    # Every missing encoder weight is named, by pattern: layer indices collapse, weight and bias
    # merge.
    assert ".layer.*." in message and ".layer.0." not in message and ".layer.1." not in message
    assert "\n" not in message and len(message) < 800


TINY = {
    "bert": dict(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=9,
    ),
    "roberta": dict(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=9,
    ),
    "distilbert": dict(vocab_size=50, dim=8, n_layers=2, n_heads=2, hidden_dim=9),
    # Every bias switched on, so that the table's optional keys all exist.
    "modernbert": dict(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=9,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        norm_bias=True,
        attention_bias=True,
        mlp_bias=True,
        classifier_bias=True,
        decoder_bias=True,
    ),
}
CLASSES = {  # the family's fullest model and its bare encoder, whose keys have no prefix
    "bert": ("BertForPreTraining", "BertModel"),
    "roberta": ("RobertaForMaskedLM", "RobertaModel"),
    "distilbert": ("DistilBertForMaskedLM", "DistilBertModel"),
    "modernbert": ("ModernBertForMaskedLM", "ModernBertModel"),
}
NOT_WRITTEN = {"modernbert": {"model.layers.0.attn_norm.weight", "model.layers.0.attn_norm.bias"}}


# DeBERTa's table spans several configurations (two head namings, optional projections) and a head
# no transformers class has (mask_predictions.*): tests/test_deberta.py checks it over the union of
# them.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deberta-v2"])
def test_each_table_names_every_key_transformers_writes_and_no_other(family):
    """Parameters and buffers (which older versions saved) alike, the `None` entries included."""
    config = AutoConfig.for_model(family, **TINY[family])
    full, bare = (getattr(transformers, name)(config) for name in CLASSES[family])
    written = set(full.state_dict()) | {n for n, _ in full.named_buffers()}
    written |= {
        BASE[family] + n for n in [*bare.state_dict(), *(n for n, _ in bare.named_buffers())]
    }
    table = {n for names, _ in expand(KEYS[family], BASE[family], num_layers=2) for n in names}
    # ModernBERT's layer 0 has no norm before its attention: the pattern's layer-0 key is never
    # written.
    assert written == table - NOT_WRITTEN.get(family, set())


def test_bad_folders_raise_specific_errors(hf_checkpoints, tmp_path):
    with pytest.raises(mlm.CheckpointError, match="does not exist"):
        mlm.load_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(mlm.CheckpointError, match="no config.json"):
        mlm.load_pretrained(empty)
    no_weights = copy_folder(
        hf_checkpoints["bert"], tmp_path / "noweights", drop=("model.safetensors",)
    )
    with pytest.raises(mlm.CheckpointError, match="no weights"):
        mlm.load_pretrained(no_weights)
    gpt = copy_folder(hf_checkpoints["bert"], tmp_path / "gpt")
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(mlm.UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        mlm.load_pretrained(gpt)
    truncated = copy_folder(hf_checkpoints["bert"], tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(mlm.CheckpointError, match="damaged"):
        mlm.load_pretrained(truncated)
    no_tok = copy_folder(hf_checkpoints["bert"], tmp_path / "notok", drop=("tokenizer*",))
    with pytest.raises(mlm.TokenizerError, match="no tokenizer"):
        mlm.load_pretrained(no_tok)
