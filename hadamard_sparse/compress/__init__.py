"""Compressed state_dicts and files.

``layouts.py``: the dense / bitmask + values / CSR layouts as plain tensors
(:func:`compress_state_dict`, :func:`decompress_state_dict`; the format is documented there).
``files.py``: safetensors files with per-tensor checksums (:func:`save_compressed`,
:func:`load_compressed`).
"""

from .files import CHECKSUM_KEY, load_compressed, save_compressed
from .layouts import DTYPE_CODES, FILE_METADATA, compress_state_dict, decompress_state_dict

__all__ = [
    "CHECKSUM_KEY",
    "DTYPE_CODES",
    "FILE_METADATA",
    "compress_state_dict",
    "decompress_state_dict",
    "load_compressed",
    "save_compressed",
]
