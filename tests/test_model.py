"""The hand-written encoder against `transformers`, family by family, on tiny random checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, make_hf_checkpoint
from torch.testing import assert_close
from transformers import AutoModelForMaskedLM, BertModel

import mlm
from mlm.hf import load_model
from mlm.masking import IGNORE_INDEX
from mlm.model import MaskedLM, ModelConfig, bert


def padded_batch(cfg, seed=0, B=4, T=19):
    """Random ids with rows of different lengths, padded on the right with the model's pad id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    lengths = torch.tensor([T, T - 6, 3, T - 1])[:B]
    attention = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids[attention == 0] = cfg.pad_token_id
    return ids, attention


def hf_model(folder):
    return AutoModelForMaskedLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_checkpoints, family):
    ref, ours = hf_model(hf_checkpoints[family]), load_model(hf_checkpoints[family])
    ids, attention = padded_batch(ours.config)
    extra = {}
    if family == "bert":  # segment B on the second half: token types must be used
        extra["token_type_ids"] = (
            (torch.arange(ids.shape[1]) >= ids.shape[1] // 2).long().expand_as(ids)
        )
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=attention, **extra).logits
        got = ours(ids, attention_mask=attention, **extra)
    real = attention.bool()
    assert got.shape == expected.shape
    assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[real].topk(5).indices, expected[real].topk(5).indices)


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("bert", {"hidden_act": "gelu_new"}),
        ("bert", {"hidden_act": "relu", "layer_norm_eps": 1e-5}),
        ("roberta", {"hidden_act": "gelu_new"}),
        ("distilbert", {"activation": "relu"}),
    ],
)
def test_activation_and_eps_from_config(tmp_path, family, overrides):
    folder = make_hf_checkpoint(family, tmp_path / family, seed=3, **overrides)
    ref, ours = hf_model(folder), load_model(folder)
    ids, attention = padded_batch(ours.config, seed=1)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=attention).logits
        got = ours(ids, attention_mask=attention)
    assert_close(got[attention.bool()], expected[attention.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_never_changes_real_positions(hf_checkpoints, family):
    model = load_model(hf_checkpoints[family])
    ids, attention = padded_batch(model.config, seed=2)
    with torch.no_grad():
        batched = model(ids, attention_mask=attention)
        garbage = ids.clone()
        garbage[attention == 0] = 7  # whatever sits in padded slots is invisible
        assert_close(
            model(garbage, attention_mask=attention)[attention.bool()], batched[attention.bool()]
        )
        for row in range(ids.shape[0]):
            n = int(attention[row].sum())
            alone = model(ids[row : row + 1, :n])
            assert_close(alone[0], batched[row, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_on_masked_rows_matches_transformers(hf_checkpoints, family):
    ref, ours = hf_model(hf_checkpoints[family]), load_model(hf_checkpoints[family])
    ids, attention = padded_batch(ours.config, seed=4)
    labels = torch.full_like(ids, IGNORE_INDEX)
    picks = (
        torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    ) & attention.bool()
    labels[picks] = ids[picks]
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=attention, labels=labels).loss
        got = ours(ids, attention_mask=attention, labels=labels)
    assert got.dim() == 0
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_head_on_a_subset_of_rows_equals_full_logits(hf_checkpoints):
    model = load_model(hf_checkpoints["bert"])
    ids, attention = padded_batch(model.config)
    with torch.no_grad():
        hidden = model.encode(ids, attention)
        full = model(ids, attention)
        rows = torch.tensor([[0, 3], [1, 0], [3, 17]])
        subset = model.logits(hidden[rows[:, 0], rows[:, 1]])
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    assert subset.shape == (3, model.config.vocab_size)
    assert_close(subset, full[rows[:, 0], rows[:, 1]])


def test_encode_matches_transformers_base_model(hf_checkpoints):
    folder = hf_checkpoints["bert"]
    ref = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    ours = load_model(folder)
    ids, attention = padded_batch(ours.config)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=attention).last_hidden_state
        got = ours.encode(ids, attention)
    assert_close(got[attention.bool()], expected[attention.bool()], atol=1e-5, rtol=1e-5)


def test_real_weights_all_minilm_l6_v2(minilm_dir):
    """Real BERT weights (no `bert.` prefix, no MLM head): hidden states equal
    `transformers.BertModel`."""
    ref = BertModel.from_pretrained(minilm_dir).eval()
    model, tokenizer = mlm.load_pretrained(minilm_dir)
    batch = tokenizer(
        [
            "The capital of France is Paris.",
            "Masked language models predict hidden words from context.",
        ]
    )
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        got = model.encode(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("max_predictions", [None, 9])
def test_labelled_rows_are_what_forward_scores(hf_checkpoints, max_predictions):
    """encode -> labelled_rows -> logits -> cross-entropy is forward's loss: evaluation reuses this
    path."""
    model = load_model(hf_checkpoints["bert"])
    ids, attention = padded_batch(model.config, seed=4)
    labels = torch.full_like(ids, IGNORE_INDEX)
    picks = (
        torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    ) & attention.bool()
    labels[picks] = ids[picks]
    with torch.no_grad():
        rows, targets = model.labelled_rows(model.encode(ids, attention), labels, max_predictions)
        loss = F.cross_entropy(model.logits(rows), targets, ignore_index=IGNORE_INDEX)
        assert_close(loss, model(ids, attention, labels=labels, max_predictions=max_predictions))
    if max_predictions is None:
        assert torch.equal(targets, ids[picks])  # row order: batch row, then position
    else:
        assert rows.shape == (ids.shape[0] * max_predictions, model.config.hidden_size)
        assert (targets != IGNORE_INDEX).sum() == picks.sum(1).clamp(max=max_predictions).sum()


def test_dropout_only_in_training_mode(hf_checkpoints):
    model = load_model(hf_checkpoints["bert"])
    ids, attention = padded_batch(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids, attention), model(ids, attention))
        model.train()
        assert not torch.equal(model(ids, attention), model(ids, attention))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense-mask", "varlen"])
def test_document_mask_equals_running_each_document_alone(varlen):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=24,
        num_layers=2,
        num_heads=4,
        intermediate_size=40,
        max_position_embeddings=32,
        type_vocab_size=0,
        family="distilbert",
        varlen=varlen,
    )
    model = MaskedLM(cfg).eval()
    # Positions keep counting across a packed block (the second document starts at 5), while a
    # document run alone starts at 0: with every position row the same, the two runs see the same
    # embeddings.
    with torch.no_grad():
        position = model.encoder.embeddings.position.weight
        position.copy_(position[0].clone())
    ids = torch.randint(5, 50, (1, 14))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 2])  # two documents, then padding
    with torch.no_grad():
        packed = model.encode(ids, doc_ids >= 0, doc_ids=doc_ids)[0]  # (T, C)
        for doc in (0, 1):
            at = doc_ids[0] == doc
            assert_close(packed[at], model.encode(ids[:, at])[0], atol=1e-5, rtol=1e-5)
        # without the mask
        assert not torch.allclose(packed[:12], model.encode(ids[:, :12])[0], atol=1e-4)


def test_config_validation():
    with pytest.raises(mlm.ConfigError, match="not divisible"):
        ModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(mlm.ConfigError, match="unsupported hidden_act"):
        ModelConfig(hidden_act="mish")


def varlen_inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 50, (3, 16), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 11:] = 0
    attention[2, 4:] = 0
    doc_ids = torch.tensor(
        [[0] * 5 + [1] * 9 + [2] * 2, [0] * 3 + [1] * 8 + [-1] * 5, [0] * 4 + [-1] * 12]
    )
    return ids, attention, doc_ids


def test_varlen_reads_the_lengths_to_the_host_once_per_batch(monkeypatch):
    """Every layer's nested tensors get the batch's shortest and longest sequence, read once (on a
    GPU the nested tensor would otherwise compute them in each layer, a device sync each time)."""
    ids, attention, doc_ids = varlen_inputs()  # sequences of 5, 9, 2, 3, 8 and 4 tokens
    model = MaskedLM(
        ModelConfig(
            vocab_size=50,
            hidden_size=24,
            num_layers=3,
            num_heads=4,
            intermediate_size=40,
            max_position_embeddings=32,
            varlen=True,
        )
    ).eval()
    made, reads = [], []
    build = torch.nested.nested_tensor_from_jagged
    monkeypatch.setattr(
        torch.nested,
        "nested_tensor_from_jagged",
        lambda *a, **kw: (
            made.append((kw.get("min_seqlen"), kw.get("max_seqlen"))) or build(*a, **kw)
        ),
    )
    pack = bert.pack
    monkeypatch.setattr(bert, "pack", lambda *a: reads.append(1) or pack(*a))
    model.encode(ids, attention, doc_ids=doc_ids)
    assert len(reads) == 1
    assert made == [(2, 9)] * (3 * 3)  # q, k and v in each of the 3 layers


@pytest.mark.parametrize("with_docs", [False, True])
def test_varlen_attention_equals_the_dense_mask_reference(with_docs):
    """Unpadded, per-document attention through nested tensors: same outputs and gradients as dense
    masks."""
    ids, attention, doc_ids = varlen_inputs()
    doc_ids = doc_ids if with_docs else None
    labels = torch.where(
        torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, IGNORE_INDEX
    )
    labels[attention == 0] = IGNORE_INDEX
    results = []
    for varlen in (False, True):
        torch.manual_seed(0)
        model = MaskedLM(
            ModelConfig(
                vocab_size=50,
                hidden_size=24,
                num_layers=2,
                num_heads=4,
                intermediate_size=40,
                max_position_embeddings=32,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                varlen=varlen,
            )
        )
        hidden = model.encode(ids, attention, doc_ids=doc_ids)
        loss = model(ids, attention, labels=labels, doc_ids=doc_ids)
        loss.backward()
        results.append((hidden, loss, {n: p.grad for n, p in model.named_parameters()}))
    (h_dense, l_dense, g_dense), (h_var, l_var, g_var) = results
    real = attention.bool()
    assert_close(h_var[real], h_dense[real], atol=1e-5, rtol=1e-5)
    assert torch.all(h_var[~real] == 0)
    assert_close(l_var, l_dense, atol=1e-6, rtol=1e-6)
    for name in g_dense:
        assert_close(g_var[name], g_dense[name], atol=1e-5, rtol=1e-4, msg=name)
