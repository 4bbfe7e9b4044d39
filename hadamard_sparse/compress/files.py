"""Compressed safetensors files: :func:`save_compressed`, :func:`load_compressed`, per-tensor checksums.

:func:`save_compressed` writes ``compress_state_dict(state_dict)`` with safetensors and records a
CRC-32 (``zlib.crc32``) of every stored tensor's bytes in the file's metadata, under
:data:`CHECKSUM_KEY`: 8 hex digits per stored tensor, comma-separated, in the order of the sorted
stored keys (9 bytes per tensor; the keys are the file's own). :func:`load_compressed`
checks each tensor against it before decoding, so a flipped byte in stored values is an error naming
the tensor instead of a silently wrong weight. Files without that entry (written before checksums
existed, or by other tools) load unchecked. safetensors is imported inside the functions (an optional
dependency).

With ``codec="zlib"`` the stored tensors that zlib makes smaller are stored as their compressed bytes
(:mod:`hadamard_sparse.compress.codec`, one JSON record under :data:`~hadamard_sparse.compress.codec.CODEC_KEY`).
The checksums cover the bytes *as stored* (the compressed stream for those tensors), so
:func:`load_compressed` checks a file before decompressing anything, and a corrupt stream is a
checksum error like any flipped byte.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence

import torch

from ..errors import InvalidArgumentError, InvalidTypeError
from .codec import CODEC_KEY, check_codec, decode_tensors, encode_tensors
from .layouts import FILE_METADATA, compress_state_dict, decompress_state_dict

__all__ = ["CHECKSUM_KEY", "load_compressed", "save_compressed", "tensor_crc32"]

#: Metadata key of the per-tensor checksums (CRC-32s as 8 hex digits, comma-separated, sorted keys).
CHECKSUM_KEY = "hadamard_sparse.crc32"
_HEX = "0123456789abcdef"


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 (``zlib.crc32``) of a tensor's bytes in row-major order, as safetensors stores them."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return zlib.crc32(flat.contiguous().view(torch.uint8).numpy().data)


def save_compressed(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, str] | None = None,
    quantize: str | None = None,
    quantize_include: Sequence[str] | None = None,
    quantize_exclude: Sequence[str] = (),
    codec: str | None = None,
) -> None:
    """Writes ``compress_state_dict(state_dict, quantize=...)`` to a safetensors file, with checksums.

    Tensors that share storage (tied weights) are written once each (cloned), as
    safetensors requires. The file's metadata holds :data:`FILE_METADATA`, a CRC-32 of every
    stored tensor (:data:`CHECKSUM_KEY`, checked by :func:`load_compressed`), plus ``metadata``.
    With ``codec="zlib"``, each stored tensor that zlib (level 9) makes smaller is stored as a 1-D
    ``uint8`` tensor of its compressed bytes, recorded under
    :data:`~hadamard_sparse.compress.codec.CODEC_KEY` (original dtype and shape per key); the
    checksums are those of the bytes as stored. Lossless: :func:`load_compressed` gives back what it
    gives for ``codec=None``, bitwise. Every argument is checked before anything is computed or written.

    Args:
        state_dict: names to tensors, e.g. a baked model's ``state_dict()``.
        path: the file to write.
        metadata: extra string metadata for the file header.
        quantize: ``None`` (every tensor bitwise) or ``"int8"`` (floating tensors of two or more
            dimensions as int8 with per-row scales, within ``max|row| / 254`` per entry; see
            :func:`~hadamard_sparse.compress.compress_state_dict`).
        quantize_include: glob patterns of the keys to quantize, replacing the default rule.
        quantize_exclude: glob patterns of keys kept exact.
        codec: ``None`` (the default: the tensors as ``compress_state_dict`` gives them, readable by
            any safetensors reader) or ``"zlib"`` (lossless, smaller; e.g. bitmasks and int8 values;
            costs CPU time to write and a little to read; see ``docs/speed.md``).

    Raises:
        InvalidTypeError: ``metadata`` is not a dict of str to str, or see
            :func:`~hadamard_sparse.compress.compress_state_dict`.
        InvalidArgumentError: ``codec`` is not ``None`` or ``"zlib"``; ``metadata`` uses a reserved
            key; or see :func:`~hadamard_sparse.compress.compress_state_dict`.

    Example::

        >>> hs.save_compressed(model.state_dict(), "model.safetensors")
        >>> model.load_state_dict(hs.load_compressed("model.safetensors"))
        >>> hs.save_compressed(model.state_dict(), "model-int8.safetensors", quantize="int8")
        >>> hs.save_compressed(model.state_dict(), "model-int8-zlib.safetensors", quantize="int8", codec="zlib")
    """
    from safetensors.torch import save_file

    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InvalidTypeError(f"metadata must be a dict of str to str or None, got {metadata!r}")
    for key, what in ((CHECKSUM_KEY, "the checksums"), (CODEC_KEY, "the codec record")):
        if metadata is not None and key in metadata:
            raise InvalidArgumentError(f"metadata key {key!r} is reserved for {what}")
    check_codec(codec)
    tensors = compress_state_dict(
        state_dict, quantize=quantize, quantize_include=quantize_include, quantize_exclude=quantize_exclude
    )
    seen: set[int] = set()
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            tensors[key] = t.clone()
        seen.add(ptr)
    tensors, record = encode_tensors(tensors, codec)
    sums = ",".join(f"{tensor_crc32(tensors[key]):08x}" for key in sorted(tensors))
    header = {**(metadata or {}), **FILE_METADATA, CHECKSUM_KEY: sums}
    if record is not None:
        header[CODEC_KEY] = record
    save_file(tensors, os.fspath(path), metadata=header)


def _verify(path: str, tensors: Mapping[str, torch.Tensor], recorded: str) -> None:
    """Raises if a stored tensor's CRC-32 differs from the file's record (or the record is malformed)."""
    keys = sorted(tensors)
    sums = recorded.split(",") if recorded else []
    if len(sums) != len(keys) or not all(len(v) == 8 and set(v) <= set(_HEX) for v in sums):
        raise InvalidArgumentError(
            f"{path!r}: the checksum metadata {CHECKSUM_KEY!r} is malformed (expected {len(keys)} "
            f"comma-separated CRC-32s of 8 hex digits, one per stored tensor, got {recorded[:80]!r}): "
            "the file header is corrupt. Pass verify=False to load it unchecked"
        )
    expected = {key: int(v, 16) for key, v in zip(keys, sums)}
    for key in keys:
        got = tensor_crc32(tensors[key])
        if got != expected[key]:
            raise InvalidArgumentError(
                f"{path!r}: stored tensor {key!r} fails its checksum (CRC-32 {got:08x}, recorded "
                f"{expected[key]:08x}): the file is corrupt. Pass verify=False to load it unchecked"
            )


def load_compressed(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True
) -> dict[str, torch.Tensor]:
    """Reads a safetensors file written by :func:`save_compressed` (or any safetensors file).

    Int8-quantized tensors come back dequantized, in their original dtype; all others bitwise.

    Args:
        path: the file to read.
        device: where the tensors are loaded.
        verify: check every stored tensor against the CRC-32 recorded by :func:`save_compressed`
            (of its bytes as stored, compressed ones for a ``codec="zlib"`` file, checked before
            decompressing; files without checksums load unchecked). Costs about a millisecond per 3 MB read
            (see ``docs/speed.md``); ``False`` skips it.

    Returns:
        ``decompress_state_dict(safetensors.torch.load_file(path))`` on ``device``, after the
        tensors a codec compressed (``save_compressed(..., codec="zlib")``) are decompressed.

    Raises:
        InvalidArgumentError: ``verify`` is on and a stored tensor's bytes differ from its
            recorded checksum (the message names the tensor), or the checksum record is malformed;
            the codec record is malformed or a compressed tensor does not decompress (with
            ``verify=False`` too; the message names the file and the tensor).

    Example::

        >>> model.load_state_dict(hs.load_compressed("model.safetensors"))
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not isinstance(verify, bool):
        raise InvalidTypeError(f"verify must be a bool, got {type(verify).__name__}")
    file = os.fspath(path)
    with safe_open(file, framework="pt") as h:
        header = h.metadata() or {}
    recorded = header.get(CHECKSUM_KEY) if verify else None
    record = header.get(CODEC_KEY)
    if recorded is None and record is None:
        return decompress_state_dict(load_file(file, device=str(device)))
    tensors = load_file(file, device="cpu")
    if recorded is not None:
        _verify(file, tensors, recorded)
    if record is not None:
        tensors = decode_tensors(file, tensors, record)
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return decompress_state_dict(tensors)
