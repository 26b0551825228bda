"""torch.compile: the training step is one graph (no graph break) and compiles once (no
recompile)."""

import pytest
import torch
import torch._dynamo
from torch.testing import assert_close

from mlm.masking import mask_tokens
from mlm.model import MaskedLM, ModelConfig

CFG = dict(
    vocab_size=211,
    hidden_size=48,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
# BERT, and DeBERTa-v3's switches: relative positions in log buckets, both position terms, a float
# bias
FAMILY = {
    "bert": {},
    "deberta-v2": dict(
        family="deberta-v2", type_vocab_size=0, position_biased_input=False, position_buckets=16
    ),
}


def static_batch(seed: int, B: int = 4, T: int = 40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CFG["vocab_size"], (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    masked, labels = mask_tokens(
        ids,
        mask_token_id=4,
        vocab_size=CFG["vocab_size"],
        special_ids=[0, 1, 2, 3, 4],
        static=True,
        generator=g,
    )
    return masked, labels


@pytest.mark.parametrize("family", FAMILY)
def test_training_step_compiles_to_one_graph_without_recompiles(family):
    torch.manual_seed(0)
    model = MaskedLM(
        ModelConfig(**CFG, **FAMILY[family], hidden_dropout=0.0, attention_dropout=0.0)
    )
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # fullgraph: a break is an error
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    max_predictions = round(0.15 * 40)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        # new masks every step, as in training: same shapes, so the same graph
        for step in range(3):
            ids, labels = static_batch(step)
            loss = compiled(ids, labels=labels, max_predictions=max_predictions)
            loss.backward()
            # the dynamic-shape path scores the same labelled rows
            eager = model(ids, labels=labels)
            assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1


@pytest.mark.parametrize("family", FAMILY)
def test_max_predictions_pads_with_ignored_rows_and_matches_the_dynamic_path(family):
    torch.manual_seed(0)
    model = MaskedLM(
        ModelConfig(**CFG, **FAMILY[family], hidden_dropout=0.0, attention_dropout=0.0)
    )
    ids, labels = static_batch(7)
    labels[1] = -100  # a row with no labels at all
    labels[2, :] = -100
    labels[2, 5] = ids[2, 5]  # and one with a single label
    dynamic = model(ids, labels=labels)
    fixed = model(ids, labels=labels, max_predictions=8)
    assert_close(fixed, dynamic, rtol=1e-6, atol=1e-6)
    g_fixed = torch.autograd.grad(fixed, model.head.dense.weight)[0]
    g_dynamic = torch.autograd.grad(model(ids, labels=labels), model.head.dense.weight)[0]
    assert_close(g_fixed, g_dynamic, rtol=1e-5, atol=1e-7)
