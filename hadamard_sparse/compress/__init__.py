"""Compressed state_dicts and files.

``quant.py``: int8 storage with per-row scales (the error bound, which tensors).
``layouts.py``: the dense / bitmask + values / CSR layouts as plain tensors
(:func:`compress_state_dict`, :func:`decompress_state_dict`; the format is documented there).
``files.py``: safetensors files with per-tensor checksums (:func:`save_compressed`,
:func:`load_compressed`).
``codec.py``: the optional lossless codec of those files (``codec="zlib"``: zlib per stored tensor).
``sizes.py``: :func:`size_report`, the bytes of each tensor dense / int8 / compressed.
"""

from .codec import CODEC_KEY, CODECS
from .files import CHECKSUM_KEY, load_compressed, save_compressed
from .layouts import DTYPE_CODES, FILE_METADATA, compress_state_dict, decompress_state_dict
from .quant import QUANTIZE_MODES
from .sizes import SizeReport, TensorSize, size_report

__all__ = [
    "CHECKSUM_KEY",
    "CODECS",
    "CODEC_KEY",
    "DTYPE_CODES",
    "FILE_METADATA",
    "QUANTIZE_MODES",
    "SizeReport",
    "TensorSize",
    "compress_state_dict",
    "decompress_state_dict",
    "load_compressed",
    "save_compressed",
    "size_report",
]
