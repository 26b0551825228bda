"""The fused linear + cross-entropy against its plain-PyTorch reference: loss and every gradient.

On the CPU the Triton kernel runs in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported: triton.language's own helpers such as tl.max
are jitted at import. Setting the variable at the top of this module would be too late whenever
another test module got triton imported first (through mlm -> kernels). So
`test_kernel_in_interpreter` runs this file again in a fresh process with the variable set; the
tests marked `interpreted` run only there (or when you set TRITON_INTERPRET=1 yourself).

Under torch.compile both paths must make one graph (fullgraph=True) that a second batch of the same
shape reuses: the fused path as a single `mlm::linear_cross_entropy` node, checked by opcheck as
well."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RUN_ENV

from mlm.kernels import linear_cross_entropy, linear_cross_entropy_ref, triton_available

# the name alone is the function
lce_module = importlib.import_module("mlm.kernels.linear_cross_entropy")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 process of test_kernel_in_interpreter"
)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING or not triton_available(), reason="needs triton; not inside it")
def test_kernel_in_interpreter():
    """This file again under TRITON_INTERPRET=1, in a process of its own (the variable is read when
    triton is first imported); with pytest-xdist it runs beside the other tests."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-n", "0"]
    env = {**RUN_ENV, "TRITON_INTERPRET": "1"}
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    # Tests marked `interpreted` cannot skip in there: exit status 0 means they all ran and passed.
    assert done.returncode == 0, (done.stdout + done.stderr)[-10000:]


def make_inputs(N, V, D, dtype, ignored=(), bias=True, weight_grad=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * D**-0.5  # logits of order 1, as after training starts
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignored)] = -100
    leaves = [
        hidden.to(device, dtype).requires_grad_(),
        weight.to(device, dtype).requires_grad_(weight_grad),
        None if b is None else b.to(device, dtype).requires_grad_(),
    ]
    return leaves, targets.to(device)


def loss_and_grads(fn, leaves, targets, **kwargs):
    """Loss, then the gradients of 2.5 * loss (a stand-in for a loss scale) w.r.t. each leaf."""
    loss = fn(*leaves, targets, **kwargs)
    with_grad = [t for t in leaves if t is not None and t.requires_grad]
    grads = (
        torch.autograd.grad(2.5 * loss, with_grad, allow_unused=True) if loss.requires_grad else []
    )
    return loss, list(grads)


# (N, V, D, chunk_size, ignored rows): primes and odd sizes. The logits buffer is V rounded up to a
# multiple of 64 wide, walked in tiles of 128 in the interpreter: V=1009 pads to 8 whole tiles,
# V=130 and 257 to a ragged last one, V=97 to one tile; V=1024 needs no padding, V=30522 is BERT's
# vocabulary. chunk None is one chunk, 8 leaves a ragged last chunk of 5.
SHAPES = [
    (37, 1009, 33, None, ()),
    (37, 1009, 33, 8, ()),
    (37, 1009, 33, 8, (0, 5, 6, 36)),
    (5, 97, 16, 2, (1,)),
    (1, 130, 7, None, ()),
    (6, 257, 12, 4, (2,)),
    (9, 1024, 16, 4, (0,)),
    (4, 30522, 8, 3, (1,)),
]


@interpreted
@pytest.mark.parametrize("N, V, D, chunk_size, ignored", SHAPES)
def test_fp32_matches_reference(N, V, D, chunk_size, ignored):
    """Against the fp64 result, the kernel's fp32 error is at most twice the fp32 reference's own
    (plus a few fp32 steps of the largest value, for elements the reference happens to get exact):
    the two sum in other orders, so either may be the closer, on any CPU."""
    leaves, targets = make_inputs(N, V, D, torch.float32, ignored)
    assert_error_within(
        2, 4 * 2**-24, leaves, targets, exact_dtype=torch.float64, chunk_size=chunk_size
    )


def assert_error_within(
    factor, floor, leaves, targets, autocast=False, exact_dtype=torch.float32, **kernel_kwargs
):
    """Against a run in exact_dtype on the same values, the kernel's largest error may be at most
    `factor` times the reference's in the leaves' own dtype (or under bf16 autocast), plus `floor`
    times the largest value."""
    exact_leaves = [
        None if t is None else t.detach().to(exact_dtype).requires_grad_(t.requires_grad)
        for t in leaves
    ]
    exact = loss_and_grads(linear_cross_entropy_ref, exact_leaves, targets)
    with torch.autocast(leaves[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        theirs = loss_and_grads(linear_cross_entropy_ref, leaves, targets)
        ours = loss_and_grads(
            linear_cross_entropy, leaves, targets, use_triton=True, **kernel_kwargs
        )

    assert ours[0].dtype == torch.float32  # the loss is accumulated and returned in fp32
    assert [g.dtype for g in ours[1]] == [
        t.dtype for t in leaves if t is not None and t.requires_grad
    ]
    names = ["loss", "hidden", "weight", "bias"]
    for name, want, our, their in zip(
        names, [exact[0], *exact[1]], [ours[0], *ours[1]], [theirs[0], *theirs[1]]
    ):
        want = want.double()
        our_err = (our.double() - want).abs().max().item()
        their_err = (their.double() - want).abs().max().item()
        assert our_err <= factor * their_err + floor * want.abs().max().item(), (
            name,
            our_err,
            their_err,
        )


@interpreted
@pytest.mark.parametrize("dtype, factor", [(torch.bfloat16, 3), (torch.float16, 2)])
def test_half_precision_error_near_pytorch(dtype, factor):
    # The usual bound is 2x, and it holds for the kernel's arithmetic (the CUDA test checks it). But
    # the interpreter casts fp32 to bf16 by truncation where GPUs round to nearest, which alone
    # doubles the error of the stored p - onehot; over 20 seeds that gives up to 2.8x, so bf16 gets
    # 3x here.
    leaves, targets = make_inputs(37, 1009, 33, dtype, ignored=(3, 4))
    assert_error_within(factor, 1e-3, leaves, targets, chunk_size=8)


@interpreted
def test_autocast_keeps_fp32_gradients():
    # The logits are bf16 under autocast while hidden and weight stay fp32; gradients must be fp32.
    leaves, targets = make_inputs(37, 1009, 33, torch.float32, ignored=(3, 4))
    assert_error_within(3, 1e-3, leaves, targets, autocast=True, chunk_size=8)  # 3x: see above


def record_needs_grad(monkeypatch):
    """The needs_grad argument of each call to the fused op: which gradients its forward
    computes."""
    calls = []
    op = lce_module._op
    monkeypatch.setattr(lce_module, "_op", lambda *args: calls.append(args[-1]) or op(*args))
    return calls


@interpreted
def test_no_bias_and_frozen_weight(monkeypatch):
    calls = record_needs_grad(monkeypatch)
    leaves, targets = make_inputs(11, 257, 9, torch.float32, bias=False, weight_grad=False)
    loss, (grad_hidden,) = loss_and_grads(
        linear_cross_entropy, leaves, targets, use_triton=True, chunk_size=4
    )
    ref_loss, (ref_grad_hidden,) = loss_and_grads(linear_cross_entropy_ref, leaves, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_grad_hidden, rtol=1e-5, atol=1e-7)
    assert calls == [[True, False, False]]  # no (V, D) gradient for the frozen weight


@interpreted
@pytest.mark.parametrize("N, ignored", [(6, range(6)), (0, ())], ids=["all-ignored", "no-rows"])
def test_nothing_to_count_gives_zero_loss_and_gradients(N, ignored):
    leaves, targets = make_inputs(N, 97, 8, torch.float32, ignored)
    runs = [
        (linear_cross_entropy, dict(use_triton=True, chunk_size=4)),
        (linear_cross_entropy_ref, {}),
    ]
    for fn, kwargs in runs:
        loss, grads = loss_and_grads(fn, leaves, targets, **kwargs)
        assert loss.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@interpreted
def test_no_grad_returns_the_same_loss(monkeypatch):
    calls = record_needs_grad(monkeypatch)
    leaves, targets = make_inputs(13, 97, 8, torch.float32, ignored=(2,))
    with torch.no_grad():
        loss = linear_cross_entropy(*leaves, targets, use_triton=True, chunk_size=4)
    assert not loss.requires_grad
    assert calls == [[False, False, False]]  # evaluation computes no gradients at all
    torch.testing.assert_close(
        loss, linear_cross_entropy_ref(*leaves, targets), rtol=1e-5, atol=1e-6
    )


def record_kernel_inputs(monkeypatch):
    """A copy of the logits buffer each launch of the kernel receives, before the kernel overwrites
    it."""
    seen = []
    launch = lce_module._softmax_minus_onehot_
    monkeypatch.setattr(
        lce_module,
        "_softmax_minus_onehot_",
        lambda logits, *a: seen.append(logits.clone()) or launch(logits, *a),
    )
    return seen


@interpreted
@pytest.mark.parametrize("V", [97, 30522, 1024])
def test_logits_rows_padded_to_a_multiple_of_64(monkeypatch, V):
    seen = record_kernel_inputs(monkeypatch)
    leaves, targets = make_inputs(3, V, 8, torch.float32)
    loss, grads = loss_and_grads(
        linear_cross_entropy, leaves, targets, use_triton=True, chunk_size=2
    )
    V_pad = -(-V // 64) * 64
    # two chunks, each row V_pad wide
    assert [tuple(t.shape) for t in seen] == [(2, V_pad), (1, V_pad)]
    assert all(torch.equal(t[:, V:], torch.full_like(t[:, V:], float("-inf"))) for t in seen)
    assert [g.shape for g in grads] == [t.shape for t in leaves]  # the padding stays inside the op


@interpreted
def test_runs_without_triton_knobs(monkeypatch):
    # triton.knobs appeared in Triton 3.4; the kernel must run on 3.0 (pyproject's floor) without
    # it.
    import triton

    monkeypatch.delattr(triton, "knobs", raising=False)
    leaves, targets = make_inputs(5, 97, 8, torch.float32, ignored=(1,))
    loss = linear_cross_entropy(*leaves, targets, use_triton=True, chunk_size=2)
    torch.testing.assert_close(
        loss, linear_cross_entropy_ref(*leaves, targets), rtol=1e-5, atol=1e-6
    )


class DeviceGuardRecorder:
    """Stands in for _on_device_of: records each guarded tensor's device, and whether a guard is
    open."""

    def __init__(self):
        self.guarded, self.depth = [], 0

    def __call__(self, t):
        self.guarded.append(t.device)
        return self

    def __enter__(self):
        self.depth += 1

    def __exit__(self, *exc):
        self.depth -= 1


def record_launches(monkeypatch, where):
    """Where each kernel launch ran: `where()` called at the moment of the launch."""
    launches = []
    jitted = lce_module._jitted_kernel()

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(where()) or jitted[grid](*args, **kwargs)

    monkeypatch.setattr(lce_module, "_jitted_kernel", Kernel)
    return launches


@interpreted
def test_each_launch_is_guarded_by_the_tensors_device(monkeypatch):
    # Triton launches on the current GPU, not the tensors' one: every launch must sit inside a guard
    # made from the logits it writes (their device is the inputs' device).
    guard = DeviceGuardRecorder()
    monkeypatch.setattr(lce_module, "_on_device_of", guard)
    launches = record_launches(monkeypatch, lambda: guard.depth)
    leaves, targets = make_inputs(5, 97, 8, torch.float32)
    linear_cross_entropy(*leaves, targets, use_triton=True, chunk_size=2)
    assert launches == [1, 1, 1]  # three chunks, each launched inside one open guard
    assert guard.guarded == [leaves[0].device] * 3


def test_device_guard_makes_the_tensors_gpu_current(monkeypatch):
    # On this CPU the guard is checked with a fake CUDA tensor and a stand-in for torch.cuda.device.
    from torch._subclasses.fake_tensor import FakeTensorMode

    made = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: made.append(device) or "guard")
    with FakeTensorMode():
        on_gpu1 = torch.empty(2, device="cuda:1")
    assert lce_module._on_device_of(on_gpu1) == "guard"
    assert made == [torch.device("cuda:1")]
    with lce_module._on_device_of(torch.empty(2)):  # CPU tensors (the interpreter) need no guard
        pass
    assert made == [torch.device("cuda:1")]


class GraphRecorder:
    """A torch.compile backend that keeps every graph Dynamo hands it, then compiles it with
    `backend`.

    With fullgraph=True a graph break is an error, so one graph after several calls also means no
    recompile; error_on_recompile makes a recompile fail at the call that caused it.
    """

    def __init__(self, backend="aot_eager"):
        self.backend = backend
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)

    def op_calls(self):
        """How many times the fused custom op appears in the graphs (as one opaque node each)."""
        op = torch.ops.mlm.linear_cross_entropy.default
        return sum(node.target is op for gm in self.graphs for node in gm.graph.nodes)


def assert_compiles_once(backend="aot_eager", device="cpu", autocast=False, **kernel_kwargs):
    """Compile the loss with fullgraph=True; run loss and backward on two batches of the same shape
    and different values, each against eager; assert one graph in all. Returns the recorder."""
    torch._dynamo.reset()
    recorder = GraphRecorder(backend)
    compiled = torch.compile(
        lambda *args: linear_cross_entropy(*args, **kernel_kwargs), backend=recorder, fullgraph=True
    )
    # Under autocast the eager fused path is the reference: the same casts should give the same
    # numbers.
    ref_fn, ref_kwargs = (
        (linear_cross_entropy, kernel_kwargs) if autocast else (linear_cross_entropy_ref, {})
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (0, 1):
            leaves, targets = make_inputs(
                37, 1009, 33, torch.float32, ignored=(3, 4), device=device, seed=seed
            )
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss, grads = loss_and_grads(compiled, leaves, targets)
                ref_loss, ref_grads = loss_and_grads(ref_fn, leaves, targets, **ref_kwargs)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            for name, grad, ref in zip(["hidden", "weight", "bias"], grads, ref_grads):
                torch.testing.assert_close(
                    grad, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item(), msg=name
                )
    assert len(recorder.graphs) == 1
    return recorder


@interpreted
def test_fused_path_compiles_to_one_graph():
    recorder = assert_compiles_once(use_triton=True, chunk_size=8)
    assert recorder.op_calls() == 1  # one opaque node: neither the chunk loop nor triton was traced


@interpreted
def test_compiled_fused_path_under_autocast_matches_eager():
    # A compiled graph runs the op with autocast off (AOTAutograd bakes the casts into the other
    # ops), so the op takes the logits dtype as an argument; without it the compiled logits would be
    # fp32.
    recorder = assert_compiles_once(autocast=True, use_triton=True, chunk_size=8)
    assert recorder.op_calls() == 1


@interpreted
@pytest.mark.parametrize(
    "bias, weight_grad", [(True, True), (False, False)], ids=["all-grads", "hidden-only"]
)
def test_custom_op_registrations(bias, weight_grad):
    # opcheck runs the op against its schema, its fake implementation (shapes, dtypes, strides, also
    # with dynamic shapes) and its autograd registration, eagerly and through AOTAutograd.
    leaves, targets = make_inputs(
        5, 97, 8, torch.float32, ignored=(1,), bias=bias, weight_grad=weight_grad
    )
    needs_grad = [t is not None and t.requires_grad for t in leaves]
    args = (*leaves, targets, -100, 2, torch.float32, needs_grad)
    torch.library.opcheck(torch.ops.mlm.linear_cross_entropy.default, args)


def test_reference_path_compiles_to_one_graph():
    recorder = assert_compiles_once()
    assert recorder.op_calls() == 0  # plain CPU takes the reference, traced like any PyTorch code


def test_dispatch_cpu_uses_reference_even_in_the_interpreter(monkeypatch):
    """use_triton=None: the fused path for CUDA tensors; CPU ones take it only when asked
    (use_triton=True)."""
    monkeypatch.setattr(
        lce_module, "_fused", lambda *args: pytest.fail("took the Triton path on CPU")
    )
    leaves, targets = make_inputs(5, 97, 8, torch.float32)
    assert torch.equal(
        linear_cross_entropy(*leaves, targets), linear_cross_entropy_ref(*leaves, targets)
    )


@interpreted
def test_the_installed_models_loss_takes_the_fused_path_in_the_interpreter(monkeypatch):
    """mlm.kernels.install reads TRITON_INTERPRET once: a CPU model's loss then runs the Triton
    kernel."""
    from mlm.kernels import install
    from mlm.model import MaskedLM, ModelConfig

    calls = []
    fused = lce_module._fused
    monkeypatch.setattr(lce_module, "_fused", lambda *args: calls.append(1) or fused(*args))
    model = MaskedLM(
        ModelConfig(vocab_size=97, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=8)
    )
    assert "linear_cross_entropy" in install(model, "cpu")
    ids = torch.randint(5, 97, (2, 7))
    model(ids, labels=ids).backward()
    assert calls == [1]


def test_forcing_triton_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(lce_module, "triton", None)
    leaves, targets = make_inputs(5, 97, 8, torch.float32)
    with pytest.raises(RuntimeError, match="needs triton"):
        linear_cross_entropy(*leaves, targets, use_triton=True)
    linear_cross_entropy(*leaves, targets)  # use_triton=None still falls back to the reference


def test_shape_mismatch_names_the_shapes():
    leaves, targets = make_inputs(5, 97, 8, torch.float32)
    with pytest.raises(ValueError, match=r"got \[\(5, 8\), \(97, 8\), \(97,\), \(4,\)\]"):
        linear_cross_entropy(*leaves, targets[:4])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRETING, reason="tests the compiled kernel, not the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    # BERT's vocabulary (not a multiple of the 4096-wide tile), several chunks and a ragged last
    # one.
    leaves, targets = make_inputs(1000, 30522, 256, dtype, ignored=range(0, 1000, 7), device="cuda")
    assert_error_within(
        2, 1e-5 if dtype == torch.float32 else 1e-3, leaves, targets, chunk_size=384
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRETING, reason="tests the compiled kernel, not the interpreter")
def test_cuda_compiles_with_inductor():
    # Inductor calls the op as an extern kernel and compiles the backward's scaling and casts around
    # it.
    recorder = assert_compiles_once(backend="inductor", device="cuda", chunk_size=16)
    assert recorder.op_calls() == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRETING, reason="tests the compiled kernel, not the interpreter")
def test_cuda_kernel_runs_on_the_tensors_gpu(monkeypatch):
    # The tensors on the last GPU while GPU 0 is current: each launch must find their GPU current.
    # With one GPU the two are the same, and this checks the guard on a real device; with two it is
    # the real test.
    gpu = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    launches = record_launches(monkeypatch, torch.cuda.current_device)
    leaves, targets = make_inputs(300, 30522, 64, torch.float32, ignored=(3,), device=gpu)
    loss, grads = loss_and_grads(
        linear_cross_entropy, leaves, targets, use_triton=True, chunk_size=128
    )
    assert launches == [gpu.index] * 3
    ref_loss, ref_grads = loss_and_grads(linear_cross_entropy_ref, leaves, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for name, grad, ref in zip(["hidden", "weight", "bias"], grads, ref_grads):
        torch.testing.assert_close(
            grad, ref, rtol=1e-3, atol=1e-5 * ref.abs().max().item(), msg=name
        )
