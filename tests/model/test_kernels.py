"""The native CPU kernels against direct PyTorch computations, and each module's ``cpu`` backend
against its ``native`` (PyTorch) one."""

import platform

import pytest
import torch

from matrixinfer import kernels
from matrixinfer.config import ModelConfig
from matrixinfer.model.attention import AttentionMetadata, PagedLatentCache
from matrixinfer.model.backend import select_backend
from matrixinfer.model.layers import RotaryEmbedding
from matrixinfer.model.mla import MLA
from tests.checkpoints import tiny_config
from tests.model.helpers import run_paged_steps


def spy(monkeypatch, module, name: str) -> list:
    """Record the calls of ``module.name`` (its first argument's leading size), still calling it."""
    calls: list = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(getattr(a[0], "shape", [0])[0]) or real(*a, **k))
    return calls

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the native kernel cannot be built")


def _random_tiny_model(seed: int, **arch_kw):
    """A tiny V3 model (no MTP) with random weights of std 0.15, and its config."""
    from matrixinfer.model.deepseek import DeepseekForCausalLM

    cfg = ModelConfig.from_dict(tiny_config(**arch_kw).to_dict())
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg, with_mtp=False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    return cfg, model


def reference(q, cache, tables, q_lens, ctx_lens, rank, bs, scale):
    out, t = [], 0
    for s, (ql, cl) in enumerate(zip(q_lens, ctx_lens)):
        j = torch.arange(cl)
        keys = cache[tables[s, j // bs].long() * bs + j % bs]
        for i in range(ql):
            n = cl - ql + i + 1
            p = (q[t] @ keys[:n].T * scale).softmax(-1)
            out.append(p @ keys[:n, :rank])
            t += 1
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize("heads,rank,rope,bs", [(4, 64, 16, 16), (16, 512, 64, 3), (1, 8, 4, 64)])
def test_kernel_matches_direct_attention(heads, rank, rope, bs):
    g = torch.Generator().manual_seed(heads)
    q_lens, ctx_lens = [1, 1, 5, 70, 1, 1], [1, 64, 65, 200, 129, 63]  # chunk (64) edges, prefix + chunk
    width = max((c + bs - 1) // bs for c in ctx_lens)
    nblocks = len(q_lens) * width + 3
    dim = rank + rope
    cache = torch.randn(nblocks * bs, dim, generator=g)
    tables = torch.randperm(nblocks, generator=g)[: len(q_lens) * width].view(len(q_lens), width).to(torch.int32)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, bs)
    out = kernels.paged_mla(q, cache, meta.block_tables, meta.tok_seq, meta.tok_nkeys, rank, bs, 0.07)
    ref = reference(q, cache, tables, q_lens, ctx_lens, rank, bs, 0.07)
    assert out.shape == (sum(q_lens), heads, rank)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_kernel_rejects_bad_inputs():
    q = torch.randn(2, 4, 80)
    cache = torch.randn(64, 80)
    tables = torch.zeros(2, 4, dtype=torch.int32)
    one = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be"):
        kernels.paged_mla(q.double(), cache, tables, one, one, 64, 16, 1.0)
    with pytest.raises(ValueError, match="block_tables must be"):
        kernels.paged_mla(q, cache, tables.long(), one, one, 64, 16, 1.0)
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.paged_mla(q, torch.randn(64, 81), tables, one, one, 64, 16, 1.0)
    x, ids, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    with pytest.raises(ValueError, match="topk_ids must be"):
        kernels.moe_experts(x, ids.int(), w, torch.randn(4, 6, 8), torch.randn(4, 8, 3))
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.moe_experts(x, ids, w, torch.randn(4, 6, 8), torch.randn(4, 8, 4))
    with pytest.raises(ValueError, match="unsupported routing"):
        kernels.v3_route(torch.randn(3, 10), torch.zeros(10), 3, 1, 2, True, 1.0)


@needs_kernel
@pytest.mark.parametrize("mode,interleave", [("auto", True), ("absorbed", True), ("absorbed", False)])
def test_mla_kernel_path_matches_pytorch_path(monkeypatch, mode, interleave):
    """One MLA layer over a paged cache (a chunked prefill, then a mixed prefill + decode step)
    gives the same output and cache contents with the kernels as with the PyTorch paths."""
    cfg = ModelConfig.from_dict(tiny_config(rope_interleave=interleave).to_dict())
    assert RotaryEmbedding(cfg).interleaved is interleave
    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rope = RotaryEmbedding(cfg)
    bs = 4

    fused = spy(monkeypatch, kernels, "paged_mla")

    def run(backend: str) -> list[torch.Tensor]:
        assert select_backend(mla, backend) == {f"MLA:{backend}": 1, f"RMSNorm:{backend}": 2, f"Linear:{backend}": 5}
        cache = PagedLatentCache(1, 32, bs, cfg.kv_cache_dim)
        tables = torch.tensor([[3, 7, 1, 9, 11, 13], [2, 4, 6, 8, 10, 12]])
        outs = []
        for q_lens, ctx_lens in (([9, 6], [9, 6]), ([1, 5], [10, 11]), ([1, 1], [11, 12])):
            torch.manual_seed(sum(ctx_lens))
            x = torch.randn(sum(q_lens), cfg.hidden_size)
            pos = torch.cat([torch.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)])
            meta = AttentionMetadata.build(q_lens, ctx_lens, tables, bs, mode=mode)
            cos, sin = rope.cos_sin(pos)
            with torch.no_grad():
                outs.append(mla(x, cos, sin, rope, meta, cache))
        return outs + [cache.data]

    fast = run("cpu")
    assert len(fused) == 3  # (auto: absorbed prefill is the cheaper form for this shape)
    for a, b in zip(fast, run("native")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(fused) == 3


@pytest.fixture
def kernels_reloaded():
    """Let a test change how the kernels load; reload them afterwards as the environment says."""
    kernels.LIBRARY.forget()
    yield
    kernels.LIBRARY.forget()


def test_disabled_by_environment(monkeypatch, kernels_reloaded):
    """MATRIXINFER_KERNELS=0: nothing is built or loaded, and every module runs its PyTorch path."""
    from matrixinfer.model.deepseek import DeepseekForCausalLM

    monkeypatch.setenv("MATRIXINFER_KERNELS", "0")
    assert kernels.available() is False
    with pytest.raises(RuntimeError, match="MATRIXINFER_KERNELS=0"):
        kernels.linear(torch.zeros(1, 2), torch.zeros(2, 2))
    model = DeepseekForCausalLM(ModelConfig.from_dict(tiny_config().to_dict()), with_mtp=False)
    chosen = select_backend(model, "cpu")
    assert chosen and all(k.endswith((":native", ":torch")) for k in chosen), chosen


@needs_kernel
def test_rmsnorm_kernel_matches_pytorch(monkeypatch):
    from matrixinfer.model.layers import RMSNorm

    norm = RMSNorm(20, 1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 20) * 3
    calls = spy(monkeypatch, kernels, "rmsnorm")
    with torch.no_grad():
        slow = norm(x)  # built directly: PyTorch until a backend is chosen
        select_backend(norm, "cpu")
        fast = norm(x)
    assert calls == [3]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernels_stay_out_of_autograd(monkeypatch):
    """A module bound to the native kernels runs its PyTorch path while autograd records (the
    kernels have no backward): a loaded model can still be fine-tuned."""
    from matrixinfer.model.layers import RMSNorm

    norm = RMSNorm(16)
    select_backend(norm, "cpu")
    calls = spy(monkeypatch, kernels, "rmsnorm")
    out = norm(torch.randn(4, 16, requires_grad=True))
    assert out.grad_fn is not None and calls == []
    with torch.no_grad():
        norm(torch.randn(4, 16))
    assert calls == [4]


@needs_kernel
@pytest.mark.parametrize("n_group,topk_group,norm", [(4, 2, True), (1, 1, False), (8, 3, True)])
def test_v3_routing_kernel_matches_pytorch(monkeypatch, n_group, topk_group, norm):
    from matrixinfer.model.moe import Gate

    cfg = ModelConfig.from_dict(tiny_config(n_routed_experts=32, n_group=n_group, topk_group=topk_group,
                                            num_experts_per_tok=4, norm_topk_prob=norm).to_dict())
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    torch.nn.init.normal_(gate.e_score_correction_bias, std=0.1)
    x = torch.randn(50, cfg.hidden_size)
    calls = spy(monkeypatch, kernels, "v3_route")
    with torch.no_grad():
        slow = gate(x)
        assert select_backend(gate, "cpu") == {"Gate:cpu": 1}
        fast = gate(x)
    assert calls == [50]
    assert torch.equal(fast.topk_ids.sort(-1).values, slow.topk_ids.sort(-1).values)
    order_f, order_s = fast.topk_ids.argsort(-1), slow.topk_ids.argsort(-1)
    torch.testing.assert_close(fast.topk_weights.gather(1, order_f), slow.topk_weights.gather(1, order_s))


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 256, 128), (5, 24, 7), (13, 20, 33), (48, 64, 4096)])
def test_linear_kernel_matches_torch(m, k, n):
    """Rows not a multiple of the 4-row tile, odd outputs, K not a multiple of the vector width."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    torch.testing.assert_close(kernels.linear(x, w), torch.nn.functional.linear(x, w), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_small_batch_linear_layer_uses_kernel_only_where_it_applies(monkeypatch):
    from matrixinfer.model.layers import Linear

    calls = spy(monkeypatch, kernels, "linear")
    layer = Linear(16, 8, bias=False)
    with torch.no_grad():
        layer(torch.randn(2, 16))  # built directly: PyTorch
    assert calls == []
    assert select_backend(layer, "cpu") == {"Linear:cpu": 1}
    assert select_backend(Linear(16, 8, bias=True), "cpu") == {"Linear:native": 1}  # the kernel has no bias
    with torch.no_grad():
        for rows in (3, Linear.small_rows, Linear.small_rows + 1):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(layer(x), x @ layer.weight.T, atol=1e-5, rtol=1e-5)
    assert calls == [3, Linear.small_rows]
    layer(torch.randn(2, 16)).sum().backward()  # with gradients on: PyTorch's path, which has a backward
    assert layer.weight.grad is not None and calls == [3, Linear.small_rows]


@needs_kernel
@pytest.mark.parametrize("arch_kw", [{}, {"n_group": 1, "topk_group": 1, "n_shared_experts": 0}])
def test_native_decoder_layers_match_the_per_operator_path(monkeypatch, arch_kw):
    """Whole layers in one native call == the per-operator kernels == PyTorch: hidden states and
    cache contents over a prefill chunk and decode steps (dense first layer, MoE layers with and
    without shared experts)."""
    from matrixinfer.kernels import layer as native_layer

    cfg, model = _random_tiny_model(3, **arch_kw)
    calls = spy(monkeypatch, native_layer.DecoderLayer, "__call__")
    bs, tables = 4, torch.tensor([[3, 7, 1, 9, 11, 13], [2, 4, 6, 8, 10, 12]])

    def run(backend: str, layers: str) -> list[torch.Tensor]:
        select_backend(model, backend)
        for block in model.model.layers:
            block.use_backend(layers)
        cache = PagedLatentCache(model.num_cache_layers, 16, bs, cfg.kv_cache_dim)
        steps = [([9, 6], [9, 6]), ([1, 1], [10, 7]), ([1, 1], [11, 8])]
        return run_paged_steps(model, cache, tables, steps, mode="absorbed") + [cache.data.clone()]

    fast = run("cpu", "cpu")
    assert len(calls) == 3 * cfg.num_hidden_layers
    for other in (run("cpu", "native"), run("native", "native")):
        for a, b in zip(fast, other):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert len(calls) == 3 * cfg.num_hidden_layers


@needs_kernel
def test_int8_copy_of_a_decoder_layer_reads_int8_projections_and_stays_close():
    """A layer's INT8 copy (what MTP drafts run) computes its projections and experts as W8A8: the
    hidden states and cached latents of a prefill chunk and decode steps differ from the float32
    layers' (so the INT8 weights are what it reads) by about INT8's rounding, not more."""
    from matrixinfer.kernels.layer import INT8_WEIGHTS

    cfg, model = _random_tiny_model(5)
    select_backend(model, "cpu")
    tables = torch.tensor([[3, 7, 1, 9, 11, 13], [2, 4, 6, 8, 10, 12]])

    def run() -> list[torch.Tensor]:
        cache = PagedLatentCache(model.num_cache_layers, 16, 4, cfg.kv_cache_dim)
        steps = [([9, 6], [9, 6]), ([1, 1], [10, 7]), ([1, 1], [11, 8])]
        return run_paged_steps(model, cache, tables, steps, mode="absorbed") + [cache.data.clone()]

    exact = run()
    seen: set[str] = set()
    for block in model.model.layers:
        float_layer = block.native
        assert float_layer is not None
        block.native = float_layer.int8_copy()
        names = set(float_layer.dims.weight_shapes()) & set(INT8_WEIGHTS)
        assert set(block.native.int8) == names
        seen |= names
        for name, (q, scale) in block.native.int8.items():
            w = dict((n, t) for n, t, _ in float_layer._weights)[name]
            assert q.dtype is torch.int8 and q.shape == w.shape and scale.shape == w.shape[:-1]
    assert seen == set(INT8_WEIGHTS)  # a dense layer and MoE layers with shared experts
    approx = run()
    for a, b in zip(exact, approx):
        err = (a - b).norm() / a.norm()
        assert 0 < err < 0.05, err


@needs_kernel
def test_argmax_rows_matches_torch_including_ties_and_infinities():
    x = torch.randn(7, 300)
    x[1, [5, 17]] = 10.0  # a tie: the first index wins, as torch.argmax
    x[2] = float("-inf")
    x[3, 299] = float("inf")
    x[4] = 0.0
    assert kernels.argmax_rows(x).tolist() == x.argmax(-1).tolist()


def test_bindings_come_from_the_header():
    """Every function and struct of matrixinfer.h is bound with the C types it declares (pointers
    take addresses as ints; struct pointers their struct), with no list kept by hand."""
    import ctypes

    header = kernels.LIBRARY.header
    assert header.functions["mi_linear"] == (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
    restype, argtypes = header.functions["mi_decoder_layer"]
    layer, step = header.structs["MiLayer"], header.structs["MiStep"]
    assert restype is ctypes.c_int and argtypes[:2] == [ctypes.POINTER(layer), ctypes.POINTER(step)]
    assert [n for n, _ in step._fields_] == ["cos", "sin", "slots", "block_tables", "tok_seq", "tok_nkeys",
                                            "bt_stride", "block_size"]
    assert dict(layer._fields_)["eps"] is ctypes.c_float and dict(layer._fields_)["cache"] is ctypes.c_void_p
    exported = {"mi_decoder_layer", "mi_linear", "mi_rmsnorm", "mi_v3_route", "mi_argmax_rows", "mi_moe_experts",
                "mi_paged_mla", "mi_mla_q_prolog", "mi_mla_kv_prolog", "mi_quantize_rows", "mi_linear_w8a8",
                "mi_moe_experts_w8a8", "mi_mtp_draft", "mi_bind_team", "mi_model_step", "mi_spec_step"}
    assert set(header.functions) == exported


def test_header_parser_rejects_what_it_cannot_bind(tmp_path):
    from matrixinfer.native_build import HeaderError, parse_header

    good = tmp_path / "good.h"
    good.write_text("#include <stdint.h>\n/* a comment; with a semicolon */\n"
                    "typedef struct { const float *a, *b; int64_t n; } Pair;\n"
                    "int sum(const Pair *p, PyObject *o, Py_ssize_t k); // trailing\nvoid nothing(void);\n")
    h = parse_header(good)
    assert [n for n, _ in h.structs["Pair"]._fields_] == ["a", "b", "n"]
    assert h.functions["nothing"] == (None, [])
    import ctypes
    assert h.functions["sum"][1][1:] == [ctypes.py_object, ctypes.c_ssize_t]
    for bad in ("void f(long double x);", "void f(int (*cb)(int));", "typedef struct { unsigned long x; } S;"):
        (tmp_path / "bad.h").write_text(bad)
        with pytest.raises(HeaderError, match="bad.h"):
            parse_header(tmp_path / "bad.h")


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.machine() == "x86_64"),
                    reason="the kernels link glibc's libmvec (x86-64 Linux)")
def test_kernels_build_wherever_there_is_a_compiler():
    """A kernel build broken by a source or header change fails here, instead of every kernel test
    skipping quietly."""
    from matrixinfer import envs
    from matrixinfer.native_build import compiler

    if compiler() is None or not envs.kernels_enabled():
        pytest.skip("no C compiler, or MATRIXINFER_KERNELS=0")
    assert kernels.available()


def test_a_native_library_is_built_and_loaded_once_per_process(tmp_path, monkeypatch):
    """The one loader kernels and EMS share: many first callers at once get one library, a
    disabled library is never built, and forget() makes the next call decide again."""
    import threading

    from matrixinfer.native_build import NativeLibrary, compiler

    if compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("MATRIXINFER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "twice.h").write_text("#include <stdint.h>\nint64_t twice(int64_t x);\n")
    (tmp_path / "twice.c").write_text('#include "twice.h"\nint64_t twice(int64_t x) { return 2 * x; }\n')
    on = [True]
    lib = NativeLibrary("twice", "test", [tmp_path / "twice.c"], tmp_path / "twice.h",
                        ["-shared", "-fPIC", "-Werror=missing-prototypes"], enabled=lambda: on[0], fallback="none")
    got = []
    threads = [threading.Thread(target=lambda: got.append(lib.load())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(g) for g in got}) == 1 and got[0].twice(21) == 42
    assert len(list((tmp_path / "cache" / "test").glob("*.so"))) == 1
    lib.forget()
    on[0] = False
    assert lib.load() is None


@needs_kernel
@pytest.mark.parametrize("k", [64, 20])  # the vector path, and the portable one (k not a multiple of 8)
def test_linear_and_experts_give_each_row_the_same_bits_in_any_batch(k):
    """A row's result must not depend on the rows beside it (1-3 row tiles against the 4-row one):
    a speculative step's verification rows must match the plain step's single row bit for bit,
    or greedy outputs with speculation could differ from those without."""
    torch.manual_seed(0)
    x, w = torch.randn(9, k), torch.randn(37, k)
    alone = torch.cat([kernels.linear(x[i:i + 1], w) for i in range(9)])
    for m in range(2, 10):
        assert torch.equal(kernels.linear(x[:m], w), alone[:m]), m
    e, inter = 4, 6
    gate_up, down = torch.randn(e, 2 * inter, k), torch.randn(e, k, inter)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [0, 1], [2, 3], [0, 1]])  # 1 to 7 rows per expert
    weights = torch.rand(7, 2)
    alone = torch.cat([kernels.moe_experts(x[i:i + 1], ids[i:i + 1], weights[i:i + 1], gate_up, down)
                       for i in range(7)])
    for m in range(2, 8):
        assert torch.equal(kernels.moe_experts(x[:m], ids[:m], weights[:m], gate_up, down), alone[:m]), m


@needs_kernel
def test_one_call_model_step_equals_the_per_layer_path(monkeypatch):
    """The runner's one-call step (``mi_model_step``: embedding, every layer, final norm, head) gives
    bit for bit the hidden states, logits and cache contents of one native call per layer plus the
    PyTorch glue, over a prompt chunk (this tiny model attends to prompts in the absorbed form too),
    decode steps and a verification-shaped step (query length 3) of two sequences."""
    from matrixinfer.config import EngineConfig
    from matrixinfer.engine.model_runner import ModelRunner
    from matrixinfer.engine.sampling_params import SamplingParams
    from matrixinfer.engine.sequence import Sequence
    from matrixinfer.kernels import layer as native_layer

    cfg, model = _random_tiny_model(7)
    select_backend(model, "cpu")
    assert model.native_model_step() is not None
    one_calls: list[int] = []
    real = native_layer.ModelStep.__call__
    monkeypatch.setattr(native_layer.ModelStep, "__call__",
                        lambda self, step, ids, *a: one_calls.append(ids.shape[0]) or real(self, step, ids, *a))
    g = torch.Generator().manual_seed(1)

    def run(one_call: bool) -> list[torch.Tensor]:
        runner = ModelRunner(model, EngineConfig(device="cpu", dtype="float32", kv_cache_memory=1 << 20,
                                                 block_size=4), torch.device("cpu"))
        if not one_call:
            monkeypatch.setattr(runner, "_one_call", lambda *a: None)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 6)]
        seqs = [Sequence(f"s{i}", p, SamplingParams(max_tokens=8)) for i, p in enumerate(prompts)]
        for i, s in enumerate(seqs):
            s.block_table = [3 + i, 9 + i, 1 + 2 * i, 13 + i, 15 + 2 * i]
        outs = []
        # the prompts, then two decode steps, then a verification of two drafts for each
        for step in ([(s, s.num_tokens) for s in seqs], [(s, 1) for s in seqs], [(s, 1) for s in seqs],
                     [(s, 3) for s in seqs]):
            drafts = {s.request_id: [5, 6] for s, n in step if n == 3}
            rows = list(range(sum(n for _, n in step)))
            hidden, _, logits = runner.run(step, drafts, rows)
            outs += [hidden, logits]
            for s, n in step:
                s.num_computed += n - len(drafts.get(s.request_id, []))
                s.output_ids.append(int(torch.randint(0, cfg.vocab_size, (), generator=g)))
        return outs + [runner.kv_cache.data.clone()]

    state = g.get_state()
    fast = run(True)
    assert one_calls == [15, 2, 2, 6]
    g.set_state(state)
    slow = run(False)
    assert len(one_calls) == 4
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
