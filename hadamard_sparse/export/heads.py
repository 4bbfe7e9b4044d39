"""Attention blocks: where their heads live, and removing whole heads for :func:`shrink`.

An attention block is found by one *finder* per family, in ``ATTENTION_FINDERS`` (add one
with :func:`attention_finder`); each returns an :class:`AttentionBlock` naming the q/k/v
projections, the output projection that reads the concatenated heads, the head size, the
number of query and key/value heads, and the attributes to update when heads go:

- Llama / Mistral / Qwen / ViT / Whisper / wav2vec2 (transformers 5) style: ``q_proj``, ``k_proj``,
  ``v_proj``, ``o_proj`` (or ``out_proj``) children and ``head_dim``; grouped-query attention (fewer
  k/v heads) supported.
- GPT-2: q, k and v are thirds of one Hugging Face ``Conv1D`` ``c_attn`` (``offsets``; weight
  ``(in, out)``), split by ``split_size``; cross-attention reads q from ``q_attn``.
- T5: ``q``, ``k``, ``v``, ``o`` and ``n_heads``. A stack's position bias (``relative_attention_bias``
  columns in its first layer, zeros elsewhere) is computed once and added in every layer, so the
  blocks of one kind in a stack are *tied* (``tie``): they keep and lose the same heads.
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
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._model_io import join_name, set_submodule
from ..layers import layer_rule
from .attention import ProjectedMultiheadAttention, mha_problem

__all__ = [
    "ATTENTION_FINDERS",
    "AttentionBlock",
    "attention_blocks",
    "attention_finder",
    "is_hf_conv1d",
    "prune_zero_heads",
]


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
    #: first output row of q, k and v in their modules (GPT-2: q, k and v are thirds of one ``c_attn``)
    offsets: tuple[int, int, int] = (0, 0, 0)
    #: blocks with the same key share their head groups (T5: a stack's layers add one position bias)
    tie: str | None = None
    #: an ``nn.Embedding`` whose columns are this block's heads (T5's ``relative_attention_bias``)
    bias_table: str | None = None

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


@attention_finder
def _proj_style(name: str, mod: nn.Module) -> AttentionBlock | None:
    if isinstance(mod, ProjectedMultiheadAttention):
        return None  # its own finder below
    out = "o_proj" if _linear(mod, "o_proj") is not None else "out_proj"
    q, k, v, o = (_linear(mod, a) for a in ("q_proj", "k_proj", "v_proj", out))
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
    j = join_name
    return AttentionBlock(
        name, j(name, "q_proj"), j(name, "k_proj"), j(name, "v_proj"), j(name, out), hd, n, n_kv, attrs
    )


def is_hf_conv1d(mod: object) -> bool:
    """Whether ``mod`` is Hugging Face's GPT-2 ``Conv1D``: weight ``(nx, nf)`` (inputs, outputs)."""
    rule = layer_rule(mod) if isinstance(mod, nn.Module) else None
    return (
        rule is not None
        and rule.kind == "hf_conv1d"
        and isinstance(getattr(mod, "nf", None), int)
        and isinstance(getattr(mod, "nx", None), int)
    )


@attention_finder
def _gpt2_style(name: str, mod: nn.Module) -> AttentionBlock | None:
    """GPT-2: q, k, v packed in one ``Conv1D`` ``c_attn`` split by ``split_size`` (cross-attention:
    ``q_attn`` for q, ``c_attn`` for k and v), ``c_proj`` reads the heads."""
    c_attn, c_proj = getattr(mod, "c_attn", None), getattr(mod, "c_proj", None)
    hd, n, width = (getattr(mod, a, None) for a in ("head_dim", "num_heads", "split_size"))
    if not (is_hf_conv1d(c_attn) and is_hf_conv1d(c_proj)):
        return None
    if not all(isinstance(x, int) and x > 0 for x in (hd, n, width)) or hd * n != width:
        return None
    q_attn = getattr(mod, "q_attn", None)
    cross = is_hf_conv1d(q_attn)
    if c_attn.nf != (2 if cross else 3) * width or c_proj.weight.shape[0] != width:
        return None
    if cross and q_attn.nf != width:
        return None
    j = join_name
    q = j(name, "q_attn") if cross else j(name, "c_attn")
    offsets = (0, 0, width) if cross else (0, width, 2 * width)
    attrs = [(name, "num_heads", "heads"), (name, "split_size", "width")]
    return AttentionBlock(
        name, q, j(name, "c_attn"), j(name, "c_attn"), j(name, "c_proj"), hd, n, n, attrs, offsets=offsets
    )


@attention_finder
def _t5_style(name: str, mod: nn.Module) -> AttentionBlock | None:
    """T5: ``q``, ``k``, ``v``, ``o`` (no biases), ``n_heads`` x ``key_value_proj_dim``.

    The position bias (``relative_attention_bias``, one column per head, in the first layer of a
    stack; zeros elsewhere) is computed once per stack and added in every layer, so the heads of one
    kind (self- or cross-attention) are tied across the layers of a stack: head ``h`` is one group.
    """
    q, k, v, o = (_linear(mod, a) for a in ("q", "k", "v", "o"))
    hd, n = getattr(mod, "key_value_proj_dim", None), getattr(mod, "n_heads", None)
    if q is None or k is None or v is None or o is None:
        return None
    if not (isinstance(hd, int) and isinstance(n, int) and hd > 0 and n > 0):
        return None
    if not q.out_features == k.out_features == v.out_features == o.in_features == n * hd:
        return None
    table = getattr(mod, "relative_attention_bias", None)
    if table is not None and not (isinstance(table, nn.Embedding) and table.embedding_dim == n):
        return None
    attrs = [(name, "n_heads", "heads")]
    if isinstance(getattr(mod, "inner_dim", None), int):
        attrs.append((name, "inner_dim", "width"))
    j = join_name
    return AttentionBlock(
        name, j(name, "q"), j(name, "k"), j(name, "v"), j(name, "o"), hd, n, n, attrs,
        tie=re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name),
        bias_table=j(name, "relative_attention_bias") if table is not None else None,
    )  # fmt: skip


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
    s = join_name(name, "self")
    attrs = [(s, "num_attention_heads", "heads"), (s, "all_head_size", "width")]
    attrs = [a for a in attrs if isinstance(getattr(sa, a[1], None), int)]
    j = join_name
    return AttentionBlock(
        name, j(s, "query"), j(s, "key"), j(s, "value"), j(name, "output", "dense"), hd, n, n, attrs
    )


@attention_finder
def _torch_mha(name: str, mod: nn.Module) -> AttentionBlock | None:
    if not isinstance(mod, nn.MultiheadAttention):
        return None
    n, sep = mod.num_heads, not mod._qkv_same_embed_dim
    o = join_name(name, "out_proj")
    return AttentionBlock(name, name, name, name, o, mod.head_dim, n, n, packed=True, separate=sep)


@attention_finder
def _projected_mha(name: str, mod: nn.Module) -> AttentionBlock | None:
    if not isinstance(mod, ProjectedMultiheadAttention):
        return None
    if not all(isinstance(getattr(mod, a), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
        return None  # sparse projections (to_sparse): nothing to slice
    j = join_name
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


def _out_in(mod: nn.Module) -> torch.Tensor:
    """The weight of a Linear or HF ``Conv1D`` as ``(out, in)`` (detached; a view)."""
    w = mod.weight.detach()
    return w.t() if is_hf_conv1d(mod) else w


def _sliced(
    lin: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None, delta: torch.Tensor | None
) -> nn.Module:
    """A shallow copy of a Linear / HF ``Conv1D`` keeping ``rows``/``cols`` (outputs/inputs; ``None``:
    all), ``delta`` added to the bias."""
    conv1d = is_hf_conv1d(lin)
    out_dim, in_dim = (1, 0) if conv1d else (0, 1)
    new = copy.copy(lin)
    new._parameters = dict(lin._parameters)  # type: ignore[assignment]
    w = lin.weight.detach()
    if rows is not None:
        w = w.index_select(out_dim, rows.to(w.device))
    if cols is not None:
        w = w.index_select(in_dim, cols.to(w.device))
    new.weight = nn.Parameter(w.clone().contiguous(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias.detach()
        if delta is not None:
            b = (b.to(torch.float64) + delta.to(b.device)).to(b.dtype)
        if rows is not None:
            b = b.index_select(0, rows.to(b.device))
        new.bias = nn.Parameter(b.clone().contiguous(), requires_grad=lin.bias.requires_grad)
    if conv1d:
        new.nx, new.nf = new.weight.shape
    else:
        new.out_features, new.in_features = new.weight.shape
    return new


def _sliced_table(emb: nn.Embedding, cols: torch.Tensor) -> nn.Embedding:
    """A shallow copy of an ``nn.Embedding`` keeping the columns ``cols`` (T5's per-head position bias)."""
    new = copy.copy(emb)
    new._parameters = dict(emb._parameters)  # type: ignore[assignment]
    w = emb.weight.detach().index_select(1, cols.to(emb.weight.device))
    new.weight = nn.Parameter(w.clone().contiguous(), requires_grad=emb.weight.requires_grad)
    new.embedding_dim = w.shape[1]
    return new


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


def _value_rows(model: nn.Module, b: AttentionBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The value weight rows ``(n_kv * head_dim, in)`` of a block and their bias (float64; zeros if none)."""
    v = model.get_submodule(b.v)
    rows = slice(b.offsets[2], b.offsets[2] + b.n_kv * b.head_dim)
    vw = _out_in(v)[rows]
    vb = v.bias.detach()[rows].to(torch.float64) if v.bias is not None else torch.zeros(vw.shape[0])
    return vw, vb.to(torch.float64)


def prune_zero_heads(model: nn.Module) -> list[str]:
    """Remove, in place, the head groups whose value rows are all zero; return the changed module names.

    The removed groups' value biases are folded into the output projection's bias (a group with a
    nonzero value bias is kept when that projection has no bias). At least one group of each block
    is kept. Blocks tied together (T5: the layers of a stack share one position bias) lose only the
    groups that are zero in all of them, and a position-bias table loses its removed heads' columns.
    An ``nn.MultiheadAttention`` with such heads is replaced by a
    :class:`~hadamard_sparse.export.attention.ProjectedMultiheadAttention` holding the other heads
    (one whose configuration it cannot reproduce, e.g. ``add_bias_kv=True``, is kept whole with a
    warning saying why).
    """
    changed: list[str] = []
    blocks: list[AttentionBlock] = []
    for b in attention_blocks(model):
        if b.packed:
            unpacked = _unpack_mha(model, b)
            if unpacked is None:
                continue
            b = unpacked
        blocks.append(b)
    gone_of: dict[str, set[int]] = {}
    for b in blocks:
        vw, vb = _value_rows(model, b)
        gone_of[b.name] = set(_zero_groups(b, vw, vb, model.get_submodule(b.o).bias is not None))
    tied: dict[str, list[AttentionBlock]] = {}
    for b in blocks:
        if b.tie is not None:
            tied.setdefault(b.tie, []).append(b)
    for same in tied.values():
        common = set.intersection(*(gone_of[b.name] for b in same))
        for b in same:
            gone_of[b.name] = common
    for b in blocks:
        gone = sorted(gone_of[b.name])
        if not gone:
            continue
        if len(gone) == b.n_kv:
            gone = gone[1:]
        keep = [g for g in range(b.n_kv) if g not in gone]
        o = model.get_submodule(b.o)
        _, vb = _value_rows(model, b)
        ow = _out_in(o).to(torch.float64).cpu()
        delta = torch.zeros(ow.shape[0], dtype=torch.float64)
        for g in gone:
            bias_v = vb[b.kv_rows(g)].cpu()
            for h in range(b.group_size):
                cols = b.q_rows(g)[h * b.head_dim : (h + 1) * b.head_dim]
                delta += ow[:, cols] @ bias_v
        q_keep = torch.cat([b.q_rows(g) for g in keep])
        kv_keep = torch.cat([b.kv_rows(g) for g in keep])
        rows: dict[str, list[tuple[int, torch.Tensor]]] = {}  # GPT-2: q, k and v rows of one module
        for proj, off, idx in (
            (b.q, b.offsets[0], q_keep),
            (b.k, b.offsets[1], kv_keep),
            (b.v, b.offsets[2], kv_keep),
        ):
            rows.setdefault(proj, []).append((off, idx + off))
        for proj, parts in rows.items():
            kept = torch.cat([idx for _, idx in sorted(parts, key=lambda p: p[0])])
            set_submodule(model, proj, _sliced(model.get_submodule(proj), kept, None, None))
        set_submodule(model, b.o, _sliced(o, None, q_keep, delta if o.bias is not None else None))
        values = {"heads": len(keep) * b.group_size, "kv_heads": len(keep), "width": len(q_keep)}
        for mod_name, attr, what in b.attrs:
            setattr(model.get_submodule(mod_name), attr, values[what])
        if b.bias_table is not None:
            heads = torch.tensor([g * b.group_size + h for g in keep for h in range(b.group_size)])
            set_submodule(model, b.bias_table, _sliced_table(model.get_submodule(b.bias_table), heads))
            changed.append(b.bias_table)
        block = model.get_submodule(b.name)
        if isinstance(block, ProjectedMultiheadAttention):  # 3-D attn_masks keep the original heads' rows
            block.head_ids = [block.head_ids[g] for g in keep]
        changed += [b.name, *rows, b.o] + [m for m, _, _ in b.attrs]
    return changed
