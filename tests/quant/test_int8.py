"""INT8 arithmetic: the quantizers, the W8A8 GEMM, rotations, and the native kernels against the
PyTorch definitions the quantizer calibrates with."""

import pytest
import torch

from matrixinfer import kernels
from matrixinfer.model.experts import Int8Experts, Routing
from matrixinfer.quant.int8 import (
    dequantize_weight,
    fake_quant_rows,
    hadamard,
    quantize_rows,
    quantize_weight,
    rotate,
    rotation_block,
    w8a8_linear,
)

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the native kernels cannot be built")


def test_per_token_quantization_bounds_the_error_by_half_a_step():
    x = torch.randn(16, 96) * torch.logspace(-2, 2, 16)[:, None]
    x[3] = 0.0
    q, s = quantize_rows(x)
    assert q.dtype is torch.int8 and int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q[3], torch.zeros(96, dtype=torch.int8)) and s[3] == 0
    err = (q.float() * s[:, None] - x).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6 * s[:, None]).all())


def test_weight_clipping_saturates_the_largest_values():
    w = torch.randn(8, 64)
    q1, s1 = quantize_weight(w, 1.0)
    q9, s9 = quantize_weight(w, 0.9)
    assert torch.allclose(s9, 0.9 * s1)
    big = w.abs() == w.abs().amax(dim=1, keepdim=True)
    assert bool((q9[big].abs() == 127).all())
    assert (dequantize_weight(q1, s1) - w).abs().max() <= s1.max() / 2 + 1e-6


def test_w8a8_linear_is_close_to_the_float_product():
    torch.manual_seed(0)
    x, w = torch.randn(10, 128), torch.randn(48, 128) * 0.1
    q, s = quantize_weight(w)
    y = w8a8_linear(x, q, s, bias=torch.ones(48))
    ref = x @ w.T + 1
    assert (y - ref).norm() / (ref - 1).norm() < 0.02
    pre = torch.rand(128) + 0.5
    q2, s2 = quantize_weight(w / pre)  # the input is multiplied by pre at run time, the weight divided
    y2 = w8a8_linear(x, q2, s2, pre_scale=pre)
    assert (y2 - (ref - 1)).norm() / (ref - 1).norm() < 0.02


def test_hadamard_rotation_is_orthonormal_and_self_inverse():
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-5)
    x, w = torch.randn(5, 192), torch.randn(7, 192)
    assert rotation_block(192) == 64 and rotation_block(96, 32) == 32
    assert torch.allclose(rotate(x, 64) @ rotate(w, 64).T, x @ w.T, atol=1e-4)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(64, 128)
    x[:, 5] *= 50  # one outlier channel: per-token quantization loses the rest
    plain = (fake_quant_rows(x) - x).norm()
    rotated = (rotate(fake_quant_rows(rotate(x, 128)), 128) - x).norm()
    assert rotated < plain / 3


@needs_kernel
def test_native_row_quantization_is_bit_exact():
    x = torch.randn(9, 200) * 3
    x[2] = 0.0
    x[4, :] = 0.5  # exact halves after scaling: round half to even on both sides
    mul = torch.rand(200) + 0.5
    for m in (None, mul):
        q, s = kernels.quantize_rows(x, m)
        q_ref, s_ref = quantize_rows(x if m is None else x * m)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 256, 512), (3, 64, 33), (7, 40, 8), (64, 512, 130), (5, 1408, 96)])
def test_native_w8a8_linear_matches_the_definition(m, k, n):
    torch.manual_seed(m * k + n)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    q, s = quantize_weight(w)
    bias, pre = torch.randn(n), torch.rand(k) + 0.5
    for b, p in ((None, None), (bias, pre)):
        got = kernels.linear_w8a8(x, q, s, b, p)
        want = w8a8_linear(x, q, s, b, p)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 256, 80), (2, 40, 13), (3, 200, 9), (9, 128, 37), (64, 48, 24)])
def test_native_w8a8_integer_products_are_exact(m, k, n):
    """Rows whose largest value is 127 quantize to their rounded values with scale 1, so with unit
    weight scales the output is the integer product itself: every tile shape, the k tails past the
    vector loop and round-half-to-even on exact halves, checked to the last bit."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randint(-127, 128, (m, k), generator=g).float()
    x[:, 0] = 127.0
    x[:, 1:k:7] += 0.5  # halves: 2.5 -> 2, 3.5 -> 4 (and -2.5 -> -2)
    x[:, 1:k:7].clamp_(-127, 127)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    want = torch.round(x).double() @ wq.double().T  # torch.round rounds half to even
    for layer in (kernels.linear_w8a8, lambda x, w, s: kernels.LinearW8A8(w, s)(x)):
        got = layer(x, wq, torch.ones(n))
        assert torch.equal(got.double(), want)
    bias = torch.randn(n)
    assert torch.equal(kernels.linear_w8a8(x, wq, torch.ones(n), bias), want.float() + bias)


@needs_kernel
# whole 16-wide steps, and a tail past them; a team that quantizes its rows itself (n = 203) and one
# whose calling thread quantizes them first (n = 600: many columns a thread)
@pytest.mark.parametrize("k,n", [(256, 203), (40, 600)])
def test_native_w8a8_gives_each_row_the_same_bits_in_any_batch_and_team(k, n):
    """A row's result must not depend on the rows beside it (4 x 2, 2 x 4 and 1 x 8 tiles) nor on
    how many threads shared the call: a speculative step's verification rows must match the plain
    step's single row bit for bit, and a served model must not change its outputs with the thread
    count."""
    torch.manual_seed(k)
    x, w = torch.randn(37, k), torch.randn(n, k) * 0.05
    q, s = quantize_weight(w)
    bias, pre = torch.randn(n), torch.rand(k) + 0.5
    layer = kernels.LinearW8A8(q, s, bias, pre)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(37)])
        for m in (2, 3, 4, 5, 6, 7, 8, 9, 37):
            assert torch.equal(layer(x[:m]), alone[:m]), m
        torch.set_num_threads(2)  # 37 x k x n multiply-adds: a team of two (linear_w8a8.c)
        assert torch.equal(layer(x), alone)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_native_w8a8_rejects_bad_operands():
    q, s = quantize_weight(torch.randn(8, 16))
    with pytest.raises(ValueError, match="weight must be a contiguous CPU torch.int8"):
        kernels.linear_w8a8(torch.randn(2, 16), q.float(), s)
    with pytest.raises(ValueError, match="x has 12 columns"):
        kernels.linear_w8a8(torch.randn(2, 12), q, s)
    with pytest.raises(ValueError, match="bias has shape"):
        kernels.linear_w8a8(torch.randn(2, 16), q, s, torch.zeros(9))


def _int8_experts(n_experts=6, hidden=64, inter=40, extras=False, seed=0):
    torch.manual_seed(seed)
    ex = Int8Experts(n_experts, hidden, inter, bias=extras, pre_quant_scale=extras)
    gq, gs = quantize_weight(torch.randn(n_experts, 2 * inter, hidden) * 0.1)
    dq, ds = quantize_weight(torch.randn(n_experts, hidden, inter) * 0.1)
    ex.gate_up_proj.copy_(gq)
    ex.gate_up_proj_scale.copy_(gs)
    ex.down_proj.copy_(dq)
    ex.down_proj_scale.copy_(ds)
    if extras:
        ex.gate_up_proj_bias.normal_()
        ex.down_proj_bias.normal_()
        ex.gate_up_proj_pre_quant_scale.uniform_(0.5, 2)
        ex.down_proj_pre_quant_scale.uniform_(0.5, 2)
    return ex


@needs_kernel
@pytest.mark.parametrize("tokens,extras", [(1, False), (7, True), (40, False), (40, True)])
def test_native_int8_experts_match_the_torch_backend(tokens, extras):
    ex = _int8_experts(extras=extras)
    x = torch.randn(tokens, 64)
    ids = torch.stack([torch.randperm(6)[:2] for _ in range(tokens)])
    routing = Routing(ids, torch.rand(tokens, 2))
    ex.use_backend("int8-torch")
    want = ex(x, routing)
    ex.use_backend("int8-cpu-native")
    got = ex(x, routing)
    # The SwiGLU output is re-quantized: a float rounding difference may move a value across a
    # rounding boundary (one step of 1/127 of its row's range), so compare relative to the output.
    assert (got - want).norm() / want.norm() < 2e-3
    ref = sum(routing.topk_weights[:, j:j + 1] * torch.stack([ex.expert(int(e), x[t:t + 1])[0]
                                                                for t, e in enumerate(ids[:, j])]) for j in range(2))
    assert (want - ref).norm() / ref.norm() < 1e-5


@needs_kernel
def test_int8_experts_backends_refuse_float_experts_and_vice_versa():
    from matrixinfer.model.experts import BackendUnavailable, Experts

    with pytest.raises(BackendUnavailable):
        Experts(4, 8, 6).use_backend("int8-cpu-native")
    with pytest.raises(BackendUnavailable):
        _int8_experts().use_backend("cpu-native")
    with pytest.raises(BackendUnavailable):
        _int8_experts().use_backend("torch")
