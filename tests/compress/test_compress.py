"""Compressed state_dicts: bitwise round trips, layout choice, refusals, safetensors files, real models."""

from __future__ import annotations

import copy
import math
import os
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.compress import layouts as C
from hadamard_sparse.errors import HadamardSparseError
from tests.conftest import minilm_path
from tests.hf_models import bert_config, gpt2_config, llama_config, t5_config, transformers, vit_config

safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (an integer view), so -0.0 and NaN payloads compare exactly."""
    return t.contiguous().view(INT_VIEW[t.element_size()])


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k, v in b.items():
        assert a[k].dtype == v.dtype and a[k].shape == v.shape, k
        assert torch.equal(bits(a[k]), bits(v)), k


def make(
    shape: tuple[int, ...], dtype: torch.dtype, density: float, seed: int, specials: bool
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) < density
    if dtype == torch.bool:
        return keep
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g).to(dtype)
    else:
        info = torch.iinfo(dtype)
        x = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    x = torch.where(keep, x, torch.zeros((), dtype=dtype))
    if specials and dtype.is_floating_point and x.numel():
        flat = bits(x).view(-1).clone()
        idx = torch.randint(0, x.numel(), (3,), generator=g)
        item = x.element_size()
        sign = C._SIGN[item]
        flat[idx[0]] = sign  # -0.0
        if dtype not in (torch.float8_e4m3fn,):
            # a NaN with a payload: all exponent bits, a few mantissa bits
            nan = {2: 0x7C05 if dtype == torch.float16 else 0x7F85, 4: 0x7FC00123, 8: 0x7FF0000000000ABC}
            nan[1] = 0x7F  # float8_e5m2 NaN
            flat[idx[1]] = nan[item]
        flat[idx[2]] = sign  # another -0.0 (maybe on top of a value)
        x = flat.view(dtype).view(shape)
    return x


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from(DTYPES),
    density=st.sampled_from([0.0, 0.02, 0.1, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**16),
    specials=st.booleans(),
    transpose=st.booleans(),
)
def test_round_trip_bitwise(shape, dtype, density, seed, specials, transpose) -> None:
    x = make(shape, dtype, density, seed, specials)
    if transpose and x.dim() >= 2:
        x = x.transpose(0, -1)  # non-contiguous input
    sd = {"a.weight": x, "b": make((40, 50), dtype, density, seed + 1, specials)}
    comp = C.compress_state_dict(sd)
    assert all(isinstance(v, torch.Tensor) and v.is_contiguous() for v in comp.values())
    back = C.decompress_state_dict(comp)
    assert list(back) == list(sd)
    assert_bitwise(back, sd)
    # and through a safetensors byte string
    assert_bitwise(C.decompress_state_dict(safetensors_torch.load(safetensors_torch.save(comp))), sd)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 200),
    cols=st.integers(1, 200),
    density=st.sampled_from([0.0, 0.005, 0.03, 0.1, 0.3, 0.7, 0.97, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int8, torch.bool]),
    seed=st.integers(0, 2**16),
)
def test_file_never_larger_than_dense(rows, cols, density, dtype, seed) -> None:
    """Reference: the real safetensors byte counts. The chosen layout is the smallest file, within
    the header estimate."""
    x = make((rows, cols), dtype, density, seed, specials=False)
    comp = C.compress_state_dict({"w": x})
    dense_size = len(safetensors_torch.save({"w": x}))
    size = len(safetensors_torch.save(comp))
    assert size <= dense_size + 16
    candidates = {}
    for layout in (C.LAYOUT_BITMASK, C.LAYOUT_CSR):
        candidates[layout] = len(safetensors_torch.save(_force(x, layout)))
    best = min(dense_size, *candidates.values())
    assert size <= best + 64, (size, dense_size, candidates)


def _force(x: torch.Tensor, layout: int) -> dict[str, torch.Tensor]:
    """The given layout, whatever its size: ours when chosen, else the independent encoder's."""
    comp = C._compress_one("w", x)
    return comp if layout_of(comp) == layout else reference_layout(x, layout)


def layout_of(comp: dict[str, torch.Tensor]) -> int:
    meta = comp.get("w.__layout__")
    return 0 if meta is None else int(meta[1])


def reference_layout(x: torch.Tensor, layout: int) -> dict[str, torch.Tensor]:
    """An independent encoder (numpy packbits / torch.sparse CSR) of the documented format, no -0.0."""
    rows = x.shape[0] if x.dim() >= 2 else 1
    v = bits(x).reshape(rows, -1)
    nz = v != 0
    out = {"w.__layout__": torch.tensor([1, layout, C.DTYPE_CODES[x.dtype], 0, *x.shape])}
    if layout == C.LAYOUT_BITMASK:
        out["w.__bitmask__"] = torch.from_numpy(np.packbits(nz.reshape(-1).numpy(), bitorder="little"))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
            csr = v.to(torch.float64).to_sparse_csr()
        nnz = int(nz.sum())
        out["w.__crow__"] = csr.crow_indices().to(C._index_dtype(nnz))
        out["w.__col__"] = csr.col_indices().to(C._index_dtype(v.shape[1] - 1))
    if x.dtype != torch.bool:
        out["w.__values__"] = v[nz].view(x.dtype)
    return out


@pytest.mark.parametrize("layout", [C.LAYOUT_BITMASK, C.LAYOUT_CSR])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool])
@pytest.mark.parametrize("shape", [(37, 53), (100,), (6, 5, 3, 3)])
def test_matches_independent_encoder(layout: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Files written by an independent encoder of the documented format decode to the tensor; and the
    encoder's own output for that layout is identical."""
    x = make(shape, dtype, 0.2, 3, specials=False)
    ref = reference_layout(x, layout)
    assert torch.equal(C.decompress_state_dict(ref)["w"], x)
    ours = C._compress_one("w", x)
    if layout_of(ours) == layout:
        assert_bitwise(ours, ref)


def test_layout_choice() -> None:
    g = torch.Generator().manual_seed(0)
    w90 = torch.randn(256, 512, generator=g) * (torch.rand(256, 512, generator=g) > 0.9)
    w90 = w90.abs()  # no -0.0
    comp = hs.compress_state_dict({"w": w90})
    assert sorted(comp) == ["w.__bitmask__", "w.__layout__", "w.__values__"]
    assert comp["w.__bitmask__"].dtype == torch.uint8 and comp["w.__bitmask__"].numel() == 256 * 512 // 8
    assert comp["w.__layout__"].tolist() == [1, 1, 1, 0, 256, 512]
    # one nonzero per row: CSR with int16 columns and int16 row pointers
    eye = torch.eye(300)
    comp = hs.compress_state_dict({"eye": eye})
    assert sorted(comp) == ["eye.__col__", "eye.__crow__", "eye.__layout__", "eye.__values__"]
    assert comp["eye.__col__"].dtype == torch.int16 and comp["eye.__crow__"].dtype == torch.int16
    # wide rows need int32 columns
    wide = torch.zeros(2, 40000)
    wide[0, 39999] = 1.0
    comp = hs.compress_state_dict({"wide": wide})
    assert comp["wide.__col__"].dtype == torch.int32 and comp["wide.__col__"].tolist() == [39999]
    # dense data stays under its own name, the same tensor
    dense = torch.randn(64, 64, generator=g)
    comp = hs.compress_state_dict({"d": dense, "s": torch.tensor(0.0), "e": torch.zeros(0, 3)})
    assert list(comp) == ["d", "s", "e"] and comp["d"].data_ptr() == dense.data_ptr()  # not copied
    # complex tensors are not encoded
    z = torch.zeros(50, 50, dtype=torch.complex64)
    assert hs.compress_state_dict({"z": z})["z"].data_ptr() == z.data_ptr()


def test_negative_zeros_of_baked_weights() -> None:
    """Baking ``w * mask`` gives -0.0 where w < 0; it is kept in ``__signs__``, not as a value."""
    lin = nn.Linear(128, 64)
    hs.remove_parametrizations(hs.sparsify(lin, 0.9))
    w = lin.weight.detach()
    n_neg0 = int((bits(w) == C._SIGN[4]).sum())
    assert n_neg0 > 0
    comp = hs.compress_state_dict({"w": w})
    assert comp["w.__values__"].numel() == int((w != 0).sum())
    assert comp["w.__layout__"][3] == 1
    signs = np.unpackbits(comp["w.__signs__"].numpy(), bitorder="little")[: int((w == 0).sum())]
    assert int(signs.sum()) == n_neg0
    assert_bitwise(hs.decompress_state_dict(comp), {"w": w})
    # without -0.0, no signs entry
    assert "w.__signs__" not in hs.compress_state_dict({"w": w + 0.0})


def test_sparsified_model_state_dict() -> None:
    """A sparsified (not baked) model's state_dict: effective weights compress, masks take 1 bit per entry
    (bitmask, no values), and the fresh model loads it back with the same masks and outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    hs.sparsify(model, 0.8)
    sd = model.state_dict()
    comp = hs.compress_state_dict(sd)
    masks = [k for k, v in sd.items() if v.dtype == torch.bool]
    assert masks
    for key in masks:
        assert f"{key}.__bitmask__" in comp and f"{key}.__values__" not in comp
        assert comp[f"{key}.__bitmask__"].numel() == (sd[key].numel() + 7) // 8
    assert "0.weight.__values__" in comp  # the effective weight is stored sparse
    back = hs.decompress_state_dict(comp)
    assert_bitwise(back, sd)
    fresh = hs.sparsify(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), 0.0)
    fresh.load_state_dict(back, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(hs.masks(fresh).values(), hs.masks(model).values()))
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def _refused(sd: dict, match: str) -> None:
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    with pytest.raises(HadamardSparseError, match=match):
        (hs.decompress_state_dict if any("__" in k for k in sd) else hs.compress_state_dict)(sd)
    assert list(sd) == list(before)
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v.to_dense(), before[k].to_dense())


def test_compress_refusals() -> None:
    w = torch.zeros(8, 8)
    _refused({"w": w, "x": 3.0}, "'x' must be a torch.Tensor, got float")
    _refused(
        {"w": w, "layer._extra_state": {"type": "X"}}, "'layer._extra_state' must be a torch.Tensor, got dict"
    )
    _refused({"w": w, "s": torch.eye(4).to_sparse()}, "'s' has layout torch.sparse_coo")
    with pytest.raises(HadamardSparseError, match=r"'w.__values__' ends with a suffix reserved"):
        hs.compress_state_dict({"w.__values__": w})
    with pytest.raises(TypeError, match="mapping"):  # InvalidTypeError: a TypeError too
        hs.compress_state_dict([w])  # type: ignore[arg-type]
    with pytest.raises(hs.InvalidTypeError, match="'x' must be a torch.Tensor"):
        hs.compress_state_dict({"x": 1})
    with pytest.raises(hs.InvalidArgumentError, match="reserved"):
        hs.compress_state_dict({"a.__crow__": w})


def _good() -> dict[str, dict[str, torch.Tensor]]:
    w = torch.zeros(100, 300)
    w[2, 3], w[7, 299], w[0, 0], w[7, 5] = 1.5, -2.0, -0.0, 3.0
    w[5, 5] = -0.0
    return {
        "bm": hs.compress_state_dict({"w": torch.where(torch.rand(10, 30) > 0.9, 1.0, 0.0)}),
        "csr": hs.compress_state_dict({"w": w}),
    }


@pytest.mark.parametrize(
    "kind, edit, match",
    [
        ("bm", lambda c: c.pop("w.__values__"), r"missing \['w.__values__'\]"),
        ("bm", lambda c: c.pop("w.__layout__"), r"'w.__layout__' is missing"),
        ("bm", lambda c: c.update({"w.__col__": torch.zeros(1, dtype=torch.int16)}), "unexpected"),
        ("bm", lambda c: c.update({"w": torch.zeros(10, 30)}), "both as a plain tensor and as a compressed"),
        ("bm", lambda c: c.update({"w.__values__": c["w.__values__"].double()}), "1-D float32"),
        ("bm", lambda c: c.update({"w.__values__": c["w.__values__"][1:]}), "bits set"),
        ("bm", lambda c: c.update({"w.__bitmask__": c["w.__bitmask__"][1:]}), "38 entries"),
        ("bm", lambda c: c.update({"w.__bitmask__": c["w.__bitmask__"].int()}), "1-D uint8"),
        ("bm", lambda c: c.update({"w.__layout__": c["w.__layout__"].int()}), "1-D int64"),
        ("bm", lambda c: c["w.__layout__"].__setitem__(0, 3), "format version 3"),
        ("bm", lambda c: c["w.__layout__"].__setitem__(1, 7), "layout code 7"),
        ("bm", lambda c: c["w.__layout__"].__setitem__(2, 99), "dtype code 99"),
        ("bm", lambda c: c["w.__layout__"].__setitem__(3, 1), r"missing \['w.__signs__'\]"),
        ("bm", lambda c: c["w.__layout__"].__setitem__(5, -30), "negative size"),
        ("bm", lambda c: c.update({"w.__values__": [1.0]}), "must be a torch.Tensor"),
        ("csr", lambda c: c.pop("w.__signs__"), r"missing \['w.__signs__'\]"),
        ("csr", lambda c: c.update({"w.__signs__": c["w.__signs__"][:0]}), "w.__signs__"),
        ("csr", lambda c: c["w.__crow__"].__setitem__(0, 1), "must start at 0"),
        ("csr", lambda c: c["w.__crow__"].__setitem__(-1, 9), "must start at 0"),
        ("csr", lambda c: c["w.__col__"].__setitem__(0, 300), r"in \[0, 300\) increasing"),
        ("csr", lambda c: c["w.__col__"].__setitem__(1, 299), "increasing within each row"),
        ("csr", lambda c: c.update({"w.__col__": c["w.__col__"].float()}), "int16/int32/int64"),
        ("csr", lambda c: c.update({"w.__crow__": c["w.__crow__"][1:]}), "101 entries"),
    ],
)
def test_decompress_refusals(kind: str, edit, match: str) -> None:
    comp = _good()[kind]
    assert hs.decompress_state_dict(comp)  # well formed before the edit
    if kind == "csr":
        assert "w.__crow__" in comp and "w.__signs__" in comp
    edit(comp)
    with pytest.raises(HadamardSparseError, match=match):
        hs.decompress_state_dict(comp)


def test_padding_bits_refused() -> None:
    w = torch.where(torch.rand(13, 13) > 0.8, 1.0, 0.0)
    comp = hs.compress_state_dict({"w": w})
    comp["w.__bitmask__"][-1] |= 0x80  # bit 175 of a 169-entry tensor
    with pytest.raises(HadamardSparseError, match="padding bits"):
        hs.decompress_state_dict(comp)


def test_uncompressed_dict_passes_through() -> None:
    sd = {"a": torch.randn(3), "b": torch.arange(4)}
    back = hs.decompress_state_dict(sd)
    assert back == sd and back is not sd


def test_save_and_load_file(tmp_path) -> None:
    """A safetensors file on disk: loadable by safetensors alone, decoded by load_compressed;
    tied (shared-storage) tensors are written."""
    emb = nn.Embedding(100, 32)
    head = nn.Linear(32, 100, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, nn.Linear(32, 32), head)
    hs.remove_parametrizations(hs.sparsify(model, 0.9, include=[nn.Linear, nn.Embedding]))
    sd = model.state_dict()
    path = tmp_path / "m.safetensors"
    hs.save_compressed(sd, path, metadata={"note": "x"})
    plain = safetensors_torch.load_file(str(path))
    assert all(isinstance(v, torch.Tensor) for v in plain.values())
    with safetensors_torch.safe_open(str(path), "pt") as f:
        assert f.metadata()["hadamard_sparse.compressed"] == "1" and f.metadata()["note"] == "x"
    assert_bitwise(hs.load_compressed(path), {k: v for k, v in sd.items()})
    assert_bitwise(hs.load_compressed(str(path)), sd)
    with pytest.raises(HadamardSparseError, match="metadata"):
        hs.save_compressed(sd, path, metadata={"a": 1})  # type: ignore[dict-item]


def _hf(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ids = torch.randint(1, 60, (2, 9))
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(gpt2_config()), {"input_ids": ids}
    if name == "bert":
        return transformers.BertModel(bert_config(max_position_embeddings=512)), {"input_ids": ids}
    if name == "t5":
        return transformers.T5ForConditionalGeneration(t5_config(decoder_start_token_id=0)), {
            "input_ids": ids,
            "decoder_input_ids": ids[:, :4],
        }
    if name == "llama":
        return transformers.LlamaForCausalLM(llama_config()), {"input_ids": ids}
    return transformers.ViTModel(vit_config()), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        o = model(**inputs)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5", "llama", "vit"])
def test_hf_models_round_trip(name: str, tmp_path) -> None:
    """Bake at 90% (Linear, Conv1D, Embedding where present), save compressed, load into a fresh model: same outputs."""
    model, inputs = _hf(name)
    model.eval()
    fresh = copy.deepcopy(model)
    types: list[type] = [nn.Linear] if name == "vit" else [nn.Linear, nn.Embedding]  # each must match
    types += [transformers.pytorch_utils.Conv1D] if name == "gpt2" else []
    hs.sparsify(model, 0.9, scope="layer", include=types)
    hs.remove_parametrizations(model)
    path = tmp_path / "model.safetensors"
    hs.save_compressed(model.state_dict(), path)
    dense_path = tmp_path / "dense.safetensors"
    safetensors_torch.save_model(model, str(dense_path))
    assert os.path.getsize(path) < 0.6 * os.path.getsize(dense_path)  # T5's tied embeddings stay dense
    fresh.load_state_dict(hs.load_compressed(path), strict=True)
    assert torch.equal(_out(fresh, inputs), _out(model, inputs))


def test_minilm_90_percent_file_ratio(tmp_path) -> None:
    """Issue 12's target on the real all-MiniLM-L6-v2: compressed safetensors <= 0.20x the dense file."""
    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    hs.sparsify(model, 0.9, scope="layer", include=[nn.Linear, nn.Embedding])
    hs.remove_parametrizations(model)
    sd = model.state_dict()
    dense, comp = tmp_path / "dense.safetensors", tmp_path / "comp.safetensors"
    safetensors_torch.save_file(sd, str(dense))
    hs.save_compressed(sd, comp)
    ratio = os.path.getsize(comp) / os.path.getsize(dense)
    assert ratio <= 0.20, ratio
    assert math.isclose(ratio, 0.16, abs_tol=0.02)
    assert_bitwise(hs.load_compressed(comp), sd)
    key = "encoder.layer.3.attention.self.query.weight.__values__"
    _flip_byte(comp, key, at=1000)
    with pytest.raises(hs.InvalidArgumentError, match=f"stored tensor '{key}' fails its checksum"):
        hs.load_compressed(comp)


def _flip_byte(path, key: str, at: int = 0) -> None:
    """Flips the bits of byte ``at`` of stored tensor ``key``, located through the safetensors header
    (8-byte little-endian header length, JSON header, data), read independently of safetensors."""
    import json
    import struct

    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[key]["data_offsets"]
    assert 0 <= at < end - begin
    raw[8 + n + begin + at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_checksums_catch_a_flipped_byte(tmp_path) -> None:
    """A flipped byte in a stored values tensor of a saved (tiny BERT, 90% baked) file is an error naming the
    tensor; verify=False loads it (and shows the wrong weight); a file written without checksums (the format
    before them) still loads."""
    model, _ = _hf("bert")
    hs.remove_parametrizations(hs.sparsify(model, 0.9, scope="layer"))
    sd = model.state_dict()
    path = tmp_path / "m.safetensors"
    hs.save_compressed(sd, path)
    with safetensors_torch.safe_open(str(path), "pt") as f:
        sums = f.metadata()[hs.compress.CHECKSUM_KEY].split(",")
        keys = sorted(f.keys())
    assert len(sums) == len(keys)
    stored = safetensors_torch.load_file(str(path))
    assert [int(s, 16) for s in sums] == [
        zlib.crc32(stored[k].reshape(-1).view(torch.uint8).numpy()) for k in keys
    ]
    assert_bitwise(hs.load_compressed(path), sd)
    key = "encoder.layer.1.intermediate.dense.weight"
    assert f"{key}.__values__" in keys
    _flip_byte(path, f"{key}.__values__", at=5)
    with pytest.raises(
        hs.InvalidArgumentError, match=rf"stored tensor '{key}.__values__' fails its checksum"
    ):
        hs.load_compressed(path)
    back = hs.load_compressed(path, verify=False)  # opt-out: loads, with one wrong weight
    diff = [k for k in sd if not torch.equal(bits(back[k]), bits(sd[k]))]
    assert diff == [key]
    # a file as written before checksums: same tensors, no checksum metadata
    old = tmp_path / "old.safetensors"
    safetensors_torch.save_file(hs.compress_state_dict(sd), str(old), metadata=dict(C.FILE_METADATA))
    assert_bitwise(hs.load_compressed(old), sd)
    # a malformed record is refused, not ignored
    bad = tmp_path / "bad.safetensors"
    meta = {**C.FILE_METADATA, hs.compress.CHECKSUM_KEY: ",".join(sums[:-1])}
    safetensors_torch.save_file(hs.compress_state_dict(sd), str(bad), metadata=meta)
    with pytest.raises(hs.InvalidArgumentError, match="checksum metadata .* is malformed"):
        hs.load_compressed(bad)
    with pytest.raises(hs.InvalidArgumentError, match="reserved"):
        hs.save_compressed(sd, bad, metadata={hs.compress.CHECKSUM_KEY: "x"})
    with pytest.raises(hs.InvalidTypeError, match="verify must be a bool"):
        hs.load_compressed(path, verify=1)  # type: ignore[arg-type]


# --- int8 quantization (issue 22) ---------------------------------------------------------------


def _ref_int8(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference of the documented scheme (numpy, float64): per row of the (rows, -1) view,
    scale = max|row| / 127 as float32, rounded up to 17 significant bits; q = round-half-even(w / scale)."""
    rows = w.shape[0] if w.dim() >= 2 else 1
    x = w.double().reshape(rows, -1).numpy()
    s32 = (np.abs(x).max(axis=1) / 127).astype(np.float32).astype(np.float64)
    grid = np.where(s32 > 0, 2.0 ** (np.floor(np.log2(np.where(s32 > 0, s32, 1))) - 16), 1.0)
    scale = np.ceil(s32 / grid) * grid
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(scale[:, None] > 0, np.rint(x / scale[:, None]), 0).clip(-127, 127)
    return q.astype(np.int8), scale.astype(np.float32)


def _int8_case(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if name == "dense":
        return torch.randn(48, 70, generator=g) * torch.logspace(-3, 2, 48).unsqueeze(1)
    if name == "bitmask":
        return torch.randn(64, 96, generator=g) * (torch.rand(64, 96, generator=g) < 0.1)
    if name == "csr":
        return torch.randn(40, 3000, generator=g) * (torch.rand(40, 3000, generator=g) < 0.003)
    if name == "conv":
        w = torch.randn(16, 8, 3, 3, generator=g) * (torch.rand(16, 8, 3, 3, generator=g) < 0.3)
        w[3] = 0.0  # an all-zero row: scale 0
        return -w  # -0.0 where masked: stored as +0.0
    return (torch.randn(32, 50, generator=g) * (torch.rand(32, 50, generator=g) < 0.5)).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["dense", "bitmask", "csr", "conv", "bf16"])
def test_int8_matches_reference_and_bound(name: str) -> None:
    w = _int8_case(name)
    comp = hs.compress_state_dict({"w": w, "b": torch.randn(5)}, quantize="int8")
    meta = comp["w.__layout__"].tolist()
    layout = {"dense": 0, "bitmask": 1, "csr": 2, "conv": 1, "bf16": 1}[name]
    assert meta == [2, layout, C.DTYPE_CODES[w.dtype], 0, 1, *w.shape]
    q_ref, scale_ref = _ref_int8(w)
    nz = (w != 0).reshape(-1).numpy()
    assert comp["w.__values__"].dtype == torch.int8 and comp["w.__scale__"].dtype == torch.float32
    assert np.array_equal(comp["w.__scale__"].numpy(), scale_ref)
    expect = q_ref.reshape(-1) if layout == 0 else q_ref.reshape(-1)[nz]
    assert np.array_equal(comp["w.__values__"].numpy(), expect)
    assert torch.equal(comp["b"], comp["b"]) and "b.__layout__" not in comp  # 1-D: exact, dense
    back = hs.decompress_state_dict(comp)["w"]
    assert back.dtype == w.dtype and back.shape == w.shape
    rows = w.shape[0]
    s = torch.from_numpy(scale_ref).double().unsqueeze(1)
    err = (back.double() - w.double()).reshape(rows, -1).abs()
    if w.dtype == torch.float32:
        # exact: q * scale is representable in float32, no rounding after it
        ref = torch.from_numpy(q_ref.astype(np.float64)) * s
        assert torch.equal(back.double().reshape(rows, -1), ref)
        assert bool((err <= s / 2).all())
        amax = w.double().reshape(rows, -1).abs().amax(1, keepdim=True)
        assert bool((s >= amax / 127).all()) and bool((s <= amax / 127 * (1 + 2**-16)).all())
    else:  # bfloat16: plus the rounding of q * scale to bfloat16 (half an ulp: 2**-8 relative)
        assert bool((err <= s / 2 + back.double().abs().reshape(rows, -1) * 2**-8).all())
    assert bool((back[w == 0] == 0).all())  # the zeros stay zeros, as +0.0
    assert not bool(torch.signbit(back[w == 0]).any())


def test_int8_which_tensors_and_options() -> None:
    model, _ = _hf("bert")
    hs.sparsify(model, 0.8, scope="layer")  # not baked: effective weights + bool masks
    sd = model.state_dict()
    comp = hs.compress_state_dict(sd, quantize="int8")
    scaled = {k.removesuffix(".__scale__") for k in comp if k.endswith(".__scale__")}
    expected = {k for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2}
    assert scaled == expected and "embeddings.word_embeddings.weight" in scaled
    back = hs.decompress_state_dict(comp)
    for k, v in sd.items():
        if k not in expected:  # biases, LayerNorm, masks, position_ids: bitwise
            assert torch.equal(bits(back[k]), bits(v)), k
    # the masks come back exactly, the model loads
    fresh, _ = _hf("bert")
    hs.sparsify(fresh, 0.0)
    fresh.load_state_dict(back)
    assert all(torch.equal(a, b) for a, b in zip(hs.masks(fresh).values(), hs.masks(model).values()))
    # include replaces the rule, exclude removes from it
    comp = hs.compress_state_dict(sd, quantize="int8", quantize_exclude=["embeddings.*"])
    assert not any(k.startswith("embeddings.") and k.endswith("__scale__") for k in comp)
    comp = hs.compress_state_dict(sd, quantize="int8", quantize_include=["*.output.LayerNorm.weight"])
    scaled = {k.removesuffix(".__scale__") for k in comp if k.endswith(".__scale__")}
    assert scaled == {k for k in sd if k.endswith(".output.LayerNorm.weight")} and len(scaled) == 4
    assert comp["encoder.layer.0.output.LayerNorm.weight.__scale__"].numel() == 1  # 1-D: one row


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"quantize": "int4"},
            hs.InvalidArgumentError,
            r"quantize must be None or one of 'int8', got 'int4'",
        ),
        ({"quantize": True}, hs.InvalidArgumentError, "got True"),
        ({"quantize_exclude": ["*"]}, hs.InvalidArgumentError, "pass quantize='int8' too"),
        (
            {"quantize": "int8", "quantize_include": "*.weight"},
            hs.InvalidTypeError,
            "sequence of glob patterns",
        ),
        (
            {"quantize": "int8", "quantize_exclude": ["nope*"]},
            hs.InvalidArgumentError,
            "'nope\\*' matches no",
        ),
        (
            {"quantize": "int8", "quantize_include": ["mask"]},
            hs.InvalidArgumentError,
            r"selects 'mask' \(torch.bool",
        ),
        ({"quantize": "int8", "quantize_include": ["s"]}, hs.InvalidArgumentError, "selects 's'"),
        ({"quantize": "int8"}, hs.InvalidArgumentError, "'inf' holds non-finite values"),
        ({"quantize": "int8"}, hs.InvalidArgumentError, "'big' holds values beyond float32's range"),
    ],
)
def test_int8_refusals(kwargs: dict, error: type, match: str) -> None:
    sd = {"w": torch.randn(4, 4), "mask": torch.ones(4, 4, dtype=torch.bool), "s": torch.tensor(1.0)}
    if match.startswith("'inf'"):
        sd["inf"] = torch.tensor([[1.0, float("inf")]])
    if match.startswith("'big'"):
        sd["big"] = torch.tensor([[1.0, 1e39]], dtype=torch.float64)
    before = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(error, match=match):
        hs.compress_state_dict(sd, **kwargs)
    assert all(torch.equal(sd[k], before[k]) for k in before)


def _good_int8() -> dict[str, torch.Tensor]:
    return hs.compress_state_dict({"w": _int8_case("bitmask")}, quantize="int8")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("w.__scale__"), r"missing \['w.__scale__'\]"),
        (lambda c: c.update({"w.__scale__": c["w.__scale__"][1:]}), "64 entries"),
        (lambda c: c.update({"w.__scale__": c["w.__scale__"].double()}), "1-D float32"),
        (lambda c: c["w.__scale__"].__setitem__(3, -1.0), "finite, non-negative"),
        (lambda c: c["w.__scale__"].__setitem__(3, float("nan")), "finite, non-negative"),
        (lambda c: c.update({"w.__values__": c["w.__values__"].float()}), "1-D int8"),
        (lambda c: c["w.__layout__"].__setitem__(4, 2), "quantization code 2"),
        (lambda c: c["w.__layout__"].__setitem__(3, 1), "zero_signs 1"),
        (lambda c: c["w.__layout__"].__setitem__(2, C.DTYPE_CODES[torch.int32]), "only floating dtypes"),
        (lambda c: c["w.__layout__"].__setitem__(1, 0), r"unexpected \['w.__bitmask__'\]"),
    ],
)
def test_int8_decompress_refusals(edit, match: str) -> None:
    comp = _good_int8()
    assert hs.decompress_state_dict(comp)
    edit(comp)
    with pytest.raises(HadamardSparseError, match=match):
        hs.decompress_state_dict(comp)


def _header_allowance(path) -> int:
    """Bytes of a safetensors file outside its tensors: 8 + the JSON header, read independently."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def test_size_report_matches_compressed_tensors_and_files(tmp_path) -> None:
    """Every number of size_report is the byte count of what compress_state_dict / save_file store, per tensor
    (exactly) and per file (plus the file's own header)."""
    model, _ = _hf("bert")
    hs.sparsify(model, 0.9, scope="layer", include=[nn.Linear, nn.Embedding])
    sd = model.state_dict()  # sparsified, not baked: bool masks too
    report = hs.size_report(model)
    assert [t.name for t in report.tensors] == list(sd)
    for kwargs, column in (({}, "sparse"), ({"quantize": "int8"}, "sparse_int8")):
        comp = hs.compress_state_dict(sd, **kwargs)
        for t in report.tensors:
            parts = [v for k, v in comp.items() if k == t.name or k.startswith(t.name + ".__")]
            assert getattr(t, column) == sum(v.nbytes for v in parts), (t.name, column)
        path = tmp_path / f"{column}.safetensors"
        hs.save_compressed(sd, path, **kwargs)
        assert os.path.getsize(path) - getattr(report, column) == _header_allowance(path)
    dense = tmp_path / "dense.safetensors"
    safetensors_torch.save_file(sd, str(dense))
    assert os.path.getsize(dense) - report.dense == _header_allowance(dense)
    # dense int8: what the quantized dense layout stores (an unpruned model chooses it for its weights)
    fresh, _ = _hf("bert")
    r = hs.size_report(fresh.state_dict())
    comp = hs.compress_state_dict(fresh.state_dict(), quantize="int8")
    assert r.dense_int8 == r.sparse_int8 == sum(v.nbytes for v in comp.values())
    t = report["encoder.layer.0.attention.self.query.weight"]
    assert t.quantized and t.layout == "bitmask" and math.isclose(t.density, 0.1, abs_tol=0.01)
    assert t.dense == 32 * 32 * 4 and t.dense_int8 == 32 * 32 + 32 * 4 + 8 * 7
    assert not report["encoder.layer.0.attention.self.query.weight_mask"].quantized
    assert report.ratio("sparse_int8") < report.ratio("sparse") < 1 and report.ratio("dense") == 1
    d = report.to_dict()
    assert (
        d["sparse_int8"] == report.sparse_int8
        and d["tensors"][0]["name"] == "embeddings.word_embeddings.weight"
    )
    assert d["ratios"]["sparse"] == report.ratio("sparse") and d["tensors"][0]["density"] == pytest.approx(
        0.1, abs=0.01
    )
    text = str(report)
    assert "sparse int8" in text and f"{report.sparse_int8:,}" in text and "(int8)" in text
    # the same options and checks as compress_state_dict
    r = hs.size_report(sd, quantize_exclude=["embeddings.*"])
    assert not r["embeddings.word_embeddings.weight"].quantized
    with pytest.raises(hs.InvalidArgumentError, match="'nope' matches no"):
        hs.size_report(sd, quantize_include=["nope"])
    with pytest.raises(hs.InvalidTypeError, match="nn.Module or a mapping"):
        hs.size_report([1])  # type: ignore[arg-type]


def test_minilm_int8_bound_file_and_quality(tmp_path) -> None:
    """The real all-MiniLM-L6-v2, 90% sparse Linears, saved with quantize="int8": every quantized entry within
    scale / 2 of the original (exact, float64 comparison, scale read from the file), every other tensor
    bitwise; the file is 0.16x the dense one (word embeddings dense int8: 0.13x alone); sentence
    embeddings stay within cosine 0.99 of the fp32 sparse model's."""
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    hs.remove_parametrizations(hs.sparsify(model, 0.9, scope="layer"))
    sd = model.state_dict()
    dense, q = tmp_path / "dense.safetensors", tmp_path / "q.safetensors"
    safetensors_torch.save_file(sd, str(dense))
    hs.save_compressed(sd, q, quantize="int8")
    ratio = os.path.getsize(q) / os.path.getsize(dense)
    assert math.isclose(ratio, 0.162, abs_tol=0.005), ratio
    stored = safetensors_torch.load_file(str(q))
    back = hs.load_compressed(q)
    n_quantized = 0
    for k, v in sd.items():
        if v.dim() < 2:
            assert torch.equal(bits(back[k]), bits(v)), k
            continue
        n_quantized += 1
        rows = v.shape[0]
        w, w_hat = v.double().reshape(rows, -1), back[k].double().reshape(rows, -1)
        scale = stored[f"{k}.__scale__"].double().unsqueeze(1)
        amax = w.abs().amax(1, keepdim=True)
        assert bool((scale >= amax / 127).all() and (scale <= amax / 127 * (1 + 2**-16)).all()), k
        assert bool(((w - w_hat).abs() <= scale / 2).all()), k
        assert bool((w_hat[w == 0] == 0).all()), k
    assert n_quantized == 3 + 6 * 6 + 1  # 3 embeddings, 6 Linear weights in each of 6 layers, the pooler
    report = hs.size_report(sd)
    assert os.path.getsize(q) - report.sparse_int8 == _header_allowance(q)
    fresh = transformers.AutoModel.from_pretrained(path).eval()
    fresh.load_state_dict(back)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(
        ["The ferry crossing took longer than expected.", "Snow is likely in the mountains tonight."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        a, b = model(**batch).last_hidden_state, fresh(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1)
    cos = torch.nn.functional.cosine_similarity((a * m).sum(1), (b * m).sum(1), dim=-1)
    assert bool((cos > 0.99).all()), cos
