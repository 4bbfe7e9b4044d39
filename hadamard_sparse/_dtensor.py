"""DTensor helpers: what a rank owns of a tensor sharded by FSDP2, and plain tensors as replicated DTensors.

``torch.distributed.fsdp.fully_shard`` turns Parameters into ``DTensor`` s (``Shard(0)``: each rank
holds a block of rows) and leaves buffers, such as the bool masks, plain. A plain tensor that is the
same on every rank enters DTensor arithmetic as a ``Replicate`` DTensor (:func:`replicated`, no
communication); :func:`local_part` is the block of a DTensor that this rank *owns*, so that counts
summed over ranks see every entry once. Only ``torch`` is imported; ``torch.distributed.tensor``
lazily, so this module loads where ``torch.distributed`` is not built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["Slices", "as_dtensor", "is_dtensor", "local_part", "local_slices", "local_tensor", "replicated"]

#: The index of a block: one slice per dimension.
Slices = tuple[slice, ...]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (plain tensors and Parameters answer at once)."""
    cls = type(t)
    if cls is torch.Tensor or cls is torch.nn.Parameter or not isinstance(t, torch.Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch.distributed built without DTensor
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of an FSDP2-sharded DTensor (``t.to_local()``), or ``t`` itself if it is plain."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def replicated(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (the same on every rank) as a ``Replicate`` DTensor on ``like``'s mesh; ``t`` if ``like`` is plain."""
    if not is_dtensor(like):
        return t
    return as_dtensor(t, like.device_mesh)  # type: ignore[attr-defined]


def as_dtensor(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``t`` itself if it is a DTensor, else ``t`` (the same on every rank) as a ``Replicate`` DTensor on ``mesh``."""
    if is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def local_slices(x: torch.Tensor) -> Slices:
    """The index of the block of ``x`` (a DTensor on a 1-D mesh) that this rank owns.

    A ``Shard(d)`` rank owns its shard; a replicated tensor is owned by mesh rank 0 alone (the others
    own an empty block), so that counts over ranks see every entry once.
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = x.device_mesh, x.placements  # type: ignore[attr-defined]
    if any(isinstance(p, Shard) for p in placements):
        shape, offset = compute_local_shape_and_global_offset(x.shape, mesh, placements)
        return tuple(slice(o, o + s) for o, s in zip(offset, shape))
    if mesh.get_local_rank() == 0 or x.dim() == 0:
        return tuple(slice(0, n) for n in x.shape)
    return (slice(0, 0), *(slice(0, n) for n in x.shape[1:]))


def local_part(x: torch.Tensor) -> tuple[torch.Tensor, Slices]:
    """The block of the DTensor ``x`` this rank owns (see :func:`local_slices`), as a plain tensor, and its index."""
    from torch.distributed.tensor import Replicate

    if any(p.is_partial() for p in x.placements):  # type: ignore[attr-defined]
        x = x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)  # type: ignore[attr-defined]
    sl = local_slices(x)
    local = x.to_local()  # type: ignore[attr-defined]
    if any(p.is_replicate() for p in x.placements):  # type: ignore[attr-defined]
        local = local[sl]
    want = tuple(s.stop - s.start for s in sl)
    if tuple(local.shape) != want:
        raise InvalidArgumentError(
            f"a DTensor of shape {tuple(x.shape)} with placements {x.placements} has a local block of "  # type: ignore[attr-defined]
            f"shape {tuple(local.shape)}, expected {want} from its placements"
        )
    return local, sl
