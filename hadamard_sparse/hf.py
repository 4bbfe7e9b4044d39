"""Hugging Face model directories, sparse and compressed: :func:`save_pretrained`, :func:`load_pretrained`.

A directory written by ``save_pretrained(model, out_dir, compress=True)`` holds the usual config (and
whatever else ``model.save_pretrained`` writes) and one weights file, ``model.compressed.safetensors``
(:func:`~hadamard_sparse.compress.save_compressed`), in place of ``model.safetensors``: plain
``from_pretrained`` refuses it loudly (no ``model.safetensors``) instead of initialising random
weights, and :func:`load_pretrained` loads it back with its masks. transformers is imported inside the
functions (an optional dependency).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_sparse_state_dict, record_key_pattern
from .compress import load_compressed, save_compressed
from .compress.codec import check_codec
from .compress.quant import check_quantize
from .errors import InvalidArgumentError, InvalidTypeError

#: The weights file of a compressed directory.
COMPRESSED_WEIGHTS = "model.compressed.safetensors"

_COMPRESSED_KEY = "hadamard_sparse.compressed"


def is_compressed_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`~hadamard_sparse.compress.save_compressed`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as h:
        return _COMPRESSED_KEY in (h.metadata() or {})


def _weight_files(d: Path) -> list[Path]:
    """The weight files ``model.save_pretrained`` writes in ``d`` (single file, shards and their index)."""
    names = (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    shards = [*d.glob("model-*-of-*.safetensors"), *d.glob("pytorch_model-*-of-*.bin")]
    return sorted([d / n for n in names if (d / n).is_file()] + shards)


def _untied(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each tied tensor (same storage, offset, shape and strides) kept under its first name.

    As ``model.save_pretrained`` does: the model ties them again when it is built, and
    :func:`~hadamard_sparse.checkpoint.load_sparse_state_dict` accepts a tied tensor loaded under one name.
    """
    seen: set[tuple[Any, ...]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t
    return out


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    compress: bool = False,
    quantize: str | None = None,
    codec: str | None = None,
) -> None:
    """Write a Hugging Face model directory, sparse or baked, optionally with compressed weights.

    ``model.save_pretrained(out_dir)`` writes the config and the weights: a sparsified model's effective
    weights under their usual names with ``"<name>_mask"`` records beside them, a baked model's plain
    weights. With ``compress=True`` the weights file (and any shards or index) is replaced by
    ``model.compressed.safetensors`` holding ``save_compressed(model.state_dict())``, so plain
    ``from_pretrained`` fails ("no file named model.safetensors") rather than initialising random
    weights; load it with :func:`load_pretrained`. If writing fails, a directory this call created is
    removed.

    Args:
        model: a transformers ``PreTrainedModel`` (sparsified, baked or dense).
        out_dir: the directory to write (created if missing; must not be a file).
        compress: store the weights compressed (bitmask + values or CSR for sparse tensors).
        quantize: with ``compress=True``, ``"int8"`` stores the floating tensors of two or more
            dimensions (weights, embeddings) as int8 with per-row scales (within ``max|row| / 254``
            per entry; biases, LayerNorm and masks exact), as
            :func:`~hadamard_sparse.compress.save_compressed` does; ``None`` keeps every tensor bitwise.
        codec: with ``compress=True``, ``"zlib"`` stores each tensor of the compressed file that zlib
            makes smaller as its compressed bytes (lossless; ``save_compressed``'s ``codec``);
            :func:`load_pretrained` reads it back as it does without.

    Example::

        >>> hs.sparsify(model, 0.9)
        >>> hs.save_pretrained(hs.remove_parametrizations(model), "out", compress=True)
        >>> model = hs.load_pretrained("out")
        >>> hs.save_pretrained(model, "out-small", compress=True, quantize="int8", codec="zlib")
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "save_pretrained", None)):
        raise InvalidTypeError(
            f"model must be a Hugging Face PreTrainedModel (with save_pretrained), got {type(model).__name__}"
        )
    if not isinstance(out_dir, (str, os.PathLike)):
        raise InvalidTypeError(f"out_dir must be a str or os.PathLike, got {type(out_dir).__name__}")
    if not isinstance(compress, bool):
        raise InvalidTypeError(f"compress must be a bool, got {type(compress).__name__}")
    check_quantize(quantize, None, ())
    if quantize is not None and not compress:
        raise InvalidArgumentError(
            f"quantize={quantize!r} needs compress=True (it applies to compressed weights)"
        )
    check_codec(codec)
    if codec is not None and not compress:
        raise InvalidArgumentError(f"codec={codec!r} needs compress=True (it applies to compressed weights)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"out_dir {str(out)!r} exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if compress:
            for f in _weight_files(out):  # stale weights of an earlier save would shadow the compressed file
                f.unlink()
        model.save_pretrained(out, safe_serialization=True)
        if compress:
            save_compressed(
                _untied(model.state_dict()), out / COMPRESSED_WEIGHTS, quantize=quantize, codec=codec
            )
            for f in _weight_files(out):
                f.unlink()
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


#: Files never copied from a source model directory by :func:`copy_model_files`: the weights, written anew.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".ot",
    ".gguf",
)


def copy_model_files(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Copy every file of ``src`` except weights (tokenizer, sentence-transformers modules, README...) to ``out``."""
    src, out = Path(src), Path(out)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / rel)


def save_model_dir(
    model: nn.Module,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    compress: bool = False,
    quantize: str | None = None,
    codec: str | None = None,
    weights_under: str = "",
) -> None:
    """Write ``out``: the other files of the model directory ``src``, then ``model``'s config and weights.

    ``compress``, ``quantize`` and ``codec`` are :func:`save_pretrained`'s. ``weights_under`` is the subfolder of ``out`` the weights go to (a sentence-transformers
    directory whose Transformer module lives in a subfolder). If writing fails, a directory this
    call created is removed.
    """
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        copy_model_files(src, out)
        save_pretrained(
            model,
            out / weights_under if weights_under else out,
            compress=compress,
            quantize=quantize,
            codec=codec,
        )
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _model_class(config: Any, model_class: Any) -> Any:
    """``model_class``, else the transformers class the config's ``architectures`` names, else ``AutoModel``."""
    import transformers

    if model_class is not None:
        return model_class
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    return cls


def _main_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The most common floating-point dtype among the tensors (by element count), or ``None``."""
    counts: Counter[torch.dtype] = Counter()
    for t in state_dict.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0] if counts else None


def _sparse_records(model_dir: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of the directory's safetensors files when they hold sparsity records, else ``None``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    record_key = record_key_pattern()
    has_records = False
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            if any(record_key.match(k.rpartition(".")[2]) for k in h.keys()):
                has_records = True
                break
    if not has_records:
        return None
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _for_base_model(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` of a model with a head, loaded into its base model: the prefix dropped, the head left out.

    (What ``from_pretrained`` does when ``model_class`` is the base class of the saved one.)
    """
    head = f"{getattr(model, 'base_model_prefix', '')}."
    if head == "." or any(k.startswith(head) for k in model.state_dict()):
        return state
    if not any(k.startswith(head) for k in state):
        return state
    return {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}


def load_pretrained(model_dir: str | os.PathLike[str], *, model_class: Any = None) -> nn.Module:
    """Load a Hugging Face model directory, restoring masks and reading compressed weights.

    - A compressed directory (written by ``save_pretrained(..., compress=True)``, int8-quantized or
      not, with ``codec="zlib"`` or not): the model is built from its config in the dtype of the saved tensors (int8 tensors are
      dequantized to theirs), then loaded with
      :func:`~hadamard_sparse.checkpoint.load_sparse_state_dict`, so the masks come back bitwise as
      parametrizations.
    - A plain directory written while sparse (``"<name>_mask"`` records in its safetensors):
      ``from_pretrained``, then ``load_sparse_state_dict`` with the file's tensors.
    - A plain dense directory: ``from_pretrained``.

    Args:
        model_dir: the directory (with ``config.json``).
        model_class: the transformers class to build (default: the class named by the config's
            ``architectures``, else ``AutoModel``).

    Returns:
        The model, in eval mode.

    Raises:
        InvalidArgumentError: ``model_dir`` is not a directory with a ``config.json``.

    Example::

        >>> model = hs.load_pretrained("out")  # written by hs.save_pretrained(model, "out", compress=True)
        >>> print(hs.sparsity_report(model))
    """
    if not isinstance(model_dir, (str, os.PathLike)):
        raise InvalidTypeError(f"model_dir must be a str or os.PathLike, got {type(model_dir).__name__}")
    if model_class is not None and not (
        isinstance(model_class, type) and hasattr(model_class, "from_pretrained")
    ):
        raise InvalidTypeError(
            f"model_class must be a transformers model class (with from_pretrained) or None, got {model_class!r}"
        )
    d = Path(model_dir)
    if not d.is_dir():
        raise InvalidArgumentError(f"model_dir {str(d)!r} is not a directory")
    if not (d / "config.json").is_file():
        raise InvalidArgumentError(
            f"model_dir {str(d)!r} is not a Hugging Face model directory (no config.json)"
        )
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(d)
    cls = _model_class(config, model_class)
    compressed = d / COMPRESSED_WEIGHTS
    if compressed.is_file():
        state = load_compressed(compressed)
        dtype = _main_dtype(state)
        kwargs = {} if dtype is None else {"dtype": dtype}
        build = getattr(cls, "from_config", None) or cls._from_config
        model = build(config, **kwargs)
        load_sparse_state_dict(model, _for_base_model(model, state))
        return model.eval()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # the "<name>_mask" records are unexpected keys to it
    try:
        model = cls.from_pretrained(d).eval()
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    state = _sparse_records(d)
    if state is not None:
        load_sparse_state_dict(model, state)
    return model


__all__ = [
    "COMPRESSED_WEIGHTS",
    "WEIGHT_SUFFIXES",
    "copy_model_files",
    "is_compressed_file",
    "load_pretrained",
    "save_model_dir",
    "save_pretrained",
]
