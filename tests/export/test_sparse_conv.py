"""SparseConv and to_sparse on Conv1d/Conv2d: exactness against F.conv1d/F.conv2d, the per-layer choice, fallbacks."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.errors import InvalidArgumentError, InvalidTypeError
from hadamard_sparse.export import SparseConv, kernels, to_sparse

EPS32 = torch.finfo(torch.float32).eps
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")

# (conv type, constructor kwargs): stride, padding (ints, tuples, "same"/"valid"), dilation, padding modes.
CONV_CASES = [
    (nn.Conv1d, {"kernel_size": 3}),
    (nn.Conv1d, {"kernel_size": 5, "stride": 2, "padding": 2}),
    (nn.Conv1d, {"kernel_size": 4, "padding": "same", "dilation": 3}),
    (nn.Conv1d, {"kernel_size": 1}),
    (nn.Conv1d, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}),
    (nn.Conv1d, {"kernel_size": 10, "stride": 5, "padding": "valid"}),
    (nn.Conv2d, {"kernel_size": 3, "padding": 1}),
    (nn.Conv2d, {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}),
    (nn.Conv2d, {"kernel_size": (4, 1), "padding": "same"}),  # CREPE-style (k, 1), asymmetric 'same'
    (nn.Conv2d, {"kernel_size": 1, "stride": 2}),
    (nn.Conv2d, {"kernel_size": 3, "padding": 2, "padding_mode": "circular"}),
    (nn.Conv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "replicate", "stride": 2}),
]


def _ids(case: tuple[type, dict]) -> str:
    kind, kw = case
    return kind.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def _sparse_conv(
    kind: type, kw: dict, *, bias: bool = True, density: float = 0.2, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    conv = kind(6, 5, bias=bias, **kw).eval()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < density)
        if bias:
            conv.bias.normal_()
    return conv


def _input(kind: type, batched: bool, n: int = 3) -> torch.Tensor:
    shape = (6, 21) if kind is nn.Conv1d else (6, 11, 9)
    return torch.randn(n, *shape) if batched else torch.randn(*shape)


def _check_bound(y: torch.Tensor, x: torch.Tensor, conv: nn.Module) -> None:
    """``y`` is within the float32 forward error bound of the float64 convolution.

    Any summation order gives ``|y - ref| <= (n + 2) eps (|x| * |w| + |b|)``, ``n`` the largest
    number of nonzeros of one filter; the reference is ``F.conv1d``/``F.conv2d`` on float64
    copies (padding applied as ``nn.Conv`` does).
    """
    xd = x.double()
    w, b = conv.weight.detach().double(), conv.bias
    bd = None if b is None else b.detach().double()
    ref = conv._conv_forward(xd, w, bd)  # nn.Conv's own path: padding modes, 'same', stride, dilation
    scale = conv._conv_forward(xd.abs(), w.abs(), None if bd is None else bd.abs())
    n = int((conv.weight != 0).flatten(1).sum(1).max())
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    assert bool((err <= (n + 2) * EPS32 * scale + 1e-30).all()), float(err.max())


@pytest.mark.parametrize("case", CONV_CASES, ids=_ids)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_sparse_conv_matches_the_convolution(case: tuple[type, dict], bias: bool, batched: bool) -> None:
    kind, kw = case
    conv = _sparse_conv(kind, kw, bias=bias)
    x = _input(kind, batched)
    for layout in ("csr_kernel", "csr"):
        sc = SparseConv(conv, layout)
        with torch.inference_mode():
            _check_bound(sc(x), x, conv)
        with torch.no_grad():
            torch.testing.assert_close(sc(x), conv(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(sc.dense_weight(), conv.weight.detach())
    assert sc.density == pytest.approx(float(conv.weight.count_nonzero()) / conv.weight.numel())


# The direct kernel (kernels.csr_conv2d): odd sizes, several tiles per sample with a partial last
# one, zero padding wider than the kernel's reach, strides in the width (the strided tile fill),
# (k, 1) kernels on width-1 inputs (run as (1, k)), a 1-channel Conv1d, a non-zero padding mode.
DIRECT_CASES = [
    (nn.Conv1d, {"kernel_size": 3, "padding": 1}, (2, 7, 75)),
    (nn.Conv1d, {"kernel_size": 10, "stride": 5}, (2, 1, 203)),  # wav2vec2's first conv
    (nn.Conv1d, {"kernel_size": 3, "stride": 2, "padding": 4, "dilation": 2}, (1, 7, 50)),
    (nn.Conv2d, {"kernel_size": 3, "padding": 1}, (2, 7, 13, 11)),
    (
        nn.Conv2d,
        {"kernel_size": (3, 5), "stride": (2, 3), "padding": (2, 3), "dilation": (2, 1)},
        (2, 7, 17, 19),
    ),
    (nn.Conv2d, {"kernel_size": (9, 1), "padding": "same"}, (3, 7, 41, 1)),  # CREPE-style
    (nn.Conv2d, {"kernel_size": (4, 1), "padding": "same", "dilation": (2, 1)}, (2, 7, 40, 1)),
    (nn.Conv2d, {"kernel_size": 1}, (2, 7, 9, 8)),
    (nn.Conv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, (2, 7, 10, 12)),
]


@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: _ids(c[:2]) + "-" + "x".join(map(str, c[2])))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_direct_kernel_matches_the_convolution_and_im2col(
    case: tuple[type, dict, tuple[int, ...]], bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """csr_kernel on float32 CPU runs the direct kernel (never csr_linear), within the float32
    bound of the convolution and bit for bit equal to im2col + csr_linear (same order per output)."""
    kind, kw, shape = case
    torch.manual_seed(1)
    conv = kind(shape[1], 20, bias=bias, **kw).eval()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.3)
    x = torch.randn(*shape)
    sc = SparseConv(conv, "csr_kernel")
    with torch.inference_mode():
        sc.direct = False
        im2col = sc(x), sc(x[0])
        sc.direct = True
        with monkeypatch.context() as m:
            m.setattr(kernels, "csr_linear", None)  # the direct path does not call it
            got = sc(x), sc(x[0])
    _check_bound(got[0], x, conv)
    _check_bound(got[1], x[0], conv)
    assert torch.equal(got[0], im2col[0]) and torch.equal(got[1], im2col[1])
    assert torch.equal(got[1], got[0][0])


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(19, 40, 3, padding=1, stride=(1, 2)), (3, 19, 37, 45)),
        # K = 10: groups of 16 tiles share each pass over the output rows (3 groups per sample)
        (nn.Conv1d(1, 40, 10, stride=5), (2, 1, 5001)),
    ],
    ids=["conv2d", "conv1d-1-channel"],
)
def test_direct_kernel_same_bits_for_any_thread_count(conv: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    conv = conv.eval()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.2)
    x = torch.randn(*shape)
    sc = SparseConv(conv, "csr_kernel")
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(sc(x))
    finally:
        torch.set_num_threads(before)
    _check_bound(outs[0], x, conv)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    sc.direct = False
    with torch.inference_mode():
        assert torch.equal(sc(x), outs[0])  # im2col + csr_linear: the same bits


@pytest.mark.parametrize("layout", ["csr_kernel", "csr"])
def test_sparse_conv_channels_last_float64_and_bfloat16(layout: str) -> None:
    conv = _sparse_conv(nn.Conv2d, {"kernel_size": 3, "padding": 1})
    x = torch.randn(2, 6, 8, 7).to(memory_format=torch.channels_last)
    sc = SparseConv(conv, layout)
    with torch.inference_mode():
        _check_bound(sc(x), x, conv)
        as64 = copy.deepcopy(sc).double()
        torch.testing.assert_close(
            as64(x.double()), copy.deepcopy(conv).double()(x.double()), atol=1e-12, rtol=1e-12
        )
        bf = copy.deepcopy(sc).bfloat16()
        y = bf(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), conv(x), atol=0.05, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["csr_kernel", "csr"])
def test_sparse_conv_on_cuda(layout: str) -> None:  # pragma: no cover - needs a GPU
    conv = _sparse_conv(nn.Conv2d, {"kernel_size": 3, "padding": 1, "stride": 2}).cuda()
    x = _input(nn.Conv2d, True).cuda()
    sc = SparseConv(conv, layout)
    assert sc.crow.is_cuda and sc.values.is_cuda
    with torch.inference_mode():
        torch.testing.assert_close(sc(x), conv(x), atol=1e-4, rtol=1e-4)


@pytest.fixture
def no_kernel(tmp_path, monkeypatch) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """HADAMARD_SPARSE_KERNELS=0: the torch.sparse fallback, restored afterwards."""
    monkeypatch.setenv("HADAMARD_SPARSE_KERNELS", "0")
    monkeypatch.setenv("HADAMARD_SPARSE_CACHE", str(tmp_path))
    kernels._reset_for_tests()
    yield
    kernels._reset_for_tests()


@pytest.mark.parametrize("kind", [nn.Conv1d, nn.Conv2d])
def test_fallback_without_the_kernel_is_exact(kind: type, no_kernel: None) -> None:
    assert not kernels.kernel_status()[0]
    conv = _sparse_conv(kind, {"kernel_size": 3, "stride": 2, "padding": 1})
    x = _input(kind, True)
    sc = SparseConv(conv, "csr_kernel")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _check_bound(sc(x), x, conv)
    # the rule path without example inputs keeps convs dense; forced, the layer converts and is exact
    model, report = to_sparse(nn.Sequential(copy.deepcopy(conv)), max_density=1.0, return_report=True)
    assert isinstance(model[0], SparseConv) and report[0].layout == "csr"
    with torch.inference_mode():
        _check_bound(model(x), x, conv)


@pytest.mark.parametrize("entry", ["bias", "weight"])
def test_state_dict_with_a_wrong_shape_is_refused_like_a_conv(entry: str) -> None:
    conv = _sparse_conv(nn.Conv2d, {"kernel_size": 3, "padding": 1})
    sd = conv.state_dict()
    sd[entry] = sd[entry][:-1]
    with pytest.raises(RuntimeError, match=f"size mismatch for {entry}"):
        copy.deepcopy(conv).load_state_dict(sd)  # the reference: what nn.Conv2d says
    sc = SparseConv(conv)
    with pytest.raises(RuntimeError, match=f"size mismatch for {entry}: expected"):
        sc.load_state_dict(sd)


def test_state_dict_round_trip_deepcopy_and_save() -> None:
    conv = _sparse_conv(nn.Conv2d, {"kernel_size": 3, "padding": 1})
    sc = SparseConv(conv)
    sd = sc.state_dict()
    assert sd.keys() == conv.state_dict().keys()
    assert all(v.layout == torch.strided for v in sd.values())
    fresh = nn.Conv2d(6, 5, 3, padding=1)
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.weight, conv.weight) and torch.equal(fresh.bias, conv.bias)
    other = _sparse_conv(nn.Conv2d, {"kernel_size": 3, "padding": 1}, density=0.05, seed=1)
    sc.load_state_dict(other.state_dict(), strict=True)  # a dense checkpoint, re-sparsified
    x = _input(nn.Conv2d, True)
    with torch.inference_mode():
        torch.testing.assert_close(sc(x), other(x), atol=1e-5, rtol=1e-5)
    assert sc.values.numel() == int(other.weight.count_nonzero())
    buf = io.BytesIO()
    torch.save(sc, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(sc)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), other(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clone(x), other(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        sc.load_state_dict({"weight": torch.zeros(5, 6, 2, 2), "bias": torch.zeros(5)})


def test_sparse_conv_refusals() -> None:
    with pytest.raises(InvalidTypeError, match="nn.Conv1d or nn.Conv2d"):
        SparseConv(nn.Linear(3, 3))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="groups=2"):
        SparseConv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(InvalidArgumentError, match="layout"):
        SparseConv(nn.Conv2d(4, 4, 3), "bsr")
    sc = SparseConv(nn.Conv2d(4, 4, 3))
    with pytest.raises(InvalidArgumentError, match="4 input channels"):
        sc(torch.randn(1, 3, 8, 8))
    with pytest.raises(InvalidArgumentError, match="3-D .unbatched. or 4-D"):
        sc(torch.randn(4, 8))
    with pytest.raises(InvalidArgumentError, match="smaller than the kernel"):
        sc(torch.randn(1, 4, 2, 8))


class SmallCNN(nn.Module):
    """An audio front-end (Conv1d, wav2vec2-like) feeding a 2-D CNN, plus a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(1, 16, 10, stride=5)
        self.conv1 = nn.Conv1d(16, 16, 3, stride=2, bias=False)
        self.conv2 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, (4, 1), padding="same")
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv1(F.gelu(self.front(x))))  # (N, 16, L)
        h = F.relu(self.conv3(F.relu(self.conv2(h.unsqueeze(1)))))  # (N, 8, 16, L)
        return self.head(self.grouped(h).mean((2, 3)))


def _pruned_cnn(sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    return hs.remove_parametrizations(hs.sparsify(model, sparsity, scope="layer"))


class FakeTimer:
    """Deterministic timer: sparse candidates of ``fast`` layers win, all others lose."""

    def __init__(self, fast: set[str]) -> None:
        self.fast = fast
        self.calls: dict[str, list[str]] = {}

    def __call__(self, name: str, fns: dict) -> dict[str, float]:
        self.calls[name] = list(fns)
        for fn in fns.values():
            fn()
        win = name in self.fast
        return {c: (1.0 if c == "dense" else (0.5 if win else 2.0)) for c in fns}


def test_to_sparse_times_convs_and_reports_the_choice() -> None:
    dense = _pruned_cnn()
    x = torch.randn(2, 1, 400)
    timer = FakeTimer({"front", "conv1", "conv3"})
    model, report = to_sparse(copy.deepcopy(dense), example_inputs=x, timer=timer, return_report=True)
    by_name = {c.name: c for c in report}
    assert set(by_name) == {"front", "conv1", "conv2", "conv3", "grouped", "head"}
    assert [by_name[n].kind for n in ("front", "conv1", "conv2", "grouped")] == [
        "Conv1d",
        "Conv1d",
        "Conv2d",
        "Conv2d",
    ]
    # convs are timed dense vs the layouts a conv can run in (no BSR), on the input they received
    want = ["dense", "csr_kernel", "csr"] if kernels.kernel_status()[0] else ["dense", "csr"]
    assert timer.calls["conv1"] == want
    assert by_name["conv1"].input_shape == (2, 16, 79)
    assert by_name["conv2"].input_shape == (2, 1, 16, 39)
    for name in ("front", "conv1", "conv3"):
        assert by_name[name].layout == want[1] and by_name[name].reason == "timed"
        assert isinstance(model.get_submodule(name), SparseConv)
    assert by_name["conv2"].layout == "dense" and type(model.conv2) is nn.Conv2d
    assert by_name["grouped"].layout == "dense" and "groups=2" in by_name["grouped"].reason
    assert "grouped" not in timer.calls
    with torch.inference_mode():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.front(x[0]), dense.front(x[0]), atol=1e-5, rtol=1e-5)  # unbatched


def test_to_sparse_measured_choice_on_a_real_clock() -> None:
    dense = _pruned_cnn(0.95)
    x = torch.randn(1, 1, 400)
    model, report = to_sparse(copy.deepcopy(dense), example_inputs=x, return_report=True)
    convs = [c for c in report if c.kind.startswith("Conv") and c.name != "grouped"]
    assert len(convs) == 4 and all(c.reason.startswith("timed") and "dense" in c.seconds for c in convs)
    for c in convs:
        best = min((k for k in c.seconds if k != "dense"), key=c.seconds.__getitem__)
        ratio = c.seconds["dense"] / c.seconds[best]
        if c.reason == "timed":  # what was kept is what the clock said, by 5% either way
            assert (c.layout == best and ratio >= 1.05) or (c.layout == "dense" and ratio * 1.05 <= 1.0)
        else:  # within timing noise: the density rule decided
            assert 1 / 1.05 < ratio < 1.05 and (c.layout != "dense") == ("<=" in c.reason)
        assert isinstance(model.get_submodule(c.name), SparseConv) == (c.layout != "dense")
    with torch.inference_mode():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)


def test_rule_without_example_inputs_converts_convs_from_90_percent() -> None:
    """CONV_MAX_DENSITY: csr_kernel at density <= 0.1 (the direct kernel), csr never, denser never."""
    dense = _pruned_cnn(0.95)
    model, report = to_sparse(copy.deepcopy(dense), return_report=True)
    convs = {c.name: c for c in report if c.kind.startswith("Conv")}
    assert len(convs) == 5 and convs["grouped"].layout == "dense"
    assert all(convs[n].layout == "csr_kernel" for n in ("front", "conv1", "conv2", "conv3"))
    assert "rule: density" in convs["front"].reason
    x = torch.randn(2, 1, 400)
    with torch.inference_mode():
        _check_bound(model.front(x), x, dense.front)
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    _, report = to_sparse(copy.deepcopy(dense), "csr", return_report=True)
    assert report[1].layout == "dense" and "stays dense without example_inputs" in report[1].reason
    denser, report = to_sparse(copy.deepcopy(_pruned_cnn(0.8)), return_report=True)
    assert report[0].layout == "dense" and "> 0.100" in report[0].reason
    assert all(type(m) in (nn.Conv1d, nn.Conv2d) for n, m in denser.named_children() if n != "head")
    # an explicit max_density applies to convs too; BSR does not apply to them
    forced, report = to_sparse(copy.deepcopy(dense), "csr_kernel", max_density=1.0, return_report=True)
    assert sum(isinstance(m, SparseConv) for m in forced.modules()) == 4
    bsr, report = to_sparse(
        copy.deepcopy(dense), "bsr", max_density=1.0, blocksize=(1, 1), return_report=True
    )
    assert not any(isinstance(m, SparseConv) for m in bsr.modules())
    assert "runs sparse only as csr_kernel/csr" in {c.name: c for c in report}["conv1"].reason
    x = torch.randn(2, 1, 400)
    with torch.inference_mode():
        torch.testing.assert_close(forced(x), dense(x), atol=1e-5, rtol=1e-5)


def test_conv_subclass_overriding_forward_is_skipped() -> None:
    class Weird(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(Weird(3, 4, 3))
    _, report = to_sparse(model, max_density=1.0, return_report=True)
    assert report[0].layout == "dense" and "overrides Conv2d.forward" in report[0].reason
    assert type(model[0]) is Weird


def test_hf_wav2vec2_feature_encoder_runs_sparse() -> None:
    """A Hugging Face wav2vec2 (tiny config): its Conv1d feature encoder converts; the weight-normed
    positional conv (another library's parametrization, grouped) is left as is; outputs unchanged."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 3, 3),
        conv_stride=(5, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    torch.manual_seed(0)
    dense = transformers.Wav2Vec2Model(cfg).eval()
    convs = [n for n, m in dense.named_modules() if type(m) is nn.Conv1d]
    hs.remove_parametrizations(hs.sparsify(dense, 0.9, scope="layer", include=convs))
    wave = torch.randn(2, 4000)
    timer = FakeTimer(set(convs))
    model, report = to_sparse(copy.deepcopy(dense), example_inputs=wave, timer=timer, return_report=True)
    by_name = {c.name: c for c in report}
    assert all(isinstance(model.get_submodule(n), SparseConv) for n in convs) and len(convs) == 3
    pos = by_name["encoder.pos_conv_embed.conv"]
    assert pos.layout == "dense" and "parametrized by _WeightNorm" in pos.reason
    with torch.inference_mode():
        got, ref = model(wave).last_hidden_state, dense(wave).last_hidden_state
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
