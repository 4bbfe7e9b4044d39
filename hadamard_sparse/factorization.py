r"""Learned Hadamard factorization ``w = u ⊙ v ⊙ ...``: sparsity from plain weight decay.

A targeted weight is rewritten as the elementwise product of ``depth`` factors,
each its own ``nn.Parameter`` (``original0``, ``original1``, ...). Ordinary
weight decay ``λ`` on the factors (PyTorch's convention: the gradient gets
``+ λ·u``, i.e. the penalty ``(λ/2)·‖u‖²``) has the same minimizers as a
sparsity penalty on the product ``w``:

=========================  ==========================================  ======================
factorization              penalty on ``w`` (times λ)                  name
=========================  ==========================================  ======================
depth 2, elementwise       ``Σ |w|``                                   lasso (L1)
depth D, elementwise       ``(D/2) · Σ |w|^(2/D)``                     L_{2/D} quasi-norm
depth 2, grouped           ``Σ_g ‖w_g‖₂``                              group lasso
depth D, grouped           ``(D/2) · Σ_g ‖w_g‖₂^(2/D)``                group L_{2/D}
=========================  ==========================================  ======================

(``min over u·v = w of (u² + v²)/2 = |w|``, by the AM-GM inequality; with D
factors ``min Σ u_i²/2 = (D/2)|w|^(2/D)``.) So training a factorized model
with SGD or Adam and :func:`factor_param_groups` drives weights to exactly the
solution of the penalized problem, and ``remove_parametrizations(model, threshold)``
bakes it into a plain sparse model.

Grouped factorization (``group="row"``, ``"column"`` or an index map) uses one
*elementwise* factor (``original0``, of the weight's shape) and ``depth - 1``
*group gates* (``original1`` ... , one scalar per group): ``w = v ⊙ γ_1[g] ⊙ ... ⊙ γ_{D-1}[g]``.
A group is switched off as a whole when its gates reach zero.

Example::

    >>> model = hs.factorize(model, depth=2)
    >>> opt = torch.optim.SGD(hs.factor_param_groups(model, weight_decay=1e-4), lr=0.1, momentum=0.9)
    >>> ...  # train as usual
    >>> hs.remove_parametrizations(model, threshold=1e-3)
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._model_io import join_name
from .checkpoint import ensure_load_hook
from .errors import InvalidArgumentError, InvalidTypeError, NoTargetsError
from .layers import Selectors, Target, check_not_wrapped, resolve_targets, targeted_layers, weight_dims
from .parametrizations import SparseParametrization

__all__ = [
    "HadamardFactorization",
    "factor_param_groups",
    "factorize",
    "l1_penalty",
    "register_factorization",
]

_ROW_NAMES = ("row", "out_channel")
_COLUMN_NAMES = ("column", "in_channel")
_INITS = ("unbalanced", "balanced")

GroupFn = Callable[[nn.Module, str], torch.Tensor]
GroupLike = Union[str, torch.Tensor, GroupFn, None]


def _check_depth(depth: object) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise InvalidArgumentError(f"depth must be an int >= 2, got {depth!r}")
    return depth


def _check_init(init: object) -> str:
    if init not in _INITS:
        raise InvalidArgumentError(f"init must be one of {list(_INITS)}, got {init!r}")
    return str(init)


def _check_index(index: object, shape: torch.Size, what: str) -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        raise InvalidTypeError(
            f"{what} must be an integer torch.Tensor of group ids, got {type(index).__name__}"
        )
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise InvalidTypeError(f"{what} must have an integer dtype (group ids 0..G-1), got {index.dtype}")
    try:
        ok = torch.broadcast_shapes(index.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise InvalidArgumentError(
            f"{what} has shape {tuple(index.shape)}, which does not broadcast to the weight's shape "
            f"{tuple(shape)}; allowed: that shape or one broadcastable to it"
        )
    if index.numel() == 0 or int(index.min()) < 0:
        raise InvalidArgumentError(
            f"{what} must hold group ids >= 0, got min {int(index.min()) if index.numel() else None}"
        )
    return index.detach().to(torch.long).clone()


class HadamardFactorization(SparseParametrization):
    r"""Parametrization ``forward(*factors) = factors[0] * factors[1] * ...`` (``depth`` factors).

    Registered on a weight ``w`` with :func:`register_factorization` (or
    :func:`torch.nn.utils.parametrize.register_parametrization`), it replaces
    ``w`` by ``depth`` trainable factors ``original0``, ``original1``, ... whose
    product is the weight.

    Grouping: with ``group=None`` every factor has the weight's shape. Otherwise
    ``original0`` has the weight's shape and ``original1 .. original{depth-1}``
    are group gates: for ``group="row"``/``"column"`` they have the weight's size
    along ``group_dim`` and 1 elsewhere (e.g. ``(out, 1)``, broadcast), for an
    index map (an integer tensor broadcastable to the weight's shape, holding
    group ids ``0 .. G-1``) they have shape ``(G,)`` and are gathered through
    the map (saved as the persistent buffer ``group_index``).

    Initialization (``right_inverse``, also used when assigning ``module.weight = w``
    or loading a dense checkpoint) reproduces ``w`` exactly:

    - ``"unbalanced"`` (default): ``original0 = w``, every other factor 1. Weights
      can change sign freely (the sign change happens in ``original0`` alone) and
      exact zeros of ``w`` keep a gradient (``∂w/∂original0 = 1``).
    - ``"balanced"``: ``|original_i| = |w|^(1/D)`` elementwise (grouped: each gate
      ``‖w_g‖₂^(1/D)``, ``original0 = w / gate^(D-1)``), the sign carried by
      ``original0``. It already sits at the penalty's minimum but a weight whose
      sign must flip is pulled to the saddle where all its factors are 0. Exact
      zeros (zero groups) get ``original0 = 0`` and the other factors (gates) 1,
      so that their gradient does not vanish.

    Args:
        depth: number of factors, ``>= 2``. Default: 2.
        group: ``None`` (elementwise), ``"row"``, ``"column"`` or an integer index map tensor.
        group_dim: for ``"row"``/``"column"``: the weight dimension indexing the groups.
        init: ``"unbalanced"`` or ``"balanced"``.

    Example::

        >>> lin = torch.nn.Linear(4, 3)
        >>> parametrize.register_parametrization(lin, "weight", HadamardFactorization(2))
        >>> sorted(n for n, _ in lin.named_parameters())
        ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
    """

    RECORD_SUFFIXES: ClassVar[tuple[str, ...]] = ("factorization", "group_index")
    RECORD_ORIGINALS: ClassVar[str | None] = "factor"
    group_index: torch.Tensor | None

    def __init__(
        self,
        depth: int = 2,
        *,
        group: str | torch.Tensor | None = None,
        group_dim: int | None = None,
        init: str = "unbalanced",
    ) -> None:
        super().__init__()
        self.depth = _check_depth(depth)
        self.init = _check_init(init)
        self.group_dim: int | None = None
        self.num_groups: int | None = None
        if group is None:
            self.group: str | None = None
            self.group_index = None
        elif isinstance(group, torch.Tensor):
            self.group = "index"
            idx = _check_index(group, group.shape, "group")
            self.register_buffer("group_index", idx)
            self.num_groups = int(idx.max()) + 1
        elif isinstance(group, str) and group in _ROW_NAMES + _COLUMN_NAMES:
            self.group = "row" if group in _ROW_NAMES else "column"
            if isinstance(group_dim, bool) or not isinstance(group_dim, int) or group_dim < 0:
                raise InvalidArgumentError(
                    f"group_dim must be an int >= 0 with group={group!r}, got {group_dim!r}"
                )
            self.group_dim = group_dim
            self.group_index = None
        else:
            raise InvalidArgumentError(
                f"group must be None, one of {list(_ROW_NAMES + _COLUMN_NAMES)} or an integer index map tensor, "
                f"got {group!r}"
            )

    # -- shapes -------------------------------------------------------------------------------
    def _gate_shape(self, shape: torch.Size) -> torch.Size:
        if self.group is None:
            return shape
        if self.group == "index":
            return torch.Size([int(self.num_groups)])  # type: ignore[arg-type]
        d = int(self.group_dim)  # type: ignore[arg-type]
        if d >= len(shape):
            raise InvalidArgumentError(f"group_dim={d} is out of range for a weight of shape {tuple(shape)}")
        return torch.Size(n if i == d else 1 for i, n in enumerate(shape))

    def _group_norms(self, w: torch.Tensor) -> torch.Tensor:
        """``‖w_g‖₂`` per group, in the gates' shape."""
        sq = w.pow(2)
        if self.group == "index":
            idx = self.group_index.expand(w.shape).reshape(-1)  # type: ignore[union-attr]
            out = torch.zeros(int(self.num_groups), dtype=w.dtype, device=w.device)  # type: ignore[arg-type]
            return out.index_add(0, idx, sq.reshape(-1)).sqrt()
        d = int(self.group_dim)  # type: ignore[arg-type]
        dims = [i for i in range(w.dim()) if i != d]
        return sq.sum(dim=dims, keepdim=True).sqrt() if dims else sq.sqrt()

    def _gather(self, gate: torch.Tensor) -> torch.Tensor:
        return gate[self.group_index] if self.group == "index" else gate

    # -- parametrization ----------------------------------------------------------------------
    def forward(self, *factors: torch.Tensor) -> torch.Tensor:
        if len(factors) != self.depth:
            raise InvalidArgumentError(
                f"HadamardFactorization(depth={self.depth}) got {len(factors)} factors"
            )
        if self.group is None:
            out = factors[0]
            for f in factors[1:]:
                out = out * f
            return out
        gate = factors[1]
        for f in factors[2:]:
            gate = gate * f
        return factors[0] * self._gather(gate)

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.depth
        if self.group == "index":
            _check_index(self.group_index, w.shape, "group_index")
        gate_shape = self._gate_shape(w.shape)
        if self.init == "unbalanced":
            if self.group is None:
                return (w.clone(), *tuple(torch.ones_like(w) for _ in range(d - 1)))
            ones = torch.ones(gate_shape, dtype=w.dtype, device=w.device)
            return (w.clone(), *tuple(ones.clone() for _ in range(d - 1)))
        if self.group is None:
            a = w.abs()
            zero = a == 0
            root = torch.where(zero, torch.ones_like(a), a.pow(1.0 / d))
            first = torch.where(zero, torch.zeros_like(w), torch.sign(w) * root)
            return (first, *tuple(root.clone() for _ in range(d - 1)))
        n = self._group_norms(w)
        gate = torch.where(n > 0, n.pow(1.0 / d), torch.ones_like(n))
        first = w / self._gather(gate).pow(d - 1)
        return (first, *tuple(gate.clone() for _ in range(d - 1)))

    # -- penalty ------------------------------------------------------------------------------
    def penalty(self, w: torch.Tensor) -> torch.Tensor:
        r"""The penalty on ``w`` equivalent to weight decay 1 on the factors (see the module docstring).

        ``(D/2)·Σ|w|^(2/D)`` elementwise, ``(D/2)·Σ_g ‖w_g‖₂^(2/D)`` grouped: for depth 2 the
        L1 norm and the (unweighted) group lasso norm. Not differentiable at 0 (meant for logging).
        """
        d = self.depth
        v = w.abs() if self.group is None else self._group_norms(w)
        return v.sum() if d == 2 else (d / 2) * v.pow(2.0 / d).sum()

    # -- state --------------------------------------------------------------------------------
    # Checkpoint record: "<tensor>_factorization" = int64 [depth, group code, group_dim or -1, init code],
    # "<tensor>_group_index" (index maps only), the factors as "<tensor>_factor0", ...
    _GROUP_CODES: ClassVar[tuple[str | None, ...]] = (None, "row", "column", "index")

    def record(self, position: int) -> dict[str, torch.Tensor]:
        gd = -1 if self.group_dim is None else self.group_dim
        code = [self.depth, self._GROUP_CODES.index(self.group), gd, _INITS.index(self.init)]
        out = {"factorization": torch.tensor(code, dtype=torch.int64)}
        if self.group == "index":
            out["group_index"] = self.group_index  # type: ignore[assignment]
        return out

    @classmethod
    def _parse_record(cls, record: dict[str, Any], what: str) -> tuple[int, str | None, int | None, str]:
        t = record["factorization"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (4,):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidTypeError(
                f"{what} must be an int64 tensor [depth, group, group_dim, init], got {got}"
            )
        depth, g, gd, init = (int(v) for v in t.tolist())
        if not (0 <= g < len(cls._GROUP_CODES) and 0 <= init < len(_INITS) and gd >= -1):
            raise InvalidArgumentError(
                f"{what} holds [depth, group, group_dim, init] = {[depth, g, gd, init]}, not a valid code"
            )
        return _check_depth(depth), cls._GROUP_CODES[g], (None if gd == -1 else gd), _INITS[init]

    @classmethod
    def from_record(
        cls, record: dict[str, Any], shape: torch.Size, what: str
    ) -> tuple[HadamardFactorization, int | None]:
        depth, group, gd, init = cls._parse_record(record, what)
        if group == "index":
            idx = record.get("group_index")
            if idx is None:
                raise InvalidArgumentError(
                    f"{what} records an index-grouped factorization but its '_group_index' is missing"
                )
            return cls(
                depth,
                group=_check_index(idx, shape, f"{what[: -len('factorization')]}group_index"),
                init=init,
            ), 0
        if group is not None and (gd is None or gd >= len(shape)):
            raise InvalidArgumentError(
                f"{what} has group_dim={gd}, which does not fit a weight of shape {tuple(shape)}"
            )
        return cls(depth, group=group, group_dim=gd, init=init), 0

    def record_to_state(self, record: dict[str, Any], position: int, what: str) -> dict[str, Any]:
        if "factorization" in record:
            got = self._parse_record(record, what)
            if got != (self.depth, self.group, self.group_dim, self.init):
                raise InvalidArgumentError(
                    f"{what} records a factorization (depth, group, group_dim, init) = {got}, the model has "
                    f"{(self.depth, self.group, self.group_dim, self.init)}"
                )
        if self.group == "index" and "group_index" in record:
            return {"group_index": record["group_index"]}
        return {}

    def extra_repr(self) -> str:
        g = "elementwise" if self.group is None else self.group
        extra = f", groups={self.num_groups}" if self.group == "index" else ""
        return f"depth={self.depth}, group={g}{extra}, init={self.init}"


# ---------------------------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------------------------


def _check_group_arg(group: object) -> None:
    ok = (
        group is None
        or (isinstance(group, str) and group in _ROW_NAMES + _COLUMN_NAMES)
        or isinstance(group, torch.Tensor)
        or (callable(group) and not isinstance(group, (str, torch.Tensor)))
    )
    if not ok:
        raise InvalidArgumentError(
            f"group must be None (elementwise), one of {list(_ROW_NAMES + _COLUMN_NAMES)}, an integer "
            f"index map tensor or a callable (module, name) -> index map, got {group!r}"
        )


def _build(
    module: nn.Module, name: str, depth: int, group: GroupLike, init: str, where: str
) -> HadamardFactorization:
    """Validate one target and build its parametrization (the module is not touched)."""
    if parametrize.is_parametrized(module, name):
        chain = [type(p).__name__ for p in module.parametrizations[name]]  # type: ignore[index, union-attr]
        raise InvalidArgumentError(
            f"{where} is already parametrized ({chain}); a factorization must be the first parametrization "
            "of a tensor: factorize before sparsify/register_mask, or remove_parametrizations first"
        )
    p = module._parameters.get(name)
    if not isinstance(p, nn.Parameter):
        raise InvalidArgumentError(f"{where} must be an nn.Parameter, got {type(p).__name__}")
    if not p.dtype.is_floating_point:
        raise InvalidTypeError(f"{where} must have a floating dtype, got {p.dtype}")
    if group is None:
        return HadamardFactorization(depth, init=init)
    if isinstance(group, str):
        out_dim, in_dim = weight_dims(module, name)
        d = out_dim if group in _ROW_NAMES else in_dim
        if p.dim() <= d:
            raise InvalidArgumentError(
                f"group={group!r} needs {where} to have dimension {d}, its shape is {tuple(p.shape)}"
            )
        return HadamardFactorization(depth, group=group, group_dim=d, init=init)
    index = group if isinstance(group, torch.Tensor) else group(module, name)
    index = _check_index(index, p.shape, f"group index map for {where}")
    return HadamardFactorization(depth, group=index.to(p.device), init=init)


def _warn_stale_optimizer(params: list[tuple[str, nn.Parameter]]) -> None:
    trained = [n for n, p in params if p.grad is not None]
    if trained:
        warnings.warn(
            f"factorize: {trained[:3]}{' ...' if len(trained) > 3 else ''} already had gradients, so this "
            "model may have an optimizer: factorization replaces these Parameters by new factor Parameters "
            "that an optimizer created earlier does not see; create the optimizer after factorizing "
            "(e.g. from hs.factor_param_groups(model, weight_decay))",
            stacklevel=3,
        )


def register_factorization(
    module: nn.Module,
    name: str = "weight",
    *,
    depth: int = 2,
    group: GroupLike = None,
    init: str = "unbalanced",
) -> HadamardFactorization:
    r"""Parametrize ``module.<name>`` as a product of ``depth`` learned factors; return the parametrization.

    The tensor's value is unchanged (see :class:`HadamardFactorization` for the
    splits). The old Parameter is replaced by new ones, ``parametrizations.<name>.original0``,
    ``original1``, ...: build the optimizer afterwards (a warning is issued when
    the old Parameter already has a gradient). A mask can be stacked on top with
    :func:`~hadamard_sparse.register_mask` or :func:`~hadamard_sparse.sparsify`.

    Args:
        module: the module owning the tensor.
        name: the tensor's attribute name; a plain (not yet parametrized) Parameter. Default: ``"weight"``.
        depth: number of factors, ``>= 2``. Default: 2.
        group: ``None`` (elementwise); ``"row"``/``"out_channel"`` (one group per output neuron /
            filter, i.e. dim 0, or dim 1 of a ConvTranspose / HF ``Conv1D``); ``"column"``/``"in_channel"``
            (one group per input, for a grouped conv input channel ``j`` of every group); an integer
            tensor broadcastable to the weight's shape holding group ids ``0..G-1``; or a callable
            ``(module, name) -> such a tensor``.
        init: ``"unbalanced"`` (default; one factor is ``w``, the others 1) or ``"balanced"``
            (``|factor| = |w|^(1/depth)``; can trap weights that must change sign).

    Returns:
        The registered :class:`HadamardFactorization`.

    Example::

        >>> lin = torch.nn.Linear(4, 3)
        >>> w = lin.weight.detach().clone()
        >>> f = register_factorization(lin, depth=3, group="row")
        >>> torch.equal(lin.weight, w)
        True
    """
    if not isinstance(module, nn.Module):
        raise InvalidTypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not hasattr(module, name):
        raise InvalidArgumentError(f"name must name a tensor of {type(module).__name__}, got {name!r}")
    _check_depth(depth)
    _check_init(init)
    _check_group_arg(group)
    fact = _build(module, name, depth, group, init, f"{type(module).__name__}.{name}")
    _warn_stale_optimizer([(name, module._parameters[name])])  # type: ignore[list-item]
    _register(module, name, fact)
    return fact


def _register(module: nn.Module, name: str, fact: HadamardFactorization) -> None:
    parametrize.register_parametrization(module, name, fact)
    ensure_load_hook(module)


def factorize(
    model: nn.Module,
    *,
    depth: int = 2,
    group: GroupLike = None,
    include: Selectors = None,
    exclude: Selectors = None,
    init: str = "unbalanced",
) -> nn.Module:
    r"""Factorize every targeted weight of ``model`` in place (the same targets as :func:`~hadamard_sparse.sparsify`).

    The model's outputs are unchanged until training. All targets are validated
    before the first one is touched (none may be parametrized already).
    Factorizing creates new Parameters: an optimizer created before this call
    does not see them (a warning is issued when targeted weights already have
    gradients). Train with an optimizer built from :func:`factor_param_groups`.

    Args:
        model: any ``nn.Module``, not wrapped in DDP/FSDP yet.
        depth: number of factors, ``>= 2``. Default: 2 (lasso / group lasso).
        group: see :func:`register_factorization`; a callable is called once per target.
        include: module types, glob patterns or a callable ``(name, module) -> bool`` selecting targets.
        exclude: same kinds of selectors; matching tensors are skipped.
        init: ``"unbalanced"`` (default) or ``"balanced"``.

    Returns:
        ``model``, factorized.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> factorize(model, depth=2, group="row")
        Sequential(...)
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_depth(depth)
    _check_init(init)
    _check_group_arg(group)
    check_not_wrapped(model)
    targets: list[Target] = resolve_targets(model, include, exclude)
    if not targets:
        raise NoTargetsError(
            f"factorize: model {type(model).__name__} has no tensor to act on (targets are "
            f"{targeted_layers()}); check include/exclude"
        )
    built = [_build(t.module, t.tensor_name, depth, group, init, t.qualified) for t in targets]
    _warn_stale_optimizer([(t.qualified, t.module._parameters[t.tensor_name]) for t in targets])  # type: ignore[misc]
    for t, fact in zip(targets, built):
        _register(t.module, t.tensor_name, fact)
    return model


def _iter_factorizations(
    model: nn.Module,
) -> Iterator[tuple[str, parametrize.ParametrizationList, HadamardFactorization]]:
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname, plist in module.parametrizations.items():  # type: ignore[union-attr]
            if len(plist) and isinstance(plist[0], HadamardFactorization):
                yield join_name(mod_name, tname), plist, plist[0]


def factor_param_groups(
    model: nn.Module, weight_decay: float, *, lr: float | None = None
) -> list[dict[str, Any]]:
    r"""Optimizer parameter groups: weight decay on the factors, none on every other Parameter.

    PyTorch's ``weight_decay=λ`` adds ``λ·u`` to each factor's gradient, i.e. the
    penalty ``(λ/2)·‖u‖²``. For depth 2 that is the same minimization as adding
    ``λ·‖w‖₁`` to the loss (``min over u·v = w of (λ/2)(u² + v²) = λ|w|``); grouped, ``λ·Σ_g ‖w_g‖₂``;
    depth D, ``λ·(D/2)·Σ|w|^(2/D)`` (see :func:`l1_penalty`). Use an optimizer whose weight
    decay is this coupled L2 gradient term (``SGD``, ``Adam``, ...); the *decoupled* decay of
    ``AdamW`` does not give this equivalence. Biases, norms and other parameters get no decay.

    Args:
        model: a model with factorizations (:func:`factorize`).
        weight_decay: ``λ >= 0`` for the factor group.
        lr: if given, the learning rate of the factor group only (the other group uses the
            optimizer's default ``lr``).

    Returns:
        ``[{"params": factors, "weight_decay": λ(, "lr": lr)}, {"params": others, "weight_decay": 0.0}]``
        (the second group is left out when empty).

    Example::

        >>> opt = torch.optim.Adam(factor_param_groups(factorize(model), weight_decay=1e-4), lr=1e-3)
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise InvalidArgumentError(f"weight_decay must be a real number >= 0, got {weight_decay!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0):
        raise InvalidArgumentError(f"lr must be None or a real number > 0, got {lr!r}")
    factors: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, plist, fact in _iter_factorizations(model):
        for i in range(fact.depth):
            p = getattr(plist, f"original{i}")
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                factors.append(p)
    if not factors:
        raise NoTargetsError(
            f"factor_param_groups: model {type(model).__name__} has no factorized tensor; call factorize first"
        )
    others = [p for p in model.parameters() if id(p) not in seen]
    group: dict[str, Any] = {"params": factors, "weight_decay": float(weight_decay)}
    if lr is not None:
        group["lr"] = float(lr)
    groups = [group]
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    return groups


def l1_penalty(model: nn.Module) -> torch.Tensor:
    r"""The sparsity penalty on the factorized weights that weight decay 1 on their factors amounts to.

    ``loss + λ·l1_penalty(model)`` is the objective that training with
    ``factor_param_groups(model, weight_decay=λ)`` minimizes (at its minimum the
    factors are balanced and ``(λ/2)·Σ‖u_i‖²`` equals this value; away from it the
    factor penalty is larger). Per factorized tensor ``w`` (the product of the
    factors, before any mask stacked on top):

    - depth 2: ``‖w‖₁``; grouped: ``Σ_g ‖w_g‖₂`` (group lasso, unweighted by group size);
    - depth D: ``(D/2)·Σ|w|^(2/D)``; grouped: ``(D/2)·Σ_g ‖w_g‖₂^(2/D)`` (the L_{2/D} quasi-norm form).

    Meant for logging: it is computed with autograd enabled, but is not differentiable at 0.

    Args:
        model: a model with factorizations.

    Returns:
        A scalar tensor (0 when the model has no factorization).

    Example::

        >>> print(f"penalty {l1_penalty(model).item():.3f}")
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    total: torch.Tensor | None = None
    for _, plist, fact in _iter_factorizations(model):
        w = fact(*(getattr(plist, f"original{i}") for i in range(fact.depth)))
        p = fact.penalty(w)
        total = p if total is None else total + p.to(total.device)
    return torch.zeros(()) if total is None else total
