"""A lossless per-tensor codec for compressed files: zlib over a stored tensor's bytes.

``save_compressed(..., codec="zlib")`` passes each tensor it stores (the output of
:func:`~hadamard_sparse.compress.compress_state_dict`: bitmasks, values, scales, dense tensors)
through :func:`encode_tensors`: a tensor whose bytes (row-major, as safetensors stores them)
``zlib.compress`` at level 9 makes smaller, counting the bytes of its record below, is stored as a
1-D ``uint8`` tensor of the compressed bytes under its own key; the others are stored as they are.
One metadata entry of the safetensors file, :data:`CODEC_KEY`, records what decoding needs, as
compact JSON::

    {"codec":"zlib","tensors":{"w.__values__":["int8",[12345]],"b":["float32",[384]]}}

(the stored key, then the original dtype name and shape). :func:`decode_tensors` restores those
tensors bitwise; :func:`~hadamard_sparse.compress.load_compressed` runs it after the checksums, which
cover the *stored* (compressed) bytes. A plain safetensors reader sees the ``uint8`` streams: each
decodes with ``zlib.decompress`` and the record above.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Mapping

import torch

from ..errors import InvalidArgumentError
from .layouts import DTYPE_CODES

__all__ = ["CODECS", "CODEC_KEY", "ZLIB_LEVEL", "check_codec", "decode_tensors", "encode_tensors"]

#: The allowed values of ``codec`` (besides ``None``).
CODECS = ("zlib",)
#: Metadata key of the codec record (one JSON object, see the module docstring).
CODEC_KEY = "hadamard_sparse.codec"
#: The ``zlib.compress`` level of ``codec="zlib"`` (the smallest files; decoding speed does not depend on it).
ZLIB_LEVEL = 9
_DTYPES = {str(d).removeprefix("torch."): d for d in DTYPE_CODES}


def check_codec(codec: object) -> str | None:
    """Returns ``codec`` if it is ``None`` or one of :data:`CODECS`, else raises :class:`InvalidArgumentError`."""
    if codec is not None and not (isinstance(codec, str) and codec in CODECS):
        allowed = ", ".join(repr(c) for c in CODECS)
        raise InvalidArgumentError(f"codec must be None or one of {allowed}, got {codec!r}")
    return codec


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, as safetensors stores them (no copy for a contiguous CPU tensor)."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def encode_tensors(
    tensors: Mapping[str, torch.Tensor], codec: str | None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Compresses the tensors that shrink with ``codec``.

    Args:
        tensors: stored key to tensor (e.g. the output of ``compress_state_dict``).
        codec: ``None`` (nothing changes) or ``"zlib"``.

    Returns:
        ``(tensors, record)``: a new dict, in the same order, with each tensor that shrank replaced by
        a 1-D ``uint8`` tensor of its compressed bytes (on the CPU), and the JSON record to store under
        :data:`CODEC_KEY` (``None`` when no tensor shrank or ``codec`` is ``None``).

    Example::

        >>> out, record = encode_tensors({"w": torch.zeros(1000)}, "zlib")
        >>> out["w"].dtype, json.loads(record)["tensors"]
        (torch.uint8, {'w': ['float32', [1000]]})
    """
    check_codec(codec)
    out = dict(tensors)
    if codec is None:
        return out, None
    entries: dict[str, list[object]] = {}
    for key, t in tensors.items():
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES or t.numel() == 0 or t.device.type == "meta":
            continue
        raw = _raw(t)
        packed = zlib.compress(raw, ZLIB_LEVEL)
        entry: list[object] = [name, list(t.shape)]
        if len(packed) + len(json.dumps({key: entry}, separators=(",", ":"))) < len(raw):
            out[key] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
            entries[key] = entry
    if not entries:
        return out, None
    return out, json.dumps({"codec": codec, "tensors": entries}, separators=(",", ":"))


def _parse(
    path: str, record: str, keys: Mapping[str, torch.Tensor]
) -> dict[str, tuple[torch.dtype, list[int]]]:
    """``{stored key: (dtype, shape)}`` of a codec record, checked against the file's tensors."""

    def bad(why: str, key: str | None = None) -> InvalidArgumentError:
        where = f"the codec metadata {CODEC_KEY!r}" + (f" of stored tensor {key!r}" if key else "")
        return InvalidArgumentError(
            f"{path!r}: {where} is malformed ({why}; got {record[:80]!r}): the file header is corrupt"
        )

    try:
        data = json.loads(record)
    except ValueError as e:
        raise bad(f"not JSON: {e}") from None
    if (
        not isinstance(data, dict)
        or set(data) != {"codec", "tensors"}
        or not isinstance(data["tensors"], dict)
    ):
        raise bad('expected {"codec": ..., "tensors": {key: [dtype, shape], ...}}')
    if data["codec"] not in CODECS:
        allowed = ", ".join(repr(c) for c in CODECS)
        raise bad(f"codec {data['codec']!r}; this version of hadamard_sparse reads {allowed}")
    out: dict[str, tuple[torch.dtype, list[int]]] = {}
    for key, entry in data["tensors"].items():
        if key not in keys:
            raise bad("the file has no such tensor", key)
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and entry[0] in _DTYPES
            and isinstance(entry[1], list)
            and all(type(s) is int and s >= 0 for s in entry[1])
        ):
            raise bad(f"expected [dtype, shape] with dtype one of {sorted(_DTYPES)}, got {entry!r}", key)
        t = keys[key]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise bad(
                f"the stored tensor must be 1-D uint8 compressed bytes, got {t.dtype} {tuple(t.shape)}", key
            )
        out[key] = (_DTYPES[entry[0]], entry[1])
    return out


def decode_tensors(path: str, tensors: Mapping[str, torch.Tensor], record: str) -> dict[str, torch.Tensor]:
    """Restores the tensors that :func:`encode_tensors` compressed, bitwise (on the CPU).

    Args:
        path: the file the tensors come from (named in errors).
        tensors: the file's stored tensors (CPU), e.g. ``safetensors.torch.load_file(path)``.
        record: the file's :data:`CODEC_KEY` metadata entry.

    Returns:
        A new dict, in the same order, with each recorded tensor decoded to its dtype and shape.

    Raises:
        InvalidArgumentError: the record is malformed (not JSON, an unknown codec or dtype, a key the
            file does not hold, a stored tensor that is not 1-D ``uint8``), or a stored stream does not
            decompress to exactly ``numel * itemsize`` bytes (a corrupt stream, truncated or too long).
            The message names the file and the stored tensor; ``zlib.error`` is never raised.

    Example::

        >>> out, record = encode_tensors({"w": torch.zeros(1000)}, "zlib")
        >>> torch.equal(decode_tensors("f", out, record)["w"], torch.zeros(1000))
        True
    """
    out = dict(tensors)
    for key, (dtype, shape) in _parse(path, record, tensors).items():
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * dtype.itemsize
        d = zlib.decompressobj()
        try:
            raw = d.decompress(_raw(tensors[key]), min(expected + 1, sys.maxsize))
        except zlib.error as e:
            raise InvalidArgumentError(
                f"{path!r}: stored tensor {key!r} (zlib) does not decompress ({e}): the file is corrupt"
            ) from None
        if len(raw) != expected or not d.eof or d.unconsumed_tail or d.unused_data:
            why = "its stream is truncated" if not d.eof else "its stream has extra bytes"
            if len(raw) != expected:
                why = (
                    f"it decompresses to more than {expected} bytes"
                    if len(raw) > expected
                    else f"it decompresses to {len(raw)} bytes"
                )
            raise InvalidArgumentError(
                f"{path!r}: stored tensor {key!r} (zlib) must decompress to {expected} bytes "
                f"({dtype}, shape {shape}), but {why}: the file is corrupt"
            )
        if numel == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        else:
            out[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).view(shape)
    return out
