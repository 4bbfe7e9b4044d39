"""Model-level structures: channel groups found by running the model, and attention heads.

:class:`ChannelGroups` captures the model on example inputs (as :func:`shrink` does) and runs
the channel-flow analysis in *discovery* mode: every output channel of every Linear/Conv is
assumed pruned together with its bias and the affine entries of the BatchNorm after it (even
after a ReLU), and followed to every layer that reads it. Channels tied by residual additions
or concatenations share one group; a channel that reaches the output, a LayerNorm over
channels, an op shrink does not model (a view into attention heads, a softmax...) or a shared
module is in no group. Each group's members are the producer rows, the bias and norm entries,
and the consumer columns: scored together, masked together, so the masked model and the
shrunk model compute the same function.

:class:`Heads` finds attention blocks (``export/heads.py``): one group per key/value head with
its query heads, the output projection's columns and the q/k/v biases.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_norm
from .._model_io import join_name
from ..errors import InvalidArgumentError, NoTargetsError
from ..groups import Member, TensorGroups
from ..layers import weight_dims
from ..structures import register_model_structure
from .baking import baked_copy
from .graph import ChannelFlow, as_inputs, capture
from .heads import attention_blocks
from .layer_rules import rule_of

__all__ = ["ChannelGroups", "Heads"]


class ChannelGroups(TensorGroups):
    r"""Channel groups of ``model``, discovered by running it on ``example_inputs``.

    A group is one channel slot: the filters/neurons producing it (several when residual
    additions tie channels together), their bias entries, the BatchNorm/depthwise-conv entries
    on its way, and the input columns of every layer reading it (through a grouped conv, channel
    ``j`` of each of its groups is one slot, so removals stay equal per group). ``sparsify`` and the schedules
    prune whole groups (``sparsity`` = the fraction of groups; ``scope="layer"``: of each
    producer layer's groups) and mask every member, so BatchNorm's constant ``β − μγ/σ`` is gone
    and :func:`~hadamard_sparse.shrink` removes exactly what is masked.

    Args:
        model: the model (masked or not; it is not changed).
        example_inputs: a tensor, tuple of positional inputs or dict of keyword inputs.
        norm: ``"l2"`` (root mean square of the members' weight scores) or ``"l1"`` (mean).
        layers: ``"all"`` or ``"linear"`` (only groups produced by Linear layers: FFN neurons).

    Example::

        >>> groups = hs.ChannelGroups(model, torch.randn(1, 3, 32, 32))
        >>> hs.sparsify(model, 0.5, structure=groups, scope="layer")
        >>> hs.shrink(model, torch.randn(1, 3, 32, 32))
    """

    def __init__(
        self, model: nn.Module, example_inputs: Any, *, norm: str = "l2", layers: str = "all"
    ) -> None:
        check_norm(norm)
        if layers not in ("all", "linear"):
            raise InvalidArgumentError(f"layers must be 'all' or 'linear', got {layers!r}")
        args, kwargs = as_inputs(example_inputs)
        work = baked_copy(model)
        cap = capture(work, args, kwargs)
        flow = ChannelFlow(
            cap.gm, cap.frozen, root=None if cap.mode == "fx" else cap.root, params=cap.params, discover=True
        )
        flow.run()
        blocked = {flow.find(b) for b in flow.blocked}
        if layers == "linear":
            for name in flow.producer_order:
                plan = flow.plans[name]
                if plan.kind != "linear" and plan.out_ids is not None:
                    blocked.update(flow.find(i) for i in plan.out_ids.tolist())
        group_of: dict[int, int] = {}
        labels: list[str] = []
        names: list[str] = []

        def gid(ids: torch.Tensor, name: str, new: bool, ok: torch.Tensor | None = None) -> torch.Tensor:
            out = []
            for j, i in enumerate(ids.tolist()):
                r = flow.find(i)
                if r in blocked or (ok is not None and not bool(ok[j])):
                    out.append(-1)
                    continue
                if r not in group_of:
                    if not new:  # pragma: no cover - consumers come after their producers
                        out.append(-1)
                        continue
                    group_of[r] = len(labels)
                    labels.append(name)
                    names.append(f"{name}[{j}]")
                out.append(group_of[r])
            return torch.tensor(out, dtype=torch.long)

        members: dict[str, Member] = {}

        def add(name: str, tensor: str, m: Member) -> None:
            if any(x is not None and bool((x >= 0).any()) for x in (m.rows, m.cols)):
                members[join_name(name, tensor)] = m

        for name in flow.producer_order:  # producers first, so groups are numbered by producer
            gid(flow.plans[name].out_ids, name, True)  # type: ignore[arg-type]
        for name, plan in flow.plans.items():
            mod = work.get_submodule(name)
            rule = rule_of(mod, "members")
            if rule is None:  # pragma: no cover - only layers with a rule are planned
                continue
            rows = gid(plan.out_ids, name, True) if plan.out_ids is not None else None

            def cols(ids: torch.Tensor, ok: torch.Tensor, name: str = name) -> torch.Tensor:
                return gid(ids, name, False, ok)

            for tensor, m in rule.members(mod, plan, rows, cols).items():
                add(name, tensor, m)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        members = dict(
            sorted(members.items(), key=lambda kv: (order.get(kv[0].rpartition(".")[0], 0), kv[0]))
        )
        super().__init__(members, labels, names, norm)


class Heads(TensorGroups):
    r"""Attention heads of ``model`` as groups: q/k/v rows (and biases) of a head and the output projection's columns.

    Blocks are found by ``export/heads.py``: Hugging Face BERT/RoBERTa/ViT/Llama/Whisper/wav2vec2,
    GPT-2 and T5 attention and ``nn.MultiheadAttention``. T5 adds one position bias (a column per
    head) computed once per stack to every layer, so its heads are tied across the layers of a stack
    (one group per head and stack, for self- and cross-attention apart). With grouped-query attention (fewer key/value heads, Llama) a group is
    one key/value head with all the query heads that read it, so a pruned group leaves the
    ``num_key_value_groups`` ratio unchanged. ``sparsity`` is the fraction of groups pruned
    (``scope="layer"``: in every block). :func:`~hadamard_sparse.shrink` removes pruned heads (an
    ``nn.MultiheadAttention`` becomes a :class:`~hadamard_sparse.ProjectedMultiheadAttention`, a
    block this structure finds too).

    Args:
        model: the model (not changed).
        example_inputs: unused (accepted so that every model structure is built the same way).
        norm: ``"l2"`` or ``"l1"``.

    Raises:
        NoTargetsError: ``model`` has no attention block a finder recognises (the message names the
            modules that look like attention).

    Example::

        >>> hs.sparsify(bert, 0.25, structure=hs.Heads(bert), scope="layer")  # a quarter of each layer's heads
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, *, norm: str = "l2") -> None:
        check_norm(norm)
        members: dict[str, Member] = {}
        labels: list[str] = []
        names: list[str] = []

        def rows_of(n: int, parts: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
            out = torch.full((n,), -1, dtype=torch.long)
            for g, idx in parts:
                out[idx] = g
            return out

        blocks = attention_blocks(model)
        if not blocks:
            raise NoTargetsError(_no_blocks_message(model))
        missed = _unrecognised(model, [b.name for b in blocks])
        if missed:
            warnings.warn(
                f"Heads: these modules look like attention but match no finder, so their heads are not "
                f"pruned: {_listed(missed)} ({_FAMILIES}; {_ADD})",
                UserWarning,
                stacklevel=2,
            )
        tied: dict[str, tuple[int, int]] = {}  # tie key -> (first group, groups) of blocks sharing heads (T5)
        for b in blocks:
            if b.tie is not None and tied.get(b.tie, (0, -1))[1] == b.n_kv:
                first = tied[b.tie][0]
            else:
                own = b.tie if b.tie is not None and b.tie not in tied else b.name
                first = len(labels)
                for g in range(b.n_kv):
                    labels.append(own)
                    names.append(f"{own}.head{g}")
                if b.tie is not None and own == b.tie:
                    tied[b.tie] = (first, b.n_kv)
            groups = range(first, first + b.n_kv)
            q_parts = [(gi, b.q_rows(g)) for g, gi in enumerate(groups)]
            kv_parts = [(gi, b.kv_rows(g)) for g, gi in enumerate(groups)]
            o = model.get_submodule(b.o)
            if b.packed:
                e = b.n_heads * b.head_dim
                parts = q_parts + [(g, r + e) for g, r in kv_parts] + [(g, r + 2 * e) for g, r in kv_parts]
                if b.separate:  # kdim/vdim: q_proj_weight, k_proj_weight, v_proj_weight
                    for t, p in (("q", q_parts), ("k", kv_parts), ("v", kv_parts)):
                        members[join_name(b.name, f"{t}_proj_weight")] = Member(rows_of(e, p), None, True)
                else:
                    members[join_name(b.name, "in_proj_weight")] = Member(rows_of(3 * e, parts), None, True)
                if getattr(model.get_submodule(b.name), "in_proj_bias", None) is not None:
                    members[join_name(b.name, "in_proj_bias")] = Member(rows_of(3 * e, parts), None, False)
            else:
                by_module: dict[str, list[tuple[int, torch.Tensor]]] = {}  # GPT-2: q, k, v in one c_attn
                for proj, off, parts in ((b.q, b.offsets[0], q_parts), (b.k, b.offsets[1], kv_parts),
                                         (b.v, b.offsets[2], kv_parts)):  # fmt: skip
                    by_module.setdefault(proj, []).extend((g, r + off) for g, r in parts)
                for proj, parts in by_module.items():
                    mod = model.get_submodule(proj)
                    n = mod.weight.shape[weight_dims(mod)[0]]
                    members[join_name(proj, "weight")] = Member(rows_of(n, parts), None, True)
                    if getattr(mod, "bias", None) is not None:
                        members[join_name(proj, "bias")] = Member(rows_of(n, parts), None, False)
            n_in = o.weight.shape[weight_dims(o)[1]]
            members[join_name(b.o, "weight")] = Member(None, rows_of(n_in, q_parts), True)
        super().__init__(members, labels, names, norm)


def _unrecognised(model: nn.Module, blocks: Sequence[str]) -> list[str]:
    """Modules whose class name says attention, neither a found block nor inside or above one."""

    def related(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") or b.startswith(name + ".") for b in blocks)

    return [
        f"{name} ({type(mod).__name__})"
        for name, mod in model.named_modules()
        if name and any(w in type(mod).__name__.lower() for w in ("attn", "attention")) and not related(name)
    ]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


_FAMILIES = (
    "recognised are Hugging Face BERT/RoBERTa/ViT/Llama/Whisper/wav2vec2-style (q/k/v projections and "
    "head_dim), GPT-2 (c_attn, c_proj), T5 (q, k, v, o, n_heads) blocks, nn.MultiheadAttention and "
    "ProjectedMultiheadAttention"
)
_ADD = "add a finder with hadamard_sparse.export.heads.attention_finder"


def _no_blocks_message(model: nn.Module) -> str:
    """Why :class:`Heads` found nothing: the families it knows, and the modules that look like attention."""
    looks = _unrecognised(model, [])
    hint = (
        f"; these modules look like attention but match no finder: {_listed(looks)} ({_ADD})" if looks else ""
    )
    return f"Heads: {type(model).__name__} has no attention block shrink knows: {_FAMILIES}{hint}"


@register_model_structure("channel_group", "channel_groups")
def _channel_groups(model: nn.Module, example_inputs: Any) -> ChannelGroups:
    return ChannelGroups(model, example_inputs)


@register_model_structure("neuron", "neurons")
def _neurons(model: nn.Module, example_inputs: Any) -> ChannelGroups:
    return ChannelGroups(model, example_inputs, layers="linear")


@register_model_structure("head", "heads")
def _heads(model: nn.Module, example_inputs: Any) -> Heads:
    return Heads(model, example_inputs)
