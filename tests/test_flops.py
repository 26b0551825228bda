"""FLOPs per token (mlm/flops.py) against numbers worked out by hand."""

import math

import torch

from mlm.flops import PEAK_TFLOPS, hardware_flops_per_token, model_flops_per_token, peak_flops
from mlm.kernels import position_rows
from mlm.model import ModelConfig


def test_bert_base_flops_by_hand():
    base = ModelConfig()  # 12 layers x 768, MLP 3072, vocabulary 30522
    # Matmul parameters: 12 x (4 x 768^2 + 2 x 768 x 3072) = 84,934,656 in the blocks, and
    # 768^2 + 768 x 30522 = 24,030,720 in the head. Training: 6 FLOPs per parameter and token, plus
    # 12 x layers x C x T = 14,155,776 for attention's scores and weighted sum at T = 128.
    assert (
        model_flops_per_token(base, 128, training=True)
        == 6 * (84_934_656 + 24_030_720) + 14_155_776
    )
    assert model_flops_per_token(base, 128, training=True) == 667_948_032
    assert model_flops_per_token(base, 128, training=False) * 3 == 667_948_032
    # Hardware FLOPs with the head on 15% of the rows: 85% of the head's 6 x 24,030,720 is not done.
    assert math.isclose(
        hardware_flops_per_token(base, 128, True, head_rows_fraction=0.15), 545_391_360
    )
    assert hardware_flops_per_token(base, 128, True, head_rows_fraction=1.0) == 667_948_032


def test_attention_grows_with_the_sequence_and_deberta_adds_its_position_terms():
    base = ModelConfig()
    # Each extra token of context adds 12 x L x C training FLOPs per token (4 per layer forward,
    # x3).
    assert (
        model_flops_per_token(base, 512, True) - model_flops_per_token(base, 128, True)
        == 12 * 12 * 768 * 384
    )
    # deberta-v3-base's shape beside a BERT of the same size and vocabulary: c2p and p2c each score
    # every query-key pair once more, 2 x C x T per layer forward (model FLOPs); the implementations
    # score every query against all 2k = 512 table rows, 2 x C x 512 (hardware FLOPs).
    v3 = ModelConfig(
        family="deberta-v2",
        vocab_size=128100,
        type_vocab_size=0,
        position_biased_input=False,
        position_buckets=256,
    )
    bert = ModelConfig(vocab_size=128100)
    assert (
        model_flops_per_token(v3, 128, False) - model_flops_per_token(bert, 128, False)
        == 2 * 12 * 2 * 768 * 128
    )
    hardware = hardware_flops_per_token(v3, 128, False, 1.0) - hardware_flops_per_token(
        bert, 128, False, 1.0
    )
    assert hardware == 2 * 12 * 2 * 768 * 512
    # mlm's relative shift scores each query against T + T/2 - 1 = 191 rows at T = 128.
    ours = hardware_flops_per_token(v3, 128, False, 1.0, position_rows(128))
    assert ours - hardware_flops_per_token(bert, 128, False, 1.0) == 2 * 12 * 2 * 768 * 191
    c2p = ModelConfig(family="deberta-v2", vocab_size=128100, position_terms=("c2p",))
    assert (
        model_flops_per_token(c2p, 128, False) - model_flops_per_token(bert, 128, False)
        == 12 * 2 * 768 * 128
    )
    # Narrower word embeddings (E = 128): a projection up to C, and a head that works at width E.
    wide = ModelConfig(family="deberta-v2", position_terms=("c2p",))
    narrow = ModelConfig(family="deberta-v2", position_terms=("c2p",), embedding_size=128)
    head = {E: 2 * (768 * E + E * 30522) for E in (128, 768)}
    difference = model_flops_per_token(narrow, 128, False) - model_flops_per_token(wide, 128, False)
    assert difference == 2 * 128 * 768 + head[128] - head[768]


def test_an_h200_nvl_gets_its_own_peak_not_the_sxm_one(monkeypatch):
    """The first fragment of PEAK_TFLOPS that the device name holds wins: "H200 NVL" before
    "H200"."""
    for name, bf16 in [
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA A100-SXM4-80GB", 312),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda"), "bf16") == bf16 * 1e12, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some GPU")
    assert (
        peak_flops(torch.device("cuda"), "bf16") is None
        and peak_flops(torch.device("cpu"), "bf16") is None
    )
    assert list(PEAK_TFLOPS).index("H200 NVL") < list(PEAK_TFLOPS).index("H200")


def test_modernbert_base_flops_by_hand():
    # ModernBERT-base: 22 layers x 768, GeGLU of 2 x 1,152, vocabulary 50,368, every third layer
    # global (8 of 22), the others see the 2 x 64 + 1 keys around each query.
    base = ModelConfig(
        family="modernbert",
        vocab_size=50368,
        num_layers=22,
        intermediate_size=1152,
        global_attn_every_n_layers=3,
        local_attention=128,
    )
    assert base.layer_types.count("global") == 8
    # Matmul parameters: 22 x (4 x 768^2 + 3 x 768 x 1152) = 110,297,088 in the blocks and
    # 768^2 + 768 x 50368 = 39,272,448 in the head, 6 training FLOPs each per token.
    weights = 6 * (110_297_088 + 39_272_448)
    # At T = 128 the window (129 keys) is wider than the sequence: all 22 layers see 128 keys.
    assert model_flops_per_token(base, 128, True) == weights + 3 * 2 * 768 * 22 * 2 * 128
    # At T = 1,024: the 8 global layers see 1,024 keys, the 14 local ones 129.
    local = 3 * 2 * 768 * (8 * 2 * 1024 + 14 * 2 * 129)
    assert model_flops_per_token(base, 1024, True) == weights + local
    # transformers scores every key in its local layers (a masked band); mlm chunks of 64 queries
    # against 192 keys.
    everything = 3 * 2 * 768 * 22 * 2 * 1024
    assert hardware_flops_per_token(base, 1024, True, 1.0) == weights + everything
    chunked = 3 * 2 * 768 * (8 * 2 * 1024 + 14 * 2 * 192)
    assert hardware_flops_per_token(base, 1024, True, 1.0, local_keys=192) == weights + chunked
