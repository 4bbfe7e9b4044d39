"""Compressed safetensors files: :func:`save_compressed`, :func:`load_compressed`, per-tensor checksums.

:func:`save_compressed` writes ``compress_state_dict(state_dict)`` with safetensors and records a
CRC-32 (``zlib.crc32``) of every stored tensor's bytes in the file's metadata, under
:data:`CHECKSUM_KEY`: 8 hex digits per stored tensor, comma-separated, in the order of the sorted
stored keys (9 bytes per tensor; the keys are the file's own). :func:`load_compressed`
checks each tensor against it before decoding, so a flipped byte in stored values is an error naming
the tensor instead of a silently wrong weight. Files without that entry (written before checksums
existed, or by other tools) load unchecked. safetensors is imported inside the functions (an optional
dependency).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence

import torch

from ..errors import InvalidArgumentError, InvalidTypeError
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
) -> None:
    """Writes ``compress_state_dict(state_dict, quantize=...)`` to a safetensors file, with checksums.

    Tensors that share storage (tied weights) are written once each (cloned), as
    safetensors requires. The file's metadata holds :data:`FILE_METADATA`, a CRC-32 of every
    stored tensor (:data:`CHECKSUM_KEY`, checked by :func:`load_compressed`), plus ``metadata``.

    Args:
        state_dict: names to tensors, e.g. a baked model's ``state_dict()``.
        path: the file to write.
        metadata: extra string metadata for the file header.
        quantize: ``None`` (every tensor bitwise) or ``"int8"`` (floating tensors of two or more
            dimensions as int8 with per-row scales, within ``max|row| / 254`` per entry; see
            :func:`~hadamard_sparse.compress.compress_state_dict`).
        quantize_include: glob patterns of the keys to quantize, replacing the default rule.
        quantize_exclude: glob patterns of keys kept exact.

    Example::

        >>> hs.save_compressed(model.state_dict(), "model.safetensors")
        >>> model.load_state_dict(hs.load_compressed("model.safetensors"))
        >>> hs.save_compressed(model.state_dict(), "model-int8.safetensors", quantize="int8")
    """
    from safetensors.torch import save_file

    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InvalidTypeError(f"metadata must be a dict of str to str or None, got {metadata!r}")
    if metadata is not None and CHECKSUM_KEY in metadata:
        raise InvalidArgumentError(f"metadata key {CHECKSUM_KEY!r} is reserved for the checksums")
    tensors = compress_state_dict(
        state_dict, quantize=quantize, quantize_include=quantize_include, quantize_exclude=quantize_exclude
    )
    seen: set[int] = set()
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            tensors[key] = t.clone()
        seen.add(ptr)
    sums = ",".join(f"{tensor_crc32(tensors[key]):08x}" for key in sorted(tensors))
    save_file(tensors, os.fspath(path), metadata={**(metadata or {}), **FILE_METADATA, CHECKSUM_KEY: sums})


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
            (files without checksums load unchecked). Costs about a millisecond per 3 MB read
            (see ``docs/speed.md``); ``False`` skips it.

    Returns:
        ``decompress_state_dict(safetensors.torch.load_file(path))`` on ``device``.

    Raises:
        InvalidArgumentError: ``verify`` is on and a stored tensor's bytes differ from its
            recorded checksum (the message names the tensor), or the checksum record is malformed.

    Example::

        >>> model.load_state_dict(hs.load_compressed("model.safetensors"))
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not isinstance(verify, bool):
        raise InvalidTypeError(f"verify must be a bool, got {type(verify).__name__}")
    file = os.fspath(path)
    if not verify:
        return decompress_state_dict(load_file(file, device=str(device)))
    with safe_open(file, framework="pt") as h:
        recorded = (h.metadata() or {}).get(CHECKSUM_KEY)
    if recorded is None:
        return decompress_state_dict(load_file(file, device=str(device)))
    tensors = load_file(file, device="cpu")
    _verify(file, tensors, recorded)
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return decompress_state_dict(tensors)
