"""save_compressed(..., codec="zlib"): lossless against codec=None, smaller files, checksums over the stored
bytes, corrupt streams and malformed records refused with the file and tensor named, bad codec values."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import hadamard_sparse as hs
from hadamard_sparse.compress import CHECKSUM_KEY, CODEC_KEY, FILE_METADATA
from hadamard_sparse.hf import is_compressed_file
from tests.compress.test_compress import assert_bitwise, bits, make
from tests.conftest import minilm_path
from tests.hf_models import bert_config, transformers

safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")


def _tiny_bert(quantize: str | None = None) -> dict[str, torch.Tensor]:
    """A baked 90%-sparse small BERT's state_dict (Linear and Embedding weights pruned; -0.0 where masked)."""
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config(hidden_size=128, intermediate_size=512)).eval()
    hs.remove_parametrizations(hs.sparsify(model, 0.9, scope="layer", include=[nn.Linear, nn.Embedding]))
    return model.state_dict()


def _mixed(quantize: str | None = None) -> dict[str, torch.Tensor]:
    """Many dtypes, with -0.0 and NaN payloads (not for int8, which refuses NaN), a sparsified model's bool
    masks, 0-d, empty and tiny tensors, a tied (shared-storage) pair: what the codec must carry bitwise."""
    specials = quantize is None
    out: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(
        [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]
    ):
        out[f"t{i}.weight"] = make((40, 33), dtype, 0.1, seed=i, specials=specials)
        out[f"t{i}.dense"] = make((17, 5), dtype, 0.9, seed=10 + i, specials=specials)
    out["fp8"] = make((20, 20), torch.float8_e4m3fn, 0.2, seed=3, specials=specials)
    out["scalar"] = torch.tensor(-0.0)
    out["empty"] = torch.empty(0, 4)
    out["tiny"] = torch.tensor([1.5])
    out["tied"] = out["t0.weight"]
    out["lin.weight_mask"] = torch.rand(64, 64, generator=torch.Generator().manual_seed(5)) < 0.1
    return out


CASES: dict[str, Callable[[str | None], dict[str, torch.Tensor]]] = {"tiny_bert": _tiny_bert, "mixed": _mixed}


def _read_raw(path: Path) -> tuple[dict, bytes]:
    """(JSON header, data bytes) of a safetensors file, read without safetensors."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _record(path: Path) -> dict:
    return json.loads(_read_raw(path)[0]["__metadata__"][CODEC_KEY])


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_zlib_round_trip_matches_codec_none(case: str, quantize: str | None, tmp_path: Path) -> None:
    """load_compressed of the zlib file is bitwise what it gives for the codec=None file; the file is
    smaller; each compressed tensor is zlib.decompress of its stored bytes = compress_state_dict's tensor
    (read with safetensors and zlib alone); the others are stored unchanged; the checksums are of the
    stored bytes."""
    sd = CASES[case](quantize)
    plain, packed = tmp_path / "plain.safetensors", tmp_path / "zlib.safetensors"
    hs.save_compressed(sd, plain, quantize=quantize)
    hs.save_compressed(sd, packed, quantize=quantize, codec="zlib")
    reference = hs.load_compressed(plain)
    assert_bitwise(hs.load_compressed(packed), reference)
    assert_bitwise(hs.load_compressed(packed, verify=False), reference)
    assert os.path.getsize(packed) < os.path.getsize(plain)
    expected = hs.compress_state_dict(sd, quantize=quantize)
    stored = safetensors_torch.load_file(str(packed))
    record = _record(packed)
    assert record["codec"] == "zlib" and sorted(stored) == sorted(expected)
    assert record["tensors"], "nothing was compressed"
    for key, t in expected.items():
        if key in record["tensors"]:
            dtype, shape = record["tensors"][key]
            assert (dtype, shape) == (str(t.dtype).removeprefix("torch."), list(t.shape)), key
            assert stored[key].dtype == torch.uint8 and stored[key].dim() == 1, key
            assert stored[key].numel() < t.numel() * t.element_size(), key
            raw = zlib.decompress(stored[key].numpy().tobytes())
            assert raw == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), key
        else:
            assert stored[key].dtype == t.dtype and torch.equal(bits(stored[key]), bits(t)), key
    with safetensors_torch.safe_open(str(packed), "pt") as f:
        sums = f.metadata()[CHECKSUM_KEY].split(",")
        assert f.metadata()["hadamard_sparse.compressed"] == "1"
    assert [int(s, 16) for s in sums] == [
        zlib.crc32(stored[k].reshape(-1).view(torch.uint8).numpy()) for k in sorted(stored)
    ]
    assert is_compressed_file(packed)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_codec_none_writes_the_same_file(quantize: str | None, tmp_path: Path) -> None:
    """codec=None (also the default) writes what save_compressed wrote before codecs: compress_state_dict's
    tensors with FILE_METADATA and the checksums, nothing more (compared as parsed header + data bytes, since
    safetensors writes the metadata keys in no fixed order)."""
    sd = _tiny_bert()
    default, explicit, reference = (tmp_path / f"{n}.safetensors" for n in ("default", "none", "ref"))
    hs.save_compressed(sd, default, quantize=quantize, metadata={"note": "x"})
    hs.save_compressed(sd, explicit, quantize=quantize, metadata={"note": "x"}, codec=None)
    tensors = hs.compress_state_dict(sd, quantize=quantize)
    sums = ",".join(
        f"{zlib.crc32(tensors[k].reshape(-1).view(torch.uint8).numpy()):08x}" for k in sorted(tensors)
    )
    meta = {"note": "x", **FILE_METADATA, CHECKSUM_KEY: sums}
    safetensors_torch.save_file(tensors, str(reference), metadata=meta)
    assert _read_raw(default) == _read_raw(reference) == _read_raw(explicit)
    assert CODEC_KEY not in _read_raw(default)[0]["__metadata__"]


def _flip(path: Path, key: str, at: int) -> None:
    """Flips the bits of byte ``at`` of stored tensor ``key`` (located through the safetensors header)."""
    header, _ = _read_raw(path)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = header[key]["data_offsets"]
    assert 0 <= at < end - begin
    raw[8 + n + begin + at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("at", ["start", "middle", "end"])
def test_corrupt_stream_fails_checksum_or_decoding(at: str, tmp_path: Path) -> None:
    """A flipped byte in a compressed stream: a checksum error naming the stored tensor (verify=True, before
    any decompression); with verify=False an InvalidArgumentError naming the file and the tensor, never a raw
    zlib.error."""
    sd = _tiny_bert()
    path = tmp_path / "m.safetensors"
    hs.save_compressed(sd, path, quantize="int8", codec="zlib")
    key = "encoder.layer.1.intermediate.dense.weight.__bitmask__"
    assert key in _record(path)["tensors"]
    size = safetensors_torch.load_file(str(path))[key].numel()
    _flip(path, key, {"start": 0, "middle": size // 2, "end": size - 1}[at])
    with pytest.raises(hs.InvalidArgumentError, match=rf"stored tensor '{key}' fails its checksum"):
        hs.load_compressed(path)
    with pytest.raises(hs.InvalidArgumentError) as info:
        hs.load_compressed(path, verify=False)
    assert str(path) in str(info.value) and f"stored tensor '{key}' (zlib)" in str(info.value)
    assert "corrupt" in str(info.value) and not isinstance(info.value, zlib.error)


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor], dict], str | None]) -> None:
    """Rewrites a codec file without checksums after ``edit(tensors, record)``, which may edit both and
    returns the codec metadata to write (``json.dumps(record)`` when it returns ``None``)."""
    tensors = safetensors_torch.load_file(str(path))
    record = _record(path)
    text = edit(tensors, record)
    meta = {**FILE_METADATA, CODEC_KEY: json.dumps(record) if text is None else text}
    safetensors_torch.save_file(tensors, str(path), metadata=meta)


K = "w.__values__"  # a zlib-compressed tensor of the file below: 40 float32 values


def _set(d: dict, key: str, value: object) -> None:
    d[key] = value


STREAM_EDITS = {
    "truncated": (lambda t, r: _set(t, K, t[K][:-5].clone()), "truncated|does not decompress"),
    "extra bytes": (lambda t, r: _set(t, K, torch.cat([t[K], t[K][:3]])), "extra bytes"),
    "garbage": (lambda t, r: _set(t, K, torch.full((40,), 7, dtype=torch.uint8)), "does not decompress"),
    "shape too small": (lambda t, r: _set(r["tensors"][K], 1, [10]), "must decompress to 40 bytes"),
    "shape too large": (lambda t, r: _set(r["tensors"][K], 1, [10**6]), "must decompress to 4000000 bytes"),
    "dtype wider": (
        lambda t, r: _set(r["tensors"][K], 0, "float64"),
        "320 bytes .* decompresses to 160 bytes",
    ),
}
RECORD_EDITS = {
    "not json": (lambda t, r: "{zlib", "not JSON"),
    "not an object": (lambda t, r: "[1, 2]", "expected"),
    "extra field": (lambda t, r: _set(r, "level", 9), "expected"),
    "unknown codec": (lambda t, r: _set(r, "codec", "lzma"), "codec 'lzma'"),
    "missing key": (lambda t, r: _set(r["tensors"], "nope", ["float32", [3]]), "'nope'.* no such tensor"),
    "unknown dtype": (lambda t, r: _set(r["tensors"], K, ["complex64", [100]]), f"'{K}'.*expected"),
    "dtype not str": (lambda t, r: _set(r["tensors"], K, [["float32"], [100]]), f"'{K}'.*expected"),
    "negative size": (lambda t, r: _set(r["tensors"], K, ["float32", [-1]]), f"'{K}'.*expected"),
    "bool size": (lambda t, r: _set(r["tensors"], K, ["float32", [True]]), f"'{K}'.*expected"),
    "not bytes": (lambda t, r: _set(r["tensors"], "b", ["float32", [3]]), "'b'.*1-D uint8"),
}


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("name", [*STREAM_EDITS, *RECORD_EDITS])
def test_malformed_streams_and_records(name: str, verify: bool, tmp_path: Path) -> None:
    """A stream that does not decompress to exactly its tensor's bytes, and a malformed codec record: an
    InvalidArgumentError naming the file and the stored tensor, with verify on or off (the file has no
    checksums, as written by another tool)."""
    path = tmp_path / "m.safetensors"
    w = torch.zeros(40, 40).index_fill_(1, torch.tensor([3]), 2.0)
    hs.save_compressed({"w": w, "b": torch.ones(3)}, path, codec="zlib")
    assert K in _record(path)["tensors"] and "b" not in _record(path)["tensors"]
    edit, match = {**STREAM_EDITS, **RECORD_EDITS}[name]
    _rewrite(path, edit)
    with pytest.raises(hs.InvalidArgumentError, match=match) as info:
        hs.load_compressed(path, verify=verify)
    assert str(path) in str(info.value)
    if name in STREAM_EDITS:
        assert f"stored tensor '{K}' (zlib)" in str(info.value)
    else:
        assert f"codec metadata '{CODEC_KEY}'" in str(info.value)


@pytest.mark.parametrize("codec", ["lzma", "ZLIB", "", "gzip", 1, True, ["zlib"]])
def test_bad_codec_values_refused_before_writing(codec: object, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(
        hs.InvalidArgumentError, match=re.escape(f"codec must be None or one of 'zlib', got {codec!r}")
    ):
        hs.save_compressed({"w": torch.zeros(8, 8)}, path, codec=codec)  # type: ignore[arg-type]
    assert not path.exists()
    with pytest.raises(hs.InvalidArgumentError, match="reserved for the codec record"):
        hs.save_compressed({"w": torch.zeros(8, 8)}, path, metadata={CODEC_KEY: "{}"})
    assert not path.exists()


def test_minilm_linear_only_int8_zlib_target(tmp_path: Path) -> None:
    """Issue 22's target on the real all-MiniLM-L6-v2: 90%-sparse Linears (embeddings dense), int8 values and
    embeddings, zlib: <= 0.15x the dense safetensors file (0.162x without the codec), and bitwise what the
    codec=None file loads."""
    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    hs.remove_parametrizations(hs.sparsify(model, 0.9, scope="layer"))
    sd = model.state_dict()
    dense, plain, packed = (tmp_path / f"{n}.safetensors" for n in ("dense", "plain", "zlib"))
    safetensors_torch.save_file(sd, str(dense))
    hs.save_compressed(sd, plain, quantize="int8")
    hs.save_compressed(sd, packed, quantize="int8", codec="zlib")
    ratio = os.path.getsize(packed) / os.path.getsize(dense)
    assert ratio <= 0.15, ratio
    assert math.isclose(ratio, 0.143, abs_tol=0.005), ratio
    assert os.path.getsize(plain) / os.path.getsize(dense) > 0.155
    assert_bitwise(hs.load_compressed(packed), hs.load_compressed(plain))
