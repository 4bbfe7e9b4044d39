"""``shrink``: physically remove pruned channels, neurons and attention heads.

The channel analysis lives in ``export/graph.py`` (traversal) and ``export/rules.py``
(one rule per op); how each layer type is rebuilt is its rule's ``rebuild`` in
``export/layer_rules.py`` (:func:`~hadamard_sparse.export.layer_rules.rebuild`: given the
layer, its :class:`~hadamard_sparse.export.graph.LayerPlan` and which channel ids are removed,
a shallow copy of the layer holding the kept slices).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._model_io import eval_mode, set_submodule
from ..api import masks
from ..errors import InvalidArgumentError, InvalidTypeError, UnsupportedGraphError
from ..layers import weight_dims
from . import (
    rules,  # noqa: F401  (registers the op rules)
    rules_aten,  # noqa: F401  (registers the ATen op rules)
    rules_hf,  # noqa: F401  (registers the Hugging Face Conv1D rule)
)
from .attention import disable_fused_paths
from .baking import bake, baked_copy
from .graph import ChannelFlow, FixedSize, LayerPlan, as_inputs, capture
from .heads import prune_zero_heads
from .layer_rules import (
    CONV_DIMS,
    RebuildFn,
    Removed,
    no_padding,
    rebuild,
    rebuild_rule,
    rules_by_type,
    supported,
)

__all__ = ["REBUILD_RULES", "rebuild", "rebuild_rule", "shrink"]

#: ``rule(new, old, plan, removed)`` slices the tensors of ``new`` (a shallow copy of ``old``).
RebuildRule = RebuildFn


class _RebuildRules(Mapping[type, RebuildRule]):
    """Read-only view of the rebuild capability of the layer rules, by type (the former table)."""

    def _table(self) -> dict[type, RebuildRule]:
        return {t: r.rebuild for t, r in rules_by_type().items() if "rebuild" in r.capabilities()}

    def __getitem__(self, key: type) -> RebuildRule:
        return self._table()[key]

    def __iter__(self) -> Iterator[type]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


#: The rebuild rule of each layer type (a view of ``export/layer_rules.py``'s registry).
REBUILD_RULES: Mapping[type, RebuildRule] = _RebuildRules()


def _run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``model`` returns on the inputs (eval mode, no gradients), flattened."""
    with eval_mode(model), torch.no_grad():
        out = model(*args, **kwargs)
    leaves: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            leaves.append(x)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif hasattr(x, "to_tuple"):  # transformers ModelOutput
            visit(x.to_tuple())

    visit(out)
    return leaves


def _same(ref: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    """Why ``got`` differs from ``ref`` (``None`` when every tensor matches up to float rounding)."""
    if len(ref) != len(got):
        return f"it returns {len(got)} tensors instead of {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            return f"output {i} has shape {tuple(g.shape)} instead of {tuple(r.shape)}"
        if r.is_floating_point():
            scale = float(r.abs().max()) if r.numel() else 0.0
            if not torch.allclose(g, r, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True):
                err = float((g - r).abs().max())
                return f"output {i} differs by up to {err:.3g}"
        elif not torch.equal(r, g):
            return f"output {i} differs"
    return None


def _plan(
    work: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, LayerPlan], Removed, list[str], ChannelFlow, set[int]]:
    """Capture ``work`` and find the removable channels; returns the plans of the layers to rebuild.

    Also returns the analysis and the channel ids kept only so that no layer is emptied.
    """
    cap = capture(work, args, kwargs)
    analysis = ChannelFlow(cap.gm, cap.frozen, root=None if cap.mode == "fx" else cap.root, params=cap.params)
    analysis.run()
    # Never empty a layer: keep one channel of a producer that would lose all of them.
    spared: set[int] = set()
    for name in analysis.producer_order:
        ids = analysis.plans[name].out_ids
        assert ids is not None
        if len(ids) and bool(analysis.removed(ids).all()):
            analysis.blocked.add(int(ids[0]))
            spared.add(int(ids[0]))
    roots = {analysis.find(b) for b in analysis.blocked}

    def removed(ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([analysis.find(i) not in roots for i in ids.tolist()], dtype=torch.bool)

    todo = {}
    for name, plan in analysis.plans.items():
        gone = bool(plan.out_ids is not None and removed(plan.out_ids).any())
        gone = gone or any(bool(removed(ids).any()) for ids, _, _ in plan.in_cols)
        if gone:
            todo[name] = plan
    return todo, removed, analysis.fixed, analysis, spared


def shrink(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any] | dict[str, Any]) -> nn.Module:
    r"""Physically remove pruned channels, neurons and attention heads, and the inputs that read them, in place.

    The model is captured by *running* it once on ``example_inputs`` (eval mode, no
    gradients) with ``torch.export.export(strict=False)``, so Python branches such as
    ``if embed:`` take the path the inputs take and ``F.pad``, permutes, reshapes, splits
    and views are seen as the ATen ops they run; ``torch.fx.symbolic_trace`` is the
    fallback when export fails. A channel is *pruned* when its producer's weights for it
    are all zero (an all-zero row of a Linear, an all-zero filter of a Conv): it then
    carries a constant (its bias, or zero), which is followed through elementwise
    activations, dropout, BatchNorm (running statistics), pooling, ``pad`` (constant only if
    padded with the same value), ``add``/``sub``/``mul``/``div``, ``cat``/``split``/``chunk``,
    ``permute``/``transpose`` and reshapes/flattens that keep each channel whole (e.g.
    ``x.permute(0, 2, 1, 3).reshape(B, -1)`` into a Linear). A channel is removed (from
    its producers, from BatchNorm and depthwise convolutions in between, and from the
    inputs of its consumers) only when every layer that reads it either sees zero, or sees
    a constant that folds exactly into its bias. Channels added together (residual
    connections) form one group, removed only if every branch allows it. A grouped
    convolution ties channel ``j`` of each of its groups (inputs and outputs), so the same
    number goes from every group and it is rebuilt with the same ``groups``. Channels reaching
    the model's outputs, LayerNorm/GroupNorm over the channel dimension, a shared module or a
    module whose tensors the forward reads directly are kept.

    Attention heads (BERT, ViT, Llama, GPT-2, T5, Whisper, wav2vec2 blocks; see ``export/heads.py``) whose value
    rows are all zero are removed with their query/key rows and the output projection's
    columns (grouped-query attention: a key/value head goes with all its query heads), and
    the block's ``num_heads``-like attributes are updated. An ``nn.MultiheadAttention`` with such
    heads becomes a :class:`~hadamard_sparse.export.attention.ProjectedMultiheadAttention` (same
    forward, explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj``) holding the other heads; one
    it cannot reproduce (``add_bias_kv``, ``add_zero_attn``) is kept whole with a warning.

    **A masked model is baked**, as :func:`~hadamard_sparse.to_sparse` does (one rule,
    ``export/baking.py``): the work is done on a baked deep copy; the copy's output is checked
    against the masked model's (up to float rounding) before the changed layers are swapped into
    ``model``, so a refused call leaves ``model`` unchanged. Parametrizations of this library are
    then baked into ``model`` (:func:`remove_parametrizations`); ``copy.deepcopy`` it beforehand
    to keep the masked one. Changed layers are shallow copies of the same class with the
    kept slices (``isinstance``, hooks and extra attributes hold) and updated
    ``in_features``/``out_features``/``in_channels``/``out_channels``/``num_features``/
    ``groups``. An optimizer built before must be rebuilt.

    Args:
        model: the model, masked (parametrized) or baked.
        example_inputs: a tensor, a tuple of the model's positional inputs or a dict of its
            keyword inputs; the forward runs on them (shapes, and the branch to follow).

    Masked units that cannot be removed are named, with why and what to do instead: with a
    ``UserWarning`` when other units were removed (the bake is still valid), and refused (an
    :class:`InvalidArgumentError`, the model left masked and unchanged) when the model's masks
    let nothing at all be removed, since shrinking would then only bake the masks away. Typical
    causes: unstructured masks (no whole neuron/filter masked: use :func:`to_sparse` on the
    baked model), or a filter masked without its bias, whose constant output (its bias, or a
    BatchNorm shift after it) reaches a zero-padded convolution that cannot absorb it (mask
    with ``structure="channel_group"``, which masks the bias and BatchNorm entries too).

    Returns:
        ``model``, baked and shrunk in place.

    Raises:
        InvalidArgumentError: the model holds masks that prune something, yet no channel,
            neuron or head can be removed (the message names the layers and why).
        UnsupportedGraphError: the model cannot be captured, an operation it does not model
            (a view splitting pruned channels, an unknown function, ...) reads pruned channels, naming the layer and the operation; or the
            shrunk copy computes something else (e.g. a reshape to a hard-coded width). The
            model is unchanged.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> hs.register_mask(model[0], "weight", torch.arange(16).unsqueeze(1) < 4)  # keep 4 neurons
        >>> shrink(model, torch.randn(1, 8))[0].out_features
        4
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args, kwargs = as_inputs(example_inputs)
    masked = _masked_units(model)
    work = baked_copy(model)
    try:
        ref = _run(work, args, kwargs)
    except Exception as exc:
        raise UnsupportedGraphError(
            f"shrink could not run {type(model).__name__} on example_inputs: {type(exc).__name__}: {exc}"
        ) from exc
    changed = prune_zero_heads(work)
    disable_fused_paths(work)
    todo, removed, fixed, analysis, spared = _plan(work, args, kwargs)
    stuck = _not_removed(work, masked, analysis, removed, spared, changed)
    if stuck and not changed and not todo:
        raise InvalidArgumentError(
            f"shrink refused {type(model).__name__}: its masks let no channel, neuron or head be removed, "
            "so shrink would only bake them away (hs.remove_parametrizations(model) does that); the model "
            "is unchanged:\n  " + "\n  ".join(stuck) + "\n" + _INSTEAD
        )
    for name, plan in todo.items():
        set_submodule(work, name, rebuild(work.get_submodule(name), plan, removed))
    changed += list(todo)
    updates: list[tuple[str, str, int]] = []
    if changed:
        why = _check(work, ref, args, kwargs)
        if why is not None and fixed:  # a reshape to a width stored in an attribute: update it, check again
            updates = _width_attributes(work, fixed, removed)
            for mod_name, attr, value in updates:
                setattr(work.get_submodule(mod_name), attr, value)
            why = _check(work, ref, args, kwargs) if updates else why
        if why is not None:
            hint = ("; " + "; ".join(f.where for f in fixed)) if fixed else ""
            raise UnsupportedGraphError(
                f"shrink refused {type(model).__name__}: the shrunk copy does not compute what the masked "
                f"model computes ({why}){hint}. Compute sizes from the layers (e.g. "
                "self.classifier.in_features) or use -1 in reshapes"
            )
    if stuck:
        warnings.warn(
            f"shrink: these masked units of {type(model).__name__} could not be removed and are baked in "
            "as zeros:\n  " + "\n  ".join(stuck) + "\n" + _INSTEAD,
            UserWarning,
            stacklevel=2,
        )
    bake(model)
    done: list[str] = []
    for name in sorted(set(changed), key=lambda n: n.count(".")):
        if any(name == d or name.startswith(d + ".") for d in done):
            continue
        set_submodule(model, name, work.get_submodule(name))
        done.append(name)
    for mod_name, attr, value in updates:
        setattr(model.get_submodule(mod_name), attr, value)
    disable_fused_paths(model)
    return model


def _check(
    work: nn.Module, ref: list[torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    try:
        return _same(ref, _run(work, args, kwargs))
    except Exception as exc:
        return f"it raises {type(exc).__name__}: {exc}"


def _width_attributes(
    work: nn.Module, fixed: list[FixedSize], removed: Removed
) -> list[tuple[str, str, int]]:
    """``(module, attribute, new value)`` for int attributes of the module running a fixed-size reshape.

    torchcrepe reshapes with ``reshape(-1, self.in_features)``: the attribute equal to the constant,
    on the module whose forward runs the reshape, is set to the dimension's new size. Only kept when
    the shrunk copy then reproduces the masked outputs.
    """
    out = []
    for f in fixed:
        mod = work.get_submodule(f.module)
        new = int((~removed(f.ids)).sum())
        for attr, value in vars(mod).items():
            if type(value) is int and value == f.value and not attr.startswith("_"):
                out.append((f.module, attr, new))
    return out


_INSTEAD = (
    'Instead: mask whole channels with structure="channel_group" (hs.sparsify(model, s, '
    'structure="channel_group", example_inputs=...) masks each unit\'s bias and BatchNorm entries '
    "with it, so shrink removes exactly what is masked), or keep unstructured sparsity and run "
    "hs.to_sparse on the baked model"
)


@dataclass
class _Masked:
    """A masked weight of this library's: which whole output units (rows) its mask prunes."""

    module: str
    tensor: str
    kind: str
    entries: torch.Tensor  # bool (out, in): some masked entry at (output, input) (any kernel offset)
    pruned: int
    numel: int

    @property
    def rows(self) -> torch.Tensor:
        """Output units whose every entry is masked."""
        return self.entries.all(1)


def _masked_units(model: nn.Module) -> list[_Masked]:
    """The masks of ``model`` (weights, not biases or norm entries) that prune at least one entry."""
    out = []
    for qualified, mask in masks(model).items():
        if mask.dim() < 2 or bool(mask.all()):
            continue
        mod_name, _, tname = qualified.rpartition(".")
        mod = model.get_submodule(mod_name)
        o, i = weight_dims(mod, tname)
        m = (~mask).movedim((o, i), (0, 1))
        entries = m.reshape(m.shape[0], m.shape[1], -1).any(2).cpu()
        kind = parametrize.type_before_parametrizations(mod).__name__
        out.append(_Masked(mod_name, tname, kind, entries, int((~mask).sum()), mask.numel()))
    return out


def _removed_cols(plan: LayerPlan, removed: Removed, n: int, groups: int) -> torch.Tensor:
    """Which of the ``n`` input columns of a planned layer's weight go (as the rebuild rules slice them)."""
    gone = torch.zeros(n, dtype=torch.bool)
    for ids, _, _ in plan.in_cols:
        r = removed(ids)
        r = r.view(groups, -1)[0] if groups > 1 and len(r) == n * groups else r
        if len(r) == n:
            gone |= r
    return gone


def _not_removed(
    work: nn.Module,
    masked: list[_Masked],
    flow: ChannelFlow,
    removed: Removed,
    spared: set[int],
    heads: list[str],
) -> list[str]:
    """One line per masked weight whose masked output units stay, or of which nothing goes, saying why."""
    readers: dict[int, list[tuple[str, int, float, bool]]] = {}
    for name, plan in flow.plans.items():
        for ids, const, droppable in plan.in_cols:
            for i, c, d in zip(ids.tolist(), const.tolist(), droppable.tolist()):
                readers.setdefault(flow.find(i), []).append((name, i, c, d))
    lines = []
    for m in masked:
        if any(m.module == h or m.module.startswith(h + ".") for h in heads):
            continue  # an attention block whose heads were removed
        label = f"{m.module}.{m.tensor} ({m.kind})"
        plan = flow.plans.get(m.module)
        n_out, n_in = m.entries.shape
        if plan is None or plan.out_ids is None or len(plan.out_ids) != n_out:
            if bool(m.rows.any()):
                lines.append(
                    f"{label}: {int(m.rows.sum())} masked output unit(s) stay: shrink removes neurons/filters "
                    f"of the layers the example run reaches ({supported('rebuild', producers=True)}; not "
                    "shared ones) and whole attention heads"
                )
            else:
                lines.append(f"{label}: {_unstructured(m)}")
            continue
        ids = plan.out_ids
        gone_rows = removed(ids)
        groups = int(getattr(work.get_submodule(m.module), "groups", 1))
        gone_cols = _removed_cols(plan, removed, n_in, groups)
        touched = bool((m.entries & (gone_rows[:, None] | gone_cols[None, :])).any())
        spare = torch.tensor([i in spared for i in ids.tolist()], dtype=torch.bool)
        left = m.rows & ~gone_rows & ~spare
        if bool(left.any()):
            first = int(left.nonzero()[0])
            why = _why_kept(
                work, m.module, first, int(ids[first]), readers.get(flow.find(int(ids[first])), [])
            )
            lines.append(f"{label}: {int(left.sum())} of {int(m.rows.sum())} masked output units stay: {why}")
        elif not touched and not bool(m.rows.any()):
            lines.append(f"{label}: {_unstructured(m)}")
    return lines


def _unstructured(m: _Masked) -> str:
    return (
        f"unstructured mask ({m.pruned} of {m.numel} entries masked, no whole output unit, i.e. neuron or "
        "filter, and no input of a removed channel): nothing to remove"
    )


def _why_kept(
    work: nn.Module, producer: str, row: int, cid: int, readers: list[tuple[str, int, float, bool]]
) -> str:
    """Why the pruned channel ``cid`` (row ``row`` of ``producer``) could not be removed.

    ``readers``: ``(layer, channel id, constant, droppable)`` of every layer input tied to it.
    """
    bias = getattr(work.get_submodule(producer), "bias", None)
    b = float(bias.detach()[row]) if isinstance(bias, torch.Tensor) else 0.0
    own = [r for r in readers if r[1] == cid and not r[3]]
    for name, _, const, _ in own:
        mod = work.get_submodule(name)
        where = f"{name!r} ({type(mod).__name__})"
        if const == 0.0:
            return (
                f"they are no longer constant where layer {where} reads them (e.g. added to a channel that "
                "is not pruned, or a non-zero constant padded with zeros)"
            )
        if b != 0.0 and abs(const - b) <= 1e-6 * max(1.0, abs(b)):
            source = "their unmasked bias"
        elif b != 0.0:
            source = "their unmasked bias, shifted by the BatchNorm/activations after them"
        else:
            source = "a BatchNorm shift (beta - mean*gamma/std) after them"
        if isinstance(mod, tuple(CONV_DIMS)) and mod.padding_mode == "zeros" and not no_padding(mod):
            cannot = "pads with zeros, so a constant input does not fold into its bias"
        elif getattr(mod, "bias", None) is None:
            cannot = "has no bias to fold it into"
        else:
            cannot = "cannot fold it"
        return f"they still output a non-zero constant ({source}; e.g. {const:.3g}) into layer {where}, which {cannot}"
    if any(not r[3] for r in readers):
        return (
            "a channel tied to them stays (added to them in a residual connection, or the same slot in "
            "another group of a grouped convolution)"
        )
    return (
        "they reach the model's output or an operation shrink keeps whole (LayerNorm over channels, a view "
        "splitting channels, a shared module...), directly or through a channel tied to them"
    )
