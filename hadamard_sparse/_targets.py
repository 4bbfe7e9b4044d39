"""Old name of :mod:`hadamard_sparse.layers`, kept importable while the package switches to it."""

from __future__ import annotations

from .layers import (
    Selector,
    Selectors,
    Target,
    check_not_wrapped,
    layer_kind,
    resolve_targets,
    shared_parameter_ids,
    weight_dims,
)

__all__: list[str] = []  # private module

_shared_parameter_ids = shared_parameter_ids
__reexports__ = (
    Selector,
    Selectors,
    Target,
    check_not_wrapped,
    layer_kind,
    resolve_targets,
    weight_dims,
)
