"""Int8 sparse linear kernels, SparseLinearInt8 and to_sparse(quantize="int8")."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.errors import InvalidArgumentError
from hadamard_sparse.export import kernels_int8 as K
from hadamard_sparse.export.sparse_int8 import PACKED_BUFFERS, SparseLinearInt8
from tests.hf_models import transformers

needs_kernel = pytest.mark.skipif(not K.int8_kernel_status()[0], reason="int8 kernel not built")


def _sparse(n: int, k: int, density: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
    if n > 3:
        w[3] = 0  # an empty row
    return w


def _reference(x: torch.Tensor, p: K.CSRWeightInt8, bias: torch.Tensor | None) -> torch.Tensor:
    # float64 reference on the dequantized weight
    y = x.double() @ p.to_dense().double().t()
    return (y if bias is None else y + bias.double()).float()


SHAPES = [(1, 1), (37, 53), (100, 200), (64, 70000), (17, 65536)]


@needs_kernel
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("lead", [(1,), (3,), (64,), (2, 5)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("plain", [False, True])
def test_kernel_matches_dequantized_reference(n, k, lead, threads, plain):
    if k > 60000 and lead == (64,):
        pytest.skip("large and slow enough with the other batches")
    w = _sparse(n, k)
    p = K.pack_csr_int8(w)
    assert p.col.dtype == (torch.uint16 if k <= 65536 else torch.int32)
    bias = torch.randn(n)
    x = torch.randn(*lead, k)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = K.csr_linear_int8(x, p, bias, activations="fp32", plain=plain)
    finally:
        torch.set_num_threads(old)
    ref = _reference(x.reshape(-1, k), p, bias).reshape(*lead, n)
    assert y.shape == ref.shape
    tol = 1e-5 * (x.abs().amax() * p.to_dense().abs().sum(1).amax() + 1)
    assert float((y - ref).abs().max()) <= float(tol)


def _lanes_to_dense(p: K.CSRWeightInt8) -> torch.Tensor:
    """Decodes the lanes form by its documented layout, independently of the kernel."""
    rows, cols = p.shape
    q = torch.zeros(-(-rows // 16) * 16, cols, dtype=torch.int64)
    nw = p.lane_cnt.shape[1]
    r = 0
    for g in range(p.lane_cnt.shape[0]):
        assert int(p.lane_ptr[g]) == r
        for w in range(nw):
            for _ in range(int(p.lane_cnt[g, w])):
                off = p.lanes[r * 128 : r * 128 + 64].long()
                val = p.lanes[r * 128 + 64 : r * 128 + 128].view(torch.int8).long()
                for b in range(64):
                    if val[b]:
                        q[g * 16 + b // 4, w * 128 + int(off[b])] += val[b]
                r += 1
    assert int(p.lane_ptr[-1]) == r and p.lanes.numel() == r * 128 + 128
    return q[:rows]


def _skewed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Every third row dense in the first window, the others sparse: padded rounds."""
    w = _sparse(n, k, 0.05, seed)
    w[::3, : min(k, 128)] = torch.randn(len(range(0, n, 3)), min(k, 128))
    return w


@pytest.mark.parametrize(
    "n,k,density", [(5, 1, 0.5), (3, 0, 0.5), (37, 130, 0.1), (16, 128, 1.0), (40, 300, 0.3), (50, 200, None)]
)
def test_lanes_form_holds_the_same_nonzeros(n, k, density):
    w = _sparse(n, k, density) if density is not None else _skewed(n, k)
    p = K.pack_csr_int8(w)
    q = torch.round(p.to_dense() / torch.where(p.scale == 0, 1.0, p.scale).unsqueeze(1)).long()
    assert torch.equal(_lanes_to_dense(p), q)
    # a round holds 4 entries per row: the rounds of (group, window) are ceil(max row count / 4)
    if density == 1.0:
        assert p.lane_cnt.tolist() == [[32]]
    if k == 0:  # no inputs: no rounds, and the kernel gives the bias
        assert p.lane_cnt.shape == (1, 0) and p.lanes.numel() == 128
        bias = torch.randn(n)
        assert torch.equal(K.csr_linear_int8(torch.randn(4, 0), p, bias), bias.expand(4, n))


@needs_kernel
@pytest.mark.parametrize("n,k", [(96, 130), (37, 64), (5, 1), (20, 70000), (16, 256), ("skewed", 300)])
@pytest.mark.parametrize("lead", [(1,), (3,), (64,), (2, 33)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_activations_within_half_step_of_reference(n, k, lead, threads):
    """activations="int8": the lanes + VNNI path where the CPU has it, else the CSR int32 tile loop."""
    w = _skewed(70, k) if n == "skewed" else _sparse(n, k)
    n = w.shape[0]
    p = K.pack_csr_int8(w)
    bias = torch.randn(n)
    x = torch.randn(*lead, k)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = K.csr_linear_int8(x, p, bias, activations="int8").reshape(-1, n)
        auto = K.csr_linear_int8(x, p, bias).reshape(-1, n)
        plain = K.csr_linear_int8(x, p, bias, activations="int8", plain=True).reshape(-1, n)
    finally:
        torch.set_num_threads(old)
    ref = _reference(x.reshape(-1, k), p, bias)
    # per-token int8 activations: half a step of max|x| / 127 per entry
    bound = (x.reshape(-1, k).abs().amax(1, keepdim=True) / 254) * p.to_dense().abs().sum(1)
    assert bool(((y - ref).abs() <= bound * 1.01 + 1e-4).all())
    if "VNNI lanes" in K.int8_kernel_status()[1]:
        assert torch.equal(auto, y)  # "auto" is the lanes path
        if lead != (1,):  # the plain int32 tile loop quantizes alike: the same sums, one rounding apart
            assert torch.allclose(y, plain, rtol=1e-6, atol=1e-5)
    else:  # "auto" keeps float32 activations
        assert bool(((auto - ref).abs() <= bound * 1e-3 + 1e-4).all())


@needs_kernel
def test_bits_do_not_depend_on_threads_and_plain_env(monkeypatch):
    w = _sparse(300, 257)
    p = K.pack_csr_int8(w)
    for m in (1, 5, 64):
        x = torch.randn(m, 257)
        torch.set_num_threads(1)
        a = K.csr_linear_int8(x, p)
        torch.set_num_threads(2)
        b = K.csr_linear_int8(x, p)
        assert torch.equal(a, b)
    monkeypatch.setenv("HADAMARD_SPARSE_INT8_PLAIN", "1")  # no VNNI path: float32 activations
    x = torch.randn(1, 257)
    assert torch.allclose(K.csr_linear_int8(x, p, activations="int8"), _reference(x, p, None), atol=1e-4)


def test_pack_quantizes_per_row_within_half_step():
    w = _sparse(20, 40, 0.5)
    p = K.pack_csr_int8(w)
    err = (p.to_dense() - w).abs()
    assert bool((err <= w.abs().amax(1, keepdim=True) / 254 * (1 + 2**-15) + 1e-12).all())
    assert int(p.values.abs().max()) == 127
    with pytest.raises(InvalidArgumentError, match="scale"):
        K.pack_csr_int8(w, torch.full((20,), 1e-3))  # round(w / scale) leaves int8
    with pytest.raises(InvalidArgumentError, match="activations"):
        K.csr_linear_int8(torch.randn(2, 40), p, activations="int4")


@needs_kernel
def test_custom_op_compiles_and_exports():
    w = _sparse(32, 48)
    mod = nn.Sequential(SparseLinearInt8.from_weight(w, torch.randn(32)))
    x = torch.randn(4, 48)
    y = mod(x)
    torch.library.opcheck(
        torch.ops.hadamard_sparse.csr_linear_int8.default,
        (
            x,
            *(getattr(mod[0], n) for n in PACKED_BUFFERS),
            mod[0].bias,
            32,
            "fp32",
            False,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )
    ep = torch.export.export(mod, (x,))
    assert any("csr_linear_int8" in str(n.target) for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), y)


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
    )
    return transformers.BertModel(cfg).eval()


@needs_kernel
def test_to_sparse_int8_bert_within_2_percent_of_fp32_sparse():
    model = hs.remove_parametrizations(hs.sparsify(_tiny_bert(), 0.9))
    ids = torch.randint(0, 100, (3, 11))
    fp32 = hs.to_sparse(copy.deepcopy(model), max_density=1.0)
    q = hs.to_sparse(model, quantize="int8", max_density=1.0)
    assert isinstance(q.encoder.layer[0].attention.self.query, SparseLinearInt8)
    assert sum(isinstance(m, SparseLinearInt8) for m in q.modules()) == 13  # 6 per layer + pooler
    with torch.inference_mode():
        a, b = fp32(ids).last_hidden_state, q(ids).last_hidden_state
    assert float((a - b).norm() / a.norm()) < 0.02


def _fake_quant_bert(**kw: object) -> nn.Module:
    model = _tiny_bert()
    hs.sparsify(model, 0.9)
    for m in model.modules():
        if isinstance(m, nn.Linear) and hs.masks(m):
            hs.register_fake_quant(m, **kw)  # type: ignore[arg-type]
    return model


@needs_kernel
def test_fake_quant_exports_with_learned_scales():
    model = _fake_quant_bert()
    with torch.no_grad():  # "fine-tune": move the weights so the scales differ from a fresh max/127
        for m in model.modules():
            if isinstance(m, nn.Linear) and hs.masks(m):
                m.parametrizations.weight.original.mul_(1.37)
    ids = torch.randint(0, 100, (2, 9))
    lin = model.encoder.layer[1].output.dense
    fq = lin.parametrizations.weight[-1]
    with torch.no_grad():
        learned = fq.scale(lin.parametrizations.weight[0](lin.parametrizations.weight.original)).reshape(-1)
        simulated_w = lin.weight.clone()
        simulated = model(ids).last_hidden_state
    q = hs.to_sparse(model, quantize="int8", max_density=1.0)
    new = q.encoder.layer[1].output.dense
    assert isinstance(new, SparseLinearInt8)
    assert torch.equal(new.scale, learned)  # read, not recomputed
    assert torch.allclose(new.dense_weight(), simulated_w, rtol=2**-23, atol=0)
    with torch.inference_mode():
        exported = q(ids).last_hidden_state
    assert torch.allclose(exported, simulated, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [({"bits": 16}, "bits=16"), ({"bits": 8, "per_channel": True}, None)],
)
def test_fake_quant_configurations(kw, match):
    model = _fake_quant_bert(**kw)
    if match is None:
        hs.to_sparse(model, quantize="int8", max_density=1.0)
        return
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidArgumentError, match=match):
        hs.to_sparse(model, quantize="int8", max_density=1.0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fake_quant_along_inputs_refused():
    lin = nn.Sequential(nn.Linear(16, 8))
    hs.sparsify(lin, 0.5)
    p = hs.register_fake_quant(lin[0])
    p.channel_dim = 1  # scales along the input dimension do not fit per-row int8
    with pytest.raises(InvalidArgumentError, match="channel_dim=1"):
        hs.to_sparse(lin, quantize="int8", max_density=1.0)
    assert isinstance(lin[0].parametrizations.weight[-1], hs.FakeQuant)


def test_fake_quant_not_last_refused():
    lin = nn.Sequential(nn.Linear(16, 8))
    hs.register_fake_quant(lin[0])
    hs.register_mask(lin[0], "weight")
    with pytest.raises(InvalidArgumentError, match="end of"):
        hs.to_sparse(lin, quantize="int8", max_density=1.0)


def test_refusals():
    model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(InvalidArgumentError, match="quantize must be None or one of"):
        hs.to_sparse(model, quantize="int4")
    with pytest.raises(InvalidArgumentError, match="layout must be 'auto' or 'csr_kernel'"):
        hs.to_sparse(model, "csr", quantize="int8")
    hs.sparsify(model, 0.5)  # a mask without FakeQuant: baked, as without quantize and as shrink does
    baked = hs.remove_parametrizations(copy.deepcopy(model))
    out = hs.to_sparse(model, quantize="int8")  # density 0.5 > 0.3: stays dense
    assert type(out[0]) is nn.Linear and not hs.masks(out) and torch.equal(out[0].weight, baked[0].weight)


@needs_kernel
def test_state_dict_dense_weight_round_trip():
    w = _sparse(24, 40)
    b = torch.randn(24)
    mod = nn.Sequential(SparseLinearInt8.from_weight(w, b, activations="fp32"))  # float activations: exact
    sd = mod.state_dict()
    assert set(sd) == {"0.weight", "0.bias"} and sd["0.weight"].dtype == torch.float32
    assert torch.equal(sd["0.weight"], mod[0].dense_weight())
    dense = nn.Sequential(nn.Linear(40, 24))
    dense.load_state_dict(sd)  # loads into the dense layer
    x = torch.randn(5, 40)
    assert torch.allclose(dense(x), mod(x), atol=1e-5)
    buf = io.BytesIO()
    torch.save(sd, buf)
    fresh = nn.Sequential(
        SparseLinearInt8.from_weight(torch.zeros(24, 40) + 0.5, torch.zeros(24), activations="fp32")
    )
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(fresh[0].values, mod[0].values) and torch.equal(fresh[0].col, mod[0].col)
    assert torch.allclose(fresh[0].scale, mod[0].scale, rtol=2**-23, atol=0)
    assert torch.allclose(fresh(x), mod(x), rtol=1e-6, atol=1e-6)
    assert copy.deepcopy(mod)[0].values.data_ptr() != mod[0].values.data_ptr()


@needs_kernel
def test_fake_quant_after_factorization_and_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    hs.factorize(model)
    hs.sparsify(model, 0.8)
    hs.register_fake_quant(model[0])
    x = torch.randn(4, 32)
    with torch.no_grad():
        simulated = model(x)
    q = hs.to_sparse(model, quantize="int8", max_density=1.0)
    assert isinstance(q[0], SparseLinearInt8) and q[0].activations == "fp32"  # what was simulated
    assert torch.allclose(q(x), simulated, rtol=1e-5, atol=1e-6)


def test_without_compiled_kernel_falls_back_to_torch_sparse(monkeypatch):
    w = _sparse(30, 50)
    p = K.pack_csr_int8(w)
    x = torch.randn(2, 3, 50)
    monkeypatch.setenv("HADAMARD_SPARSE_KERNELS", "0")
    K._reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="int8 kernel unavailable"):
            y = K.csr_linear_int8(x, p)
        assert not K.int8_kernel_status()[0]
    finally:
        monkeypatch.delenv("HADAMARD_SPARSE_KERNELS")
        K._reset_for_tests()
    ref = _reference(x.reshape(-1, 50), p, None).reshape(2, 3, 30)
    assert torch.allclose(y, ref, atol=1e-5)


@needs_kernel
def test_timed_choice_builds_int8_candidates():
    model = hs.remove_parametrizations(hs.sparsify(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), 0.9))
    seen: dict[str, type] = {}

    def timer(name, fns):  # sparse "faster" for the first layer, dense for the second
        seen[name] = type(fns["csr_kernel"].__defaults__[0])
        return {
            c: (1.0 if c == "dense" else 0.1) if name == "0" else (0.1 if c == "dense" else 1.0) for c in fns
        }

    q, report = hs.to_sparse(
        model, quantize="int8", example_inputs=torch.randn(4, 64), timer=timer, return_report=True
    )
    assert seen == {"0": SparseLinearInt8, "1": SparseLinearInt8}
    assert isinstance(q[0], SparseLinearInt8) and isinstance(q[1], nn.Linear)
    assert [c.layout for c in report] == ["csr_kernel", "dense"]


@needs_kernel
@pytest.mark.parametrize("fp32_faster", [True, False])
def test_timed_choice_picks_activations(fp32_faster, monkeypatch):
    """With example_inputs, an int8 layer on the lanes path keeps float32 activations when they time 5% faster."""
    if not K.lanes_path_available():
        pytest.skip("no lanes + VNNI path on this CPU")
    model = hs.remove_parametrizations(hs.sparsify(nn.Sequential(nn.Linear(64, 64)), 0.9))
    labels: list[set[str]] = []

    def timer(name, fns):
        labels.append(set(fns))
        fp32 = 0.1 if fp32_faster else 0.2
        return {c: {"dense": 1.0, "csr_kernel": 0.15}.get(c, fp32) for c in fns}

    x = torch.randn(4, 64)
    q, report = hs.to_sparse(
        copy.deepcopy(model), quantize="int8", example_inputs=x, timer=timer, return_report=True
    )
    assert labels[0] == {"dense", "csr_kernel", "csr_kernel/fp32-activations"}
    assert q[0].activations == ("fp32" if fp32_faster else "auto")
    assert f"activations {'fp32' if fp32_faster else 'int8'}" in report[0].reason
    assert report[0].seconds["csr_kernel"] == (0.1 if fp32_faster else 0.15)  # the chosen variant's time
    monkeypatch.setenv("HADAMARD_SPARSE_INT8_PLAIN", "1")  # no lanes path: nothing to choose
    labels.clear()
    q = hs.to_sparse(model, quantize="int8", example_inputs=x, timer=timer)
    assert labels[0] == {"dense", "csr_kernel"} and q[0].activations == "auto"
