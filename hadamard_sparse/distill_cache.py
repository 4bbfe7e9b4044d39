"""The cache of a :class:`~hadamard_sparse.Distiller`'s teacher outputs, keyed by batch contents.

Each entry is what the selected losses need of one batch (``logits``, ``embedding``,
``features``: a list of tensors per hooked module), kept on the CPU, floating tensors optionally
cast to a smaller dtype. Keys are :func:`~hadamard_sparse.distill_losses.batch_key` hashes.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TeacherCache"]


def _to_cache(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU copy of ``t`` (floating tensors cast to ``dtype`` unless it is ``None``)."""
    t = t.detach().to("cpu")
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()


def _size(v: Any) -> int:
    """Bytes of the tensors in ``v`` (a tensor, or dicts and lists of them)."""
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, dict):
        return sum(_size(x) for x in v.values())
    return sum(_size(x) for x in v) if isinstance(v, list) else 0


class TeacherCache:
    """Teacher outputs per batch key, with hit and miss counts.

    Example::

        >>> cache = TeacherCache()
        >>> cache.store("k", {"logits": torch.ones(2, 3)}, torch.float16)
        >>> cache.get("k")["logits"].dtype, cache.get("other"), cache.info()["hits"]
        (torch.float16, None, 1)
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry of ``key`` (counted as a hit), or ``None`` (counted as a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def store(self, key: str, entry: dict[str, Any], dtype: torch.dtype | None) -> None:
        """Keep a CPU copy of ``entry`` under ``key``; floating tensors cast to ``dtype`` unless ``None``."""
        stored: dict[str, Any] = {k: _to_cache(v, dtype) for k, v in entry.items() if k != "features"}
        if "features" in entry:
            stored["features"] = {n: [_to_cache(t, dtype) for t in ts] for n, ts in entry["features"].items()}
        self._entries[key] = stored

    def clear(self) -> None:
        """Forget every entry and reset the counts."""
        self._entries.clear()
        self.hits = self.misses = 0

    def info(self) -> dict[str, int]:
        """``{"batches", "hits", "misses", "bytes"}``."""
        n = sum(_size(e) for e in self._entries.values())
        return {"batches": len(self._entries), "hits": self.hits, "misses": self.misses, "bytes": n}
