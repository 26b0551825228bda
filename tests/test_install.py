"""mlm.kernels.install: the same model with its fast paths put in from outside, for every family.

The installed model must give the plain model's outputs and gradients: both are held against the
plain model in fp64, and the installed one's error may be at most 4x the plain one's own fp32 error
(plus 16 fp32 steps of the largest value: the two sum in other orders through a whole model), on any
CPU. Dropout is off, since the CPU dropout draws other (equally likely) masks."""

import pytest
import torch
from conftest import FAMILIES

from mlm.hf import load_model
from mlm.kernels import cpu_linear, install
from mlm.masking import IGNORE_INDEX
from mlm.model import bert


def batch(cfg, seed=0, B=3, T=17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 12:] = 0
    ids[attention == 0] = cfg.pad_token_id
    labels = torch.where(torch.rand(B, T, generator=g) < 0.3, ids, IGNORE_INDEX)
    labels[attention == 0] = IGNORE_INDEX
    labels[:, 1] = ids[:, 1]
    return ids, attention, labels


def outputs(model, ids, attention, labels):
    """Eval logits, then the training loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model.eval()(ids, attention)
    model.train()
    loss = model(ids, attention, labels=labels)
    loss.backward()
    return [logits, loss.detach()] + [p.grad for _, p in sorted(model.named_parameters())]


@pytest.mark.parametrize("family", FAMILIES)
def test_installed_and_plain_models_agree_against_fp64(hf_checkpoints, family):
    gemm = "onednn" if cpu_linear._op is not None else "mkl"  # the oneDNN path too, on any CPU
    plain = load_model(hf_checkpoints[family], kernels=False)
    fast = load_model(hf_checkpoints[family], kernels=False)
    installed = install(fast, "cpu", cpu_gemm=gemm)
    exact = load_model(hf_checkpoints[family], kernels=False, dtype=torch.float64)
    for model in (plain, fast, exact):
        model.set_dropout(0.0)
    expected = {
        "cpu_dropout",
        "cpu_attention",
        "cpu_embedding",
        "vocab_logits",
        "linear_cross_entropy_ref",
    }
    expected |= {"cpu_linear"} if gemm == "onednn" else set()
    expected |= {"disentangled_bias"} if family == "deberta-v2" else set()
    assert set(installed) == expected
    assert (
        type(fast.head.decoder).__name__ == "FastDecoder"
        and type(plain.head.decoder).__name__ == "Decoder"
    )
    # the same names: loading and saving hold
    assert sorted(fast.state_dict()) == sorted(plain.state_dict())

    ids, attention, labels = batch(plain.config)
    real = attention.bool()
    names = ["logits", "loss"] + [n for n, _ in sorted(plain.named_parameters())]
    for name, ours, theirs, want in zip(
        names,
        outputs(fast, ids, attention, labels),
        outputs(plain, ids, attention, labels),
        outputs(exact, ids, attention, labels),
    ):
        if name == "logits":
            ours, theirs, want = ours[real], theirs[real], want[real]
        want = want.double()
        ours_err = (ours.double() - want).abs().max().item()
        plain_err = (theirs.double() - want).abs().max().item()
        assert ours_err <= 4 * plain_err + 16 * 2**-24 * want.abs().max().item(), (
            name,
            ours_err,
            plain_err,
        )


def test_install_is_from_outside_and_leaves_the_plain_model_plain(hf_checkpoints):
    """The model files never reach for a kernel: a plain model computes with torch's own modules."""
    model = load_model(hf_checkpoints["bert"], kernels=False)
    assert {type(m).__module__.split(".")[0] for m in model.modules()} <= {"torch", "mlm"}
    assert not any(type(m).__module__.startswith("mlm.kernels") for m in model.modules())
    assert all(
        a.sdpa is torch.nn.functional.scaled_dot_product_attention
        for a in model.modules()
        if isinstance(a, bert.Attention)
    )
    installed = load_model(hf_checkpoints["bert"])  # kernels=True by default
    assert any(type(m).__module__.startswith("mlm.kernels") for m in installed.modules())


@pytest.mark.skipif(cpu_linear._op is None, reason="this torch build has no oneDNN linear op")
def test_the_decoder_uses_the_chosen_gemm_for_training_and_for_logits(hf_checkpoints):
    """cpu_gemm="onednn" reaches every product of the model, the decoder's too (the largest one):
    the loss's logits and the full (B, T, V) logits of inference, fp32 on the CPU."""
    model = load_model(hf_checkpoints["bert"], kernels=False)
    install(model, "cpu", cpu_gemm="onednn")
    calls = []

    def counted(x, weight, bias=None):
        calls.append(tuple(weight.shape))
        return cpu_linear.linear(x, weight, bias)

    decoder = model.head.decoder
    assert decoder.linear is cpu_linear.linear
    decoder.linear = counted
    ids, attention, labels = batch(model.config)
    vocab = (model.config.vocab_size, model.config.embedding_size)
    with torch.no_grad():
        model.eval()(ids, attention)
    assert calls == [vocab]
    model.train()(ids, attention, labels=labels).backward()
    assert calls == [vocab, vocab]
