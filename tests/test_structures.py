"""Mask structures (rows, columns, N:M, blocks): exact counts and patterns against brute-force references."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import hadamard_sparse as hs
from hadamard_sparse._engine import compute_keep_masks
from hadamard_sparse.api import masks, sparsify
from hadamard_sparse.structures import NM, Block, Channels, parse_structure
from tests.conftest import Conv1D, MHAWrap, RNNWrap, mlp

# ----------------------------------------------------------------------------------------------
# Layer table and independent references
# ----------------------------------------------------------------------------------------------

# (id, make, input). Input sizes are multiples of 8 so that 2:4 and 4:8 both apply.
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], torch.Tensor]]] = [
    ("linear", lambda: nn.Linear(16, 6), lambda: torch.randn(3, 16)),
    ("conv2d", lambda: nn.Conv2d(8, 4, 3, padding=1), lambda: torch.randn(2, 8, 5, 5)),
    ("conv2d_groups", lambda: nn.Conv2d(16, 4, 3, groups=2), lambda: torch.randn(2, 16, 5, 5)),
    ("convT2d", lambda: nn.ConvTranspose2d(8, 6, 3, stride=2), lambda: torch.randn(2, 8, 4, 4)),
    ("hf_conv1d", lambda: Conv1D(6, 16), lambda: torch.randn(2, 3, 16)),
    (
        "lstm_proj",
        lambda: RNNWrap(nn.LSTM(8, 16, proj_size=8, batch_first=True)),
        lambda: torch.randn(2, 3, 8),
    ),
    ("mha", lambda: MHAWrap(True), lambda: torch.randn(2, 4, 8)),
]
CASE_IDS = [c[0] for c in CASES]


def _dims(module: nn.Module) -> tuple[int, int]:
    """(out_dim, in_dim) written out independently of the library: transposed layouts first."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) or isinstance(module, Conv1D):
        return 1, 0
    return 0, 1


def _owner(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    mod_name, _, tname = qualified.rpartition(".")
    return model.get_submodule(mod_name), tname


def _dense(model: nn.Module, qualified: str) -> np.ndarray:
    mod, tname = _owner(model, qualified)
    w = (
        mod.parametrizations[tname].original
        if parametrize.is_parametrized(mod, tname)
        else getattr(mod, tname)
    )
    return w.detach().double().numpy()


def _group_norm(g: np.ndarray, norm: str) -> float:
    g = g.astype(np.float64).ravel()
    if norm == "l1":
        return float(np.abs(g).sum() / g.size)
    return float(math.sqrt((g**2).sum() / g.size))


def _lowest(scores: list[float], k: int) -> set[int]:
    """Indices of the k lowest scores; ties to the lower index (a plain sort, no selection trick)."""
    return set(sorted(range(len(scores)), key=lambda j: (scores[j], j))[:k])


def _ref_channels(ws: list[np.ndarray], dims: list[int], s: float, norm: str, scope: str) -> list[np.ndarray]:
    """Full-shape keep masks: whole slices along dims[i] pruned by normalised norm."""
    scores = [[_group_norm(np.take(w, j, axis=d), norm) for j in range(w.shape[d])] for w, d in zip(ws, dims)]
    if scope == "global":
        flat = [x for sc in scores for x in sc]
        pruned = _lowest(flat, round(s * len(flat)))
        offsets = np.cumsum([0] + [len(sc) for sc in scores])
        per = [{j - offsets[i] for j in pruned if offsets[i] <= j < offsets[i + 1]} for i in range(len(ws))]
    else:
        per = [_lowest(sc, round(s * len(sc))) for sc in scores]
    out = []
    for w, d, p in zip(ws, dims, per):
        keep = np.ones(w.shape, dtype=bool)
        for j in p:
            idx = [slice(None)] * w.ndim
            idx[d] = j
            keep[tuple(idx)] = False
        out.append(keep)
    return out


def _ref_blocks(w: np.ndarray, od: int, idim: int, r: int, c: int, s: float, norm: str) -> np.ndarray:
    x = np.moveaxis(w, (od, idim), (0, 1))
    o, i = x.shape[:2]
    x = x.reshape(o, i, -1)
    coords, scores = [], []
    for bi in range(o // r):
        for bj in range(i // c):
            coords.append((bi, bj))
            scores.append(_group_norm(x[bi * r : (bi + 1) * r, bj * c : (bj + 1) * c, :], norm))
    keep2d = np.ones((o, i), dtype=bool)
    for j in _lowest(scores, round(s * len(scores))):
        bi, bj = coords[j]
        keep2d[bi * r : (bi + 1) * r, bj * c : (bj + 1) * c] = False
    moved_shape = (o, i, *w.shape[2:]) if w.ndim > 2 else (o, i)
    full = np.broadcast_to(keep2d.reshape(o, i, *([1] * (w.ndim - 2))), moved_shape)
    return np.moveaxis(full, (0, 1), (od, idim))


def _ref_nm(w: np.ndarray, idim: int, n: int, m: int) -> np.ndarray:
    """Every group of m consecutive entries along idim keeps all but its n smallest |w|."""
    x = np.moveaxis(np.abs(w), idim, -1)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    keep = np.ones(flat.shape, dtype=bool)
    for row in range(flat.shape[0]):
        for g in range(0, flat.shape[1], m):
            for j in _lowest([flat[row, g + t] for t in range(m)], n):
                keep[row, g + j] = False
    return np.moveaxis(keep.reshape(shape), -1, idim)


def _twin_forward_matches(model: nn.Module, twin: nn.Module, x: torch.Tensor) -> None:
    """The model's forward equals the dense twin with each weight multiplied by its expanded mask."""
    with torch.no_grad():
        for name, m in masks(model).items():
            mod, tname = _owner(twin, name)
            getattr(mod, tname).mul_(m)
        torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Parsing and refusals
# ----------------------------------------------------------------------------------------------


def test_parse_structure_strings_and_objects() -> None:
    assert parse_structure(None) is None
    assert parse_structure("row") == Channels("row") == parse_structure("out_channel")
    assert parse_structure("column") == Channels("in_channel") == parse_structure("in_channel")
    assert parse_structure("2:4") == NM(2, 4)
    assert parse_structure(" 4 : 8 ") == NM(4, 8)
    b = Block(4, 2, norm="l1")
    assert parse_structure(b) is b
    assert NM(2, 4).max_sparsity == 0.5 and Channels().max_sparsity == 1.0


@pytest.mark.parametrize(
    ("structure", "exc", "match"),
    [
        ("3:2", ValueError, r"1 <= N < M, got N=3, M=2"),
        ("4:4", ValueError, r"1 <= N < M"),
        ("0:4", ValueError, r"1 <= N < M"),
        ("a:b", ValueError, r"structure must be one of .*'2:4'.*got 'a:b'"),
        ("rows", ValueError, r"got 'rows'"),
        (3, TypeError, r"structure must be one of .*got 3"),
    ],
)
def test_bad_structure_strings(structure: object, exc: type, match: str) -> None:
    model = mlp()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        sparsify(model, 0.5, structure=structure)  # type: ignore[arg-type]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: Block(0, 2), ValueError, "rows must be a positive int, got 0"),
        (lambda: Block(2, 1.5), TypeError, "cols must be a positive int, got 1.5"),
        (lambda: Block(True, 2), TypeError, "rows must be a positive int, got True"),
        (lambda: Block(2, 2, norm="l3"), ValueError, r"norm must be one of \['l1', 'l2'\], got 'l3'"),
        (lambda: Channels("diagonal"), ValueError, r"axis must be one of .*got 'diagonal'"),
        (lambda: NM(4, 2), ValueError, "1 <= N < M"),
    ],
)
def test_bad_structure_objects(make: Callable[[], object], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    ("model_fn", "kwargs", "match"),
    [
        (
            lambda: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6)),
            {"structure": Block(4, 4)},
            r"1\.weight .*4x4",
        ),
        (lambda: nn.Sequential(nn.Linear(6, 8)), {"structure": "2:4"}, r"0\.weight .*size 6.*M=4"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 8, 3)),
            {"structure": "2:4"},
            r"input dimension \(dim 1, size 3\)",
        ),
        (
            lambda: nn.Sequential(nn.Linear(8, 8)),
            {"structure": "2:4", "sparsity": 0.7},
            r"at most 0\.5 .*got 0\.7",
        ),
        (lambda: nn.Sequential(nn.Linear(8, 8)), {"structure": "row", "sparsity": 1.5}, r"sparsity must be"),
    ],
)
def test_refusals_leave_model_unchanged(model_fn: Callable[[], nn.Module], kwargs: dict, match: str) -> None:
    model = model_fn()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        sparsify(model, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_block_error_lists_every_bad_tensor_and_exclude_fixes_it() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"2 tensor\(s\).*\n.*1\.weight.*\n.*2\.weight"):
        sparsify(model, 0.5, structure=Block(4, 4))
    sparsify(model, 0.5, structure=Block(4, 4), exclude=["1.*", "2.*"])
    assert set(masks(model)) == {"0.weight"}


# ----------------------------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)], ids=lambda t: f"{t[0]}:{t[1]}")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_nm_pattern_against_brute_force(case: tuple, nm: tuple[int, int]) -> None:
    _, make, inp = case
    n, m = nm
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    sparsify(model, structure=f"{n}:{m}")  # sparsity defaults to N/M
    mk = masks(model)
    assert mk
    for name, mask in mk.items():
        mod, tname = _owner(model, name)
        _, idim = _dims(mod)
        assert mask.shape == getattr(mod, tname).shape  # N:M is stored full shape
        ref = _ref_nm(_dense(model, name), idim, n, m)
        np.testing.assert_array_equal(mask.numpy(), ref, err_msg=name)
        # The rule itself: exactly n zeros in every m consecutive inputs.
        groups = mask.movedim(idim, -1).reshape(-1, m)
        assert torch.all((~groups).sum(1) == n), name
    rep = hs.sparsity_report(model)
    for name in mk:
        assert rep[name].zeros == rep[name].numel * n // m
    _twin_forward_matches(model, twin, inp())


def test_nm_conv_is_nm_in_the_channels_last_gemm_view() -> None:
    """Conv N:M runs along input channels, so the (out, kh*kw*in) channels-last matrix is 2:4 row-wise."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    sparsify(conv, structure="2:4")
    w = conv.weight.detach()
    gemm = w.permute(0, 2, 3, 1).reshape(4, -1)
    assert torch.all((gemm.reshape(4, -1, 4) == 0).sum(-1) == 2)
    # and along the input channels at each kernel position
    assert torch.all((w.reshape(4, 2, 4, 3, 3) == 0).sum(2) == 2)


@pytest.mark.parametrize(
    ("make", "x", "fn"),
    [
        (lambda: nn.Linear(16, 4), torch.randn(3, 16), lambda mod, x, w: F.linear(x, w, mod.bias)),
        (
            lambda: nn.Conv2d(8, 4, 3, padding=1),
            torch.randn(2, 8, 6, 6),
            lambda mod, x, w: F.conv2d(x, w, mod.bias, padding=1),
        ),
        (
            lambda: nn.ConvTranspose2d(8, 4, 3, stride=2),
            torch.randn(2, 8, 4, 4),
            lambda mod, x, w: F.conv_transpose2d(x, w, mod.bias, stride=2),
        ),
        (lambda: Conv1D(4, 16), torch.randn(3, 16), lambda mod, x, w: x @ w + mod.bias),
    ],
    ids=["linear", "conv2d", "convT2d", "hf_conv1d"],
)
@pytest.mark.parametrize("structure", ["2:4", "row", "column", Block(2, 4)], ids=str)
def test_forward_equals_functional_op_with_expanded_mask(
    make: Callable, x: torch.Tensor, fn: Callable, structure: object
) -> None:
    torch.manual_seed(0)
    mod = make()
    sparsify(mod, 0.5, structure=structure)  # type: ignore[arg-type]
    mask = masks(mod)["weight"]
    dense = mod.parametrizations.weight.original.detach()
    assert mask.shape == dense.shape
    torch.testing.assert_close(mod(x), fn(mod, x, dense * mask))


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] in ("linear", "conv2d", "convT2d", "hf_conv1d")], ids=str
)
def test_partial_nm_row_scope_counts_groups_per_output_row(case: tuple) -> None:
    torch.manual_seed(0)
    mod = case[1]()
    sparsify(mod, 0.25, structure="2:4", scope="row")
    od, idim = _dims(mod)
    mask = masks(mod)["weight"]
    w = _dense(mod, "weight")
    # one row of groups per output: move out first, in last, group the inputs by 4
    rows = mask.movedim((od, idim), (0, -1))
    zeros = (~rows).reshape(rows.shape[0], -1, 4).sum(-1)
    assert torch.all((zeros == 0) | (zeros == 2))
    per_row = zeros.shape[1]
    assert torch.all((zeros == 2).sum(1) == round(0.5 * per_row))
    ref_w = np.moveaxis(np.abs(w), (od, idim), (0, -1)).reshape(rows.shape[0], -1, 4)
    for r in range(rows.shape[0]):
        cost = [float(np.sort(g)[:2].sum()) for g in ref_w[r]]
        assert set(torch.nonzero(zeros[r] == 2).flatten().tolist()) == _lowest(cost, round(0.5 * per_row))
    full = copy.deepcopy(mod)
    sparsify(full, structure="2:4", scope="row")
    np.testing.assert_array_equal(masks(full)["weight"].numpy(), _ref_nm(w, idim, 2, 4))
    with pytest.raises(ValueError, match="scope='row' with a structure needs an 'N:M' structure"):
        sparsify(mod, 0.5, structure="row", scope="row")


def test_partial_nm_prunes_whole_groups_by_their_n_lowest_sum() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    sparsify(lin, 0.25, structure="2:4", scope="layer")  # half of the 32 groups
    w = _dense(lin, "weight")
    mask = masks(lin)["weight"].numpy()
    zeros = (~mask).reshape(-1, 4).sum(1)
    assert sorted(set(zeros.tolist())) == [0, 2] and int((zeros == 2).sum()) == 16
    cost = [float(np.sort(np.abs(g))[:2].sum()) for g in w.reshape(-1, 4)]
    assert set(np.flatnonzero(zeros == 2).tolist()) == _lowest(cost, 16)
    full = _ref_nm(w, 1, 2, 4).reshape(-1, 4)
    np.testing.assert_array_equal(mask.reshape(-1, 4)[zeros == 2], full[zeros == 2])


# ----------------------------------------------------------------------------------------------
# Rows and columns
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_channels_layer_scope_against_brute_force(case: tuple, axis: str, norm: str) -> None:
    _, make, inp = case
    torch.manual_seed(1)
    model = make()
    twin = copy.deepcopy(model)
    sparsify(model, 0.5, structure=Channels(axis, norm=norm), scope="layer")
    compact = masks(model, compact=True)
    for name, mask in masks(model).items():
        od, idim = _dims(_owner(model, name)[0])
        d = od if axis == "row" else idim
        w = _dense(model, name)
        expected_compact = tuple(n if i == d else 1 for i, n in enumerate(w.shape))
        assert tuple(compact[name].shape) == expected_compact, name
        (ref,) = _ref_channels([w], [d], 0.5, norm, "layer")
        np.testing.assert_array_equal(mask.numpy(), ref, err_msg=name)
    _twin_forward_matches(model, twin, inp())


@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_channels_global_scope_normalises_by_group_size(axis: str, norm: str) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 16, 12)
    )
    sparsify(model, 0.4, structure=Channels(axis, norm=norm))
    names = list(masks(model))
    ws = [_dense(model, n) for n in names]
    ds = [_dims(_owner(model, n)[0])[0 if axis == "row" else 1] for n in names]
    refs = _ref_channels(ws, ds, 0.4, norm, "global")
    total_groups = sum(w.shape[d] for w, d in zip(ws, ds))
    pruned = 0
    for name, ref, d in zip(names, refs, ds):
        mask = masks(model)[name]
        np.testing.assert_array_equal(mask.numpy(), ref, err_msg=name)
        pruned += int((~mask.movedim(d, 0).reshape(mask.shape[d], -1).any(1)).sum())
    assert pruned == round(0.4 * total_groups)


def test_masks_views_follow_live_buffers_and_refuse_writes() -> None:
    torch.manual_seed(0)
    model = mlp()
    sparsify(model, 0.5, structure="row", scope="layer")
    buf = masks(model, compact=True)["0.weight"]
    assert buf is model[0].parametrizations.weight[0].mask and buf.shape == (16, 1)
    view = masks(model)["0.weight"]
    assert view.shape == (16, 8) and view.data_ptr() == buf.data_ptr()
    sparsify(model, 0.25, structure="row", scope="layer")  # in place: same buffer, the view follows
    assert masks(model, compact=True)["0.weight"] is buf
    assert int((~view).sum()) == 4 * 8
    with pytest.raises(RuntimeError):
        view.copy_(torch.ones(16, 8, dtype=torch.bool))
    rep = hs.sparsity_report(model)
    assert rep["0.weight"].zeros == int((~view).sum()) == 32
    sparsify(model, 0.0, structure="row")
    assert all(bool(m.all()) for m in masks(model).values())


def test_structured_mask_fills_an_existing_full_mask_but_not_the_reverse() -> None:
    torch.manual_seed(0)
    model = mlp()
    sparsify(model, 0.3)  # full-shape buffers
    buf = masks(model)["0.weight"]
    sparsify(model, 0.5, structure="row", scope="layer")
    assert masks(model)["0.weight"] is buf and buf.shape == (16, 8)
    assert int((~buf.all(1)).sum()) == 8 and bool(buf.any(1).sum() == 8)
    compact = mlp()
    sparsify(compact, 0.5, structure="row")
    before = {k: v.clone() for k, v in masks(compact).items()}
    with pytest.raises(ValueError, match=r"0\.weight has a mask of shape \(16, 1\)"):
        sparsify(compact, 0.5)
    with pytest.raises(ValueError, match=r"needs one of shape \(1, 8\)"):
        sparsify(compact, 0.5, structure="column")
    assert all(torch.equal(v, before[k]) for k, v in masks(compact).items())


def test_compact_masks_survive_checkpoint_and_bake() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    sparsify(model, 0.5, structure="column", scope="layer")
    x = torch.randn(2, 4, 6, 6)
    fresh = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    hs.load_sparse_state_dict(fresh, model.state_dict())
    assert {k: tuple(v.shape) for k, v in masks(fresh, compact=True).items()} == {
        "0.weight": (1, 4, 1, 1),
        "3.weight": (1, 128),
    }
    torch.testing.assert_close(fresh(x), model(x))
    out = model(x)
    hs.remove_parametrizations(model)
    torch.testing.assert_close(model(x), out)
    assert int((model[3].weight == 0).all(0).sum()) == 64


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize(
    ("make", "block"),
    [
        (lambda: nn.Linear(16, 6), (2, 4)),
        (lambda: nn.Conv2d(8, 4, 3), (2, 2)),
        (lambda: nn.ConvTranspose2d(8, 6, 3), (3, 4)),
        (lambda: Conv1D(6, 16), (3, 8)),
        (lambda: nn.Linear(8, 8), (1, 8)),
    ],
    ids=["linear", "conv2d", "convT2d", "hf_conv1d", "linear_rows"],
)
def test_blocks_against_brute_force(make: Callable[[], nn.Module], block: tuple[int, int], norm: str) -> None:
    torch.manual_seed(3)
    mod = make()
    r, c = block
    sparsify(mod, 0.5, structure=Block(r, c, norm=norm), min_keep=0)  # the reference has no floor
    od, idim = _dims(mod)
    w = _dense(mod, "weight")
    compact = masks(mod, compact=True)["weight"]
    assert tuple(compact.shape) == tuple(n if i in (od, idim) else 1 for i, n in enumerate(w.shape))
    ref = _ref_blocks(w, od, idim, r, c, 0.5, norm)
    np.testing.assert_array_equal(masks(mod)["weight"].numpy(), ref)


def test_block_1_by_in_equals_rows() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(8, 10), None
    b = copy.deepcopy(a)
    sparsify(a, 0.3, structure=Block(1, 8, norm="l1"))
    sparsify(b, 0.3, structure=Channels("row", norm="l1"))
    assert torch.equal(masks(a)["weight"], masks(b)["weight"])


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_one_by_one_blocks_equal_global_magnitude_pruning(norm: str) -> None:
    """Block(1, 1) of Linear-like layers is a single weight scored by |w|: torch's global L1 pruning.

    (For a conv, Block(1, 1) is one whole kernel, since blocks fold the kernel in.)
    """
    torch.manual_seed(4)
    a = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 12), Conv1D(6, 12))
    b = copy.deepcopy(a)
    sparsify(a, 0.6, structure=Block(1, 1, norm=norm), min_keep=0)
    params = [(m, "weight") for m in b.modules() if isinstance(m, (nn.Linear, Conv1D))]
    total = sum(m.weight.numel() for m, _ in params)
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=round(0.6 * total))
    ours = masks(a)
    for m, _ in params:
        name = next(n for n, mm in b.named_modules() if mm is m) + ".weight"
        assert torch.equal(ours[name], m.weight_mask.bool()), name


# ----------------------------------------------------------------------------------------------
# Exact per-group counts (hypothesis)
# ----------------------------------------------------------------------------------------------


def _pruned_groups(mask: torch.Tensor, structure: object, od: int, idim: int) -> tuple[int, int]:
    """(pruned groups, all groups), counted on the expanded mask; asserts groups are all-or-nothing."""
    if isinstance(structure, Block):
        x = mask.movedim((od, idim), (0, 1))
        o, i = x.shape[:2]
        g = x.reshape(o // structure.rows, structure.rows, i // structure.cols, structure.cols, -1)
        g = g.permute(0, 2, 1, 3, 4).reshape(-1, structure.rows * structure.cols * g.shape[-1])
    else:
        d = od if structure.axis == "row" else idim  # type: ignore[attr-defined]
        g = mask.movedim(d, 0).reshape(mask.shape[d], -1)
    kept = g.sum(1)
    assert torch.all((kept == 0) | (kept == g.shape[1]))
    return int((kept == 0).sum()), g.shape[0]


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["row", "column", "block"]),
    conv=st.booleans(),
    a=st.integers(1, 5),
    b=st.integers(1, 5),
    r=st.integers(1, 3),
    c=st.integers(1, 3),
    sparsity=st.floats(0.0, 1.0),
    scope=st.sampled_from(["layer", "global"]),
)
def test_exact_group_counts(
    kind: str, conv: bool, a: int, b: int, r: int, c: int, sparsity: float, scope: str
) -> None:
    torch.manual_seed(a * 7 + b)
    out, inp = a * r, b * c
    first = nn.Conv2d(inp, out, 2) if conv else nn.Linear(inp, out)
    model = nn.Sequential(first, nn.Linear(out, 2 * r))  # the second layer: `out` inputs, 2r outputs
    structure = Block(r, c) if kind == "block" else Channels(kind)
    if kind == "block" and out % c:
        model = nn.Sequential(first)
    sparsify(model, sparsity, structure=structure, scope=scope, min_keep=0)
    counts = []
    for name, mask in masks(model).items():
        od, idim = _dims(_owner(model, name)[0])
        counts.append(_pruned_groups(mask, structure, od, idim))
    if scope == "layer":
        for pruned, total in counts:
            assert pruned == round(sparsity * total)
    else:
        assert sum(p for p, _ in counts) == round(sparsity * sum(t for _, t in counts))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 8),
    data=st.data(),
    rows=st.integers(1, 6),
    blocks=st.integers(1, 4),
    scope=st.sampled_from(["layer", "global"]),
)
def test_exact_nm_counts(m: int, data: st.DataObject, rows: int, blocks: int, scope: str) -> None:
    n = data.draw(st.integers(1, m - 1))
    torch.manual_seed(rows * 31 + blocks)
    model = nn.Sequential(nn.Linear(m * blocks, rows), nn.Linear(rows, m))  # second: m * 1 needs rows % m
    if rows % m:
        model = nn.Sequential(model[0])
    groups = [rows * blocks] + ([m * rows // m] if len(model) == 2 else [])
    total = sum(groups)
    k = data.draw(st.integers(0, total if scope == "global" else groups[0]))
    # A sparsity giving exactly k pruned groups: k groups of m with n zeros each.
    denom = total if scope == "global" else groups[0]
    sparsity = k * n / (m * denom)
    sparsify(model, sparsity, structure=NM(n, m), scope=scope)
    pruned = []
    for name, mask in masks(model).items():
        zeros = (~mask).reshape(-1, m).sum(1)
        assert torch.all((zeros == 0) | (zeros == n)), name
        pruned.append(int((zeros == n).sum()))
    if scope == "global":
        assert sum(pruned) == k
    else:
        assert pruned[0] == k
        if len(pruned) == 2:
            assert pruned[1] == round(sparsity * m / n * groups[1])


# ----------------------------------------------------------------------------------------------
# Other entry points
# ----------------------------------------------------------------------------------------------


def test_compute_keep_masks_per_layer_sparsities_and_random_method() -> None:
    torch.manual_seed(0)
    model = mlp()
    targets = hs.layers.resolve_targets(model)
    keeps = compute_keep_masks(targets, [0.25, 0.5, 0.0], scope="layer", method="random", structure="row")
    assert [tuple(k.shape) for k in keeps] == [(16, 1), (16, 1), (3, 1)]
    assert [int((~k).sum()) for k in keeps] == [4, 8, 0]
    again = compute_keep_masks(targets, [0.25, 0.5, 0.0], scope="layer", method="random", structure="row")
    assert all(torch.equal(x, y) for x, y in zip(keeps, again))


def test_gradual_pruning_with_nm_and_block_structures() -> None:
    """N:M and block masks through a GradualPruning schedule: nested, exact at every update."""
    schedules = pytest.importorskip("hadamard_sparse.schedules")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    sparsify(model, 0.0)  # full-shape all-ones masks
    sched = schedules.GradualPruning(
        model, 0.5, start_step=0, end_step=4, every=1, curve="linear", structure="2:4", scope="layer"
    )
    previous = {k: v.clone() for k, v in masks(model).items()}
    for step in range(1, 5):
        sched.step()
        target = sched.target_at(step)
        for name, mask in masks(model).items():
            zeros = (~mask).reshape(-1, 4).sum(1)
            assert torch.all((zeros == 0) | (zeros == 2)), name
            assert int((zeros == 2).sum()) == round(target * 2 * zeros.numel())
            assert not torch.any(mask & ~previous[name]), "masks only grow sparser"
        previous = {k: v.clone() for k, v in masks(model).items()}
    for name, mask in masks(model).items():
        np.testing.assert_array_equal(mask.numpy(), _ref_nm(_dense(model, name), 1, 2, 4))

    blocky = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    sparsify(blocky, 0.0, structure=Block(2, 4))  # compact (out, in) buffers; schedules keep them
    sched = schedules.GradualPruning(
        blocky, 0.75, start_step=0, end_step=3, every=1, structure=Block(2, 4), min_keep=0
    )
    for step in range(1, 4):
        sched.step()
        counts = [_pruned_groups(mask, Block(2, 4), 0, 1) for mask in masks(blocky).values()]
        assert sum(p for p, _ in counts) == round(sched.target_at(step) * sum(t for _, t in counts))
    assert sched.sparsity == 0.75
