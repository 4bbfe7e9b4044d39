"""Attention blocks: where their heads live, and removing whole heads for :func:`shrink`.

An attention block is found by one *finder* per family, in ``ATTENTION_FINDERS`` (add one
with :func:`attention_finder`); each returns an :class:`AttentionBlock` naming the q/k/v
projections, the output projection that reads the concatenated heads, the head size, the
number of query and key/value heads, and the attributes to update when heads go:

- Llama / Mistral / Qwen / ViT (transformers 5) style: ``q_proj``, ``k_proj``, ``v_proj``,
  ``o_proj`` children and ``head_dim``; grouped-query attention (fewer k/v heads) supported.
- BERT / RoBERTa / MiniLM style: a block with ``self.query/key/value`` (and
  ``self.attention_head_size``) and ``output.dense``.
- ``nn.MultiheadAttention`` (q/k/v rows in ``in_proj_weight``, or with ``kdim``/``vdim`` in
  ``q/k/v_proj_weight``): its ``embed_dim`` is both the input width and the heads' total width, so :func:`prune_zero_heads` first rebuilds it as a
  :class:`~hadamard_sparse.export.attention.ProjectedMultiheadAttention` (explicit ``q_proj``,
  ``k_proj``, ``v_proj``, ``out_proj``; found by its own finder), then removes heads from that.

A *head group* is one key/value head with the query heads that read it (one head when there are
as many k/v heads as query heads). A group is removed by :func:`prune_zero_heads` when the value
rows of its k/v head are all zero: the group then outputs the value bias (softmax weights sum to
one), which is folded into the output projection's bias.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import ProjectedMultiheadAttention, mha_problem

__all__ = ["ATTENTION_FINDERS", "AttentionBlock", "attention_blocks", "attention_finder", "prune_zero_heads"]


@dataclass
class AttentionBlock:
    """One attention block: qualified names of its projections and its head layout."""

    name: str
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    n_heads: int
    n_kv: int
    #: ``(module name, attribute, what)``: ``what`` is "heads", "kv_heads" or "width" (heads * head_dim)
    attrs: list[tuple[str, str, str]] = field(default_factory=list)
    packed: bool = False  # nn.MultiheadAttention: q/k/v rows stacked in ``in_proj_weight``
    separate: bool = False  # ... or, with kdim/vdim, in ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv

    def q_rows(self, group: int) -> torch.Tensor:
        """Rows of the query projection (and columns of the output projection) of a head group."""
        g, d = self.group_size, self.head_dim
        return torch.arange(group * g * d, (group + 1) * g * d)

    def kv_rows(self, group: int) -> torch.Tensor:
        return torch.arange(group * self.head_dim, (group + 1) * self.head_dim)


Finder = Callable[[str, nn.Module], "AttentionBlock | None"]
#: One finder per attention family; the first that returns a block wins.
ATTENTION_FINDERS: list[Finder] = []


def attention_finder(fn: Finder) -> Finder:
    """Register a finder ``fn(name, module) -> AttentionBlock | None``."""
    ATTENTION_FINDERS.append(fn)
    return fn


def _linear(mod: nn.Module, attr: str) -> nn.Linear | None:
    child = getattr(mod, attr, None)
    return child if isinstance(child, nn.Linear) else None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@attention_finder
def _proj_style(name: str, mod: nn.Module) -> AttentionBlock | None:
    q, k, v, o = (_linear(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
    hd = getattr(mod, "head_dim", None)
    if q is None or k is None or v is None or o is None or not isinstance(hd, int) or hd <= 0:
        return None
    if q.out_features % hd or k.out_features % hd or k.out_features != v.out_features:
        return None
    n, n_kv = q.out_features // hd, k.out_features // hd
    if n_kv == 0 or n % n_kv or o.in_features != q.out_features:
        return None
    attrs = [
        (name, a, "heads")
        for a in ("num_heads", "num_attention_heads")
        if isinstance(getattr(mod, a, None), int)
    ]
    attrs += [
        (name, a, "kv_heads")
        for a in ("num_key_value_heads", "num_kv_heads")
        if isinstance(getattr(mod, a, None), int)
    ]
    j = _join
    return AttentionBlock(
        name, j(name, "q_proj"), j(name, "k_proj"), j(name, "v_proj"), j(name, "o_proj"), hd, n, n_kv, attrs
    )


@attention_finder
def _bert_style(name: str, mod: nn.Module) -> AttentionBlock | None:
    sa, out = getattr(mod, "self", None), getattr(mod, "output", None)
    if not isinstance(sa, nn.Module) or not isinstance(out, nn.Module):
        return None
    q, k, v, o = _linear(sa, "query"), _linear(sa, "key"), _linear(sa, "value"), _linear(out, "dense")
    hd = getattr(sa, "attention_head_size", None)
    if q is None or k is None or v is None or o is None or not isinstance(hd, int) or hd <= 0:
        return None
    if not q.out_features == k.out_features == v.out_features == o.in_features or q.out_features % hd:
        return None
    n = q.out_features // hd
    s = _join(name, "self")
    attrs = [(s, "num_attention_heads", "heads"), (s, "all_head_size", "width")]
    attrs = [a for a in attrs if isinstance(getattr(sa, a[1], None), int)]
    j = _join
    return AttentionBlock(
        name, j(s, "query"), j(s, "key"), j(s, "value"), j(name, "output", "dense"), hd, n, n, attrs
    )


@attention_finder
def _torch_mha(name: str, mod: nn.Module) -> AttentionBlock | None:
    if not isinstance(mod, nn.MultiheadAttention):
        return None
    n, sep = mod.num_heads, not mod._qkv_same_embed_dim
    o = _join(name, "out_proj")
    return AttentionBlock(name, name, name, name, o, mod.head_dim, n, n, packed=True, separate=sep)


@attention_finder
def _projected_mha(name: str, mod: nn.Module) -> AttentionBlock | None:
    if not isinstance(mod, ProjectedMultiheadAttention):
        return None
    if not all(isinstance(getattr(mod, a), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
        return None  # sparse projections (to_sparse): nothing to slice
    j = _join
    n = mod.num_heads
    return AttentionBlock(
        name,
        j(name, "q_proj"),
        j(name, "k_proj"),
        j(name, "v_proj"),
        j(name, "out_proj"),
        mod.head_dim,
        n,
        n,
        [(name, "num_heads", "heads")],
    )


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """The attention blocks of ``model`` in module order (a block's own submodules are not searched)."""
    blocks: list[AttentionBlock] = []
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        for finder in ATTENTION_FINDERS:
            block = finder(name, mod)
            if block is not None:
                blocks.append(block)
                inside.append(name)
                break
    return blocks


# --------------------------------------------------------------------------------------------
# removing zero head groups (shrink)
# --------------------------------------------------------------------------------------------


def _sliced(
    lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None, delta: torch.Tensor | None
) -> nn.Linear:
    """A shallow copy of ``lin`` keeping ``rows``/``cols`` (``None``: all), ``delta`` added to the bias."""
    new = copy.copy(lin)
    new._parameters = dict(lin._parameters)  # type: ignore[assignment]
    w = lin.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new.weight = nn.Parameter(w.clone().contiguous(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias.detach()
        if delta is not None:
            b = (b.to(torch.float64) + delta.to(b.device)).to(b.dtype)
        if rows is not None:
            b = b.index_select(0, rows.to(b.device))
        new.bias = nn.Parameter(b.clone().contiguous(), requires_grad=lin.bias.requires_grad)
    new.out_features, new.in_features = new.weight.shape
    return new


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _zero_groups(b: AttentionBlock, vw: torch.Tensor, vb: torch.Tensor, out_bias: bool) -> list[int]:
    """Head groups whose value rows are zero (and whose value bias can be folded into the output bias)."""
    gone = []
    for g in range(b.n_kv):
        rows = b.kv_rows(g)
        if bool(vw[rows].eq(0).all()) and (out_bias or bool(vb[rows].eq(0).all())):
            gone.append(g)
    return gone


def _unpack_mha(model: nn.Module, b: AttentionBlock) -> AttentionBlock | None:
    """Rebuild an ``nn.MultiheadAttention`` with zero heads as a ProjectedMultiheadAttention (its new block)."""
    mha = model.get_submodule(b.name)
    assert isinstance(mha, nn.MultiheadAttention)  # the packed finder only returns those
    e = mha.embed_dim
    vw = mha.v_proj_weight.detach() if b.separate else mha.in_proj_weight.detach()[2 * e :]
    vb = mha.in_proj_bias.detach()[2 * e :] if mha.in_proj_bias is not None else torch.zeros(e)
    if not _zero_groups(b, vw, vb.to(torch.float64), mha.out_proj.bias is not None):
        return None
    why = mha_problem(mha)
    if why is not None:
        warnings.warn(
            f"shrink keeps the masked heads of nn.MultiheadAttention {b.name!r}: {why}",
            UserWarning,
            stacklevel=3,
        )
        return None
    new = ProjectedMultiheadAttention.from_mha(mha)
    set_submodule(model, b.name, new)
    return _projected_mha(b.name, new)


def prune_zero_heads(model: nn.Module) -> list[str]:
    """Remove, in place, the head groups whose value rows are all zero; return the changed module names.

    The removed groups' value biases are folded into the output projection's bias (a group with a
    nonzero value bias is kept when that projection has no bias). At least one group of each block
    is kept. An ``nn.MultiheadAttention`` with such heads is replaced by a
    :class:`~hadamard_sparse.export.attention.ProjectedMultiheadAttention` holding the other heads
    (one whose configuration it cannot reproduce, e.g. ``add_bias_kv=True``, is kept whole with a
    warning saying why).
    """
    changed: list[str] = []
    for b in attention_blocks(model):
        if b.packed:
            unpacked = _unpack_mha(model, b)
            if unpacked is None:
                continue
            b = unpacked
        q, k, v, o = (model.get_submodule(n) for n in (b.q, b.k, b.v, b.o))
        vw = v.weight.detach()
        vb = (
            v.bias.detach().to(torch.float64)
            if v.bias is not None
            else torch.zeros(vw.shape[0], dtype=torch.float64)
        )
        gone = _zero_groups(b, vw, vb, o.bias is not None)
        if not gone:
            continue
        if len(gone) == b.n_kv:
            gone = gone[1:]
        keep = [g for g in range(b.n_kv) if g not in gone]
        delta = torch.zeros(o.weight.shape[0], dtype=torch.float64)
        ow = o.weight.detach().to(torch.float64).cpu()
        for g in gone:
            bias_v = vb[b.kv_rows(g)].cpu()
            for h in range(b.group_size):
                cols = b.q_rows(g)[h * b.head_dim : (h + 1) * b.head_dim]
                delta += ow[:, cols] @ bias_v
        q_keep = torch.cat([b.q_rows(g) for g in keep])
        kv_keep = torch.cat([b.kv_rows(g) for g in keep])
        set_submodule(model, b.q, _sliced(q, q_keep, None, None))
        set_submodule(model, b.k, _sliced(k, kv_keep, None, None))
        set_submodule(model, b.v, _sliced(v, kv_keep, None, None))
        set_submodule(model, b.o, _sliced(o, None, q_keep, delta if o.bias is not None else None))
        values = {"heads": len(keep) * b.group_size, "kv_heads": len(keep), "width": len(q_keep)}
        for mod_name, attr, what in b.attrs:
            setattr(model.get_submodule(mod_name), attr, values[what])
        block = model.get_submodule(b.name)
        if isinstance(block, ProjectedMultiheadAttention):  # 3-D attn_masks keep the original heads' rows
            block.head_ids = [block.head_ids[g] for g in keep]
        changed += [b.name, b.q, b.k, b.v, b.o] + [m for m, _, _ in b.attrs]
    return changed
