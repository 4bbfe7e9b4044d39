"""Names of parametrized tensors in a state_dict: ``"fc.weight"`` <-> ``"fc.parametrizations.weight.original"``.

``torch.nn.utils.parametrize`` stores a parametrized tensor's value under
``<module>.parametrizations.<tensor>.original`` (``original0``, ``original1``... for a
chain whose ``right_inverse`` returns several tensors). The schedules map between
the dense name and that one here; the checkpoint load hooks build the same names.
This module imports nothing from the package.
"""

from __future__ import annotations

__all__ = ["dense_key", "original_key"]


def original_key(qualified: str, index: int | None = None) -> str:
    """The state_dict key of the ``original`` of the parametrized tensor named ``qualified``.

    Args:
        qualified: the tensor's dotted name, e.g. ``"encoder.fc.weight"``.
        index: ``None`` for a single ``original``, ``i`` for ``original{i}`` of a multi-tensor chain.

    Returns:
        e.g. ``"encoder.fc.parametrizations.weight.original"``.

    Example::

        >>> original_key("fc.weight")
        'fc.parametrizations.weight.original'
    """
    head, _, tensor = qualified.rpartition(".")
    prefix = f"{head}." if head else ""
    return f"{prefix}parametrizations.{tensor}.original{'' if index is None else index}"


def dense_key(key: str) -> str | None:
    """The dense name of a single ``original`` key (the inverse of :func:`original_key`), else ``None``.

    Example::

        >>> dense_key("fc.parametrizations.weight.original")
        'fc.weight'
    """
    parts = key.split(".")
    if len(parts) < 3 or parts[-1] != "original" or parts[-3] != "parametrizations":
        return None
    return ".".join([*parts[:-3], parts[-2]])
