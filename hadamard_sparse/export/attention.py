"""``ProjectedMultiheadAttention``: torch's multi-head attention with its projections as modules.

``nn.MultiheadAttention`` ties the heads' total width to ``embed_dim`` and applies
``in_proj_weight`` (``3E x E``) and ``out_proj`` functionally, so it can neither hold fewer heads
than ``embed_dim / head_dim`` nor run a sparse projection module. :class:`ProjectedMultiheadAttention`
computes the same function with four child modules (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``: ``nn.Linear``, or :class:`~hadamard_sparse.export.sparse.SparseLinear` after
:func:`~hadamard_sparse.to_sparse`) and ``num_heads * head_dim`` free of ``embed_dim``. It is what
:func:`~hadamard_sparse.shrink` leaves where it removes heads of an ``nn.MultiheadAttention``, and
what :func:`~hadamard_sparse.to_sparse` leaves where it makes one of its projections sparse.

Imports point down only: ``heads.py``, ``shrink.py`` and ``sparse.py`` use this module.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._model_io import join_name, train_mode
from ..errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "ProjectedMultiheadAttention",
    "disable_fused_paths",
    "mha_problem",
    "shadow_runs",
    "unpacked_modules",
]

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def mha_problem(mha: nn.Module) -> str | None:
    """Why ``mha`` cannot become a :class:`ProjectedMultiheadAttention` (``None``: it can).

    Refused: types other than ``nn.MultiheadAttention``, subclasses overriding its ``forward``,
    ``add_bias_kv=True``, ``add_zero_attn=True`` and modules still parametrized, ``out_proj``
    included (bake first: a copy would silently drop the parametrization).
    """
    if not isinstance(mha, nn.MultiheadAttention):
        return f"it is a {type(mha).__name__}, not an nn.MultiheadAttention"
    if type(mha).forward is not nn.MultiheadAttention.forward:
        return f"{type(mha).__name__} overrides nn.MultiheadAttention.forward"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True (learned bias_k/bias_v appended to the keys and values) is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True (a zero key/value appended to every sequence) is not supported"
    held = [n or "itself" for n, m in mha.named_modules() if parametrize.is_parametrized(m)]
    if held:
        return f"it is still parametrized ({', '.join(held)}); run hs.remove_parametrizations(model) first"
    return None


def _linear(
    w: torch.Tensor, b: torch.Tensor | None, like: torch.Tensor, like_b: torch.Tensor | None
) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().clone().contiguous(), requires_grad=like.requires_grad)
    if b is not None:
        rg = like_b.requires_grad if like_b is not None else like.requires_grad
        lin.bias = nn.Parameter(b.detach().clone().contiguous(), requires_grad=rg)
    return lin


def _additive(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True: not allowed) as ``-inf``/0, a float mask as is (``nn.MultiheadAttention``'s rule)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise InvalidArgumentError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    return mask


class ProjectedMultiheadAttention(nn.Module):
    r"""``nn.MultiheadAttention`` with explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj`` modules.

    Same ``forward`` signature and return values as ``nn.MultiheadAttention`` (batched and
    unbatched inputs, ``batch_first``, ``key_padding_mask``, 2-D and 3-D ``attn_mask``, bool masks
    with True = not allowed or float masks added to the scores, ``need_weights`` with
    ``average_attn_weights``, ``is_causal`` as a hint that ``attn_mask`` is causal, dropout on the
    attention weights in training). The projections are any modules mapping the last dimension
    (``nn.Linear``, :class:`~hadamard_sparse.export.sparse.SparseLinear`), and the heads' total
    width ``num_heads * head_dim`` may differ from ``embed_dim`` (heads removed by
    :func:`~hadamard_sparse.shrink`). Without weights requested it runs
    ``F.scaled_dot_product_attention``; with weights, an explicit softmax.

    A 3-D ``attn_mask`` keeps the shape the original module took, ``(N * mask_num_heads, L, S)``:
    ``head_ids`` says which of those per-head masks each remaining head reads.

    ``state_dict``: the children's names (``q_proj.weight``, ...), or, when ``mha_state_dict`` is
    True (set by :func:`~hadamard_sparse.to_sparse`, which promises checkpoints the dense model
    loads), ``nn.MultiheadAttention``'s (``in_proj_weight``/``in_proj_bias``, or
    ``q/k/v_proj_weight`` with ``kdim``/``vdim``, and ``out_proj.*``), with the heads' width equal
    to ``embed_dim``. ``load_state_dict`` accepts both.

    ``in_proj_weight``, ``in_proj_bias``, ``bias_k``, ``bias_v`` are ``None``,
    ``add_zero_attn`` and ``_qkv_same_embed_dim`` are False: code that inspects an
    ``nn.MultiheadAttention`` (``nn.TransformerEncoderLayer``'s fast-path checks) then takes its
    regular path. Nested-tensor inputs are refused (as ``nn.MultiheadAttention`` does outside its
    fast path); :func:`disable_fused_paths` turns off ``nn.TransformerEncoder``'s conversion.

    Args:
        q_proj, k_proj, v_proj: the input projections; ``q_proj``/``k_proj`` give the same width,
            ``v_proj`` the width ``out_proj`` reads; each a multiple of ``num_heads``.
        out_proj: the output projection.
        num_heads: the number of heads.
        batch_first: inputs and outputs are ``(N, L, E)`` (else ``(L, N, E)``).
        dropout: dropout probability on the attention weights (training only).

    Attributes:
        embed_dim, kdim, vdim: the widths of query, key and value.
        num_heads, head_dim: the heads and their size (``q_proj``'s width over ``num_heads``).
        head_ids, mask_num_heads, mha_state_dict: see above.

    Example::

        >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
        >>> pm = ProjectedMultiheadAttention.from_mha(mha)
        >>> x = torch.randn(2, 5, 16)
        >>> torch.allclose(pm(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    in_proj_weight: None = None
    in_proj_bias: None = None
    bias_k: None = None
    bias_v: None = None
    add_zero_attn = False
    _qkv_same_embed_dim = False

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        out_proj: nn.Module,
        num_heads: int,
        *,
        batch_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths: dict[str, tuple[int, int]] = {}
        for pname, mod in (
            ("q_proj", q_proj),
            ("k_proj", k_proj),
            ("v_proj", v_proj),
            ("out_proj", out_proj),
        ):
            if not isinstance(mod, nn.Module):
                raise InvalidTypeError(f"{pname} must be an nn.Module, got {type(mod).__name__}")
            dims = (getattr(mod, "in_features", None), getattr(mod, "out_features", None))
            if not all(isinstance(d, int) and d > 0 for d in dims):
                raise InvalidArgumentError(
                    f"{pname} must have positive int in_features and out_features (nn.Linear, SparseLinear), "
                    f"got {type(mod).__name__} with {dims}"
                )
            widths[pname] = (int(dims[0]), int(dims[1]))  # type: ignore[arg-type]
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise InvalidArgumentError(f"num_heads must be a positive int, got {num_heads!r}")
        q_out, k_out, v_out, o_in = (
            widths[p][i] for p, i in (("q_proj", 1), ("k_proj", 1), ("v_proj", 1), ("out_proj", 0))
        )
        if q_out != k_out or v_out != o_in or q_out % num_heads or v_out % num_heads or q_out != v_out:
            raise InvalidArgumentError(
                "q_proj, k_proj and v_proj must give the same width, read by out_proj and divisible by "
                f"num_heads={num_heads}; got widths q={q_out}, k={k_out}, v={v_out}, out_proj reads {o_in}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise InvalidArgumentError(f"dropout must be a float in [0, 1], got {dropout!r}")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.embed_dim, self.kdim, self.vdim = widths["q_proj"][0], widths["k_proj"][0], widths["v_proj"][0]
        self.num_heads = num_heads
        self.head_dim = q_out // num_heads
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.head_ids: list[int] = list(range(num_heads))
        self.mask_num_heads = num_heads
        self.mha_state_dict = False
        self.register_state_dict_post_hook(_pack_state_dict)
        self.register_load_state_dict_pre_hook(_unpack_state_dict)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> ProjectedMultiheadAttention:
        """The same attention as ``mha`` (exact copies of its weights, its mode and forward hooks).

        ``in_proj_weight`` is split into the three projections (or ``q/k/v_proj_weight`` are used
        when ``kdim``/``vdim`` differ from ``embed_dim``), ``in_proj_bias`` likewise; ``out_proj``
        becomes a plain ``nn.Linear`` with the same tensors' values. The forward hooks registered
        on ``mha`` keep running on the new module, but the handles returned when they were
        registered refer to ``mha``: ``handle.remove()`` no longer removes them from the new
        module (remove them from its ``_forward_hooks``/``_forward_pre_hooks`` dicts, or register
        them again on it).

        Args:
            mha: the module (not changed).

        Returns:
            A new :class:`ProjectedMultiheadAttention` on the same device and dtype.

        Raises:
            InvalidTypeError: ``mha`` is not an ``nn.MultiheadAttention``.
            InvalidArgumentError: a configuration it cannot reproduce (``add_bias_kv``,
                ``add_zero_attn``, a subclass overriding ``forward``, a parametrized module).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise InvalidTypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        why = mha_problem(mha)
        if why is not None:
            raise InvalidArgumentError(
                f"ProjectedMultiheadAttention.from_mha cannot convert this module: {why}"
            )
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            ws = mha.in_proj_weight.detach().split(e)
            like = [mha.in_proj_weight] * 3
        else:
            ws = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
            like = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        b = mha.in_proj_bias
        bs = b.detach().split(e) if b is not None else (None, None, None)
        q, k, v = (_linear(w, bb, lk, b) for w, bb, lk in zip(ws, bs, like))
        o = mha.out_proj
        out = _linear(o.weight, o.bias, o.weight, o.bias)
        new = cls(q, k, v, out, mha.num_heads, batch_first=mha.batch_first, dropout=mha.dropout)
        new.train(mha.training)
        for attr in _HOOK_DICTS:
            if hasattr(mha, attr):
                setattr(new, attr, OrderedDict(getattr(mha, attr)))
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise InvalidArgumentError("ProjectedMultiheadAttention does not take nested tensors")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise InvalidArgumentError(
                "query, key and value must all be 2-D (unbatched) or 3-D, got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, _ = query.shape
        src = key.shape[1]
        h, d = self.num_heads, self.head_dim
        kpm = _additive(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise InvalidArgumentError(
                "is_causal=True is a hint that attn_mask is the causal mask, and needs attn_mask "
                "(as in nn.MultiheadAttention); use nn.Transformer.generate_square_subsequent_mask"
            )
        mask = None
        causal = is_causal and kpm is None and not need_weights
        if not causal:
            mask = self._attn_mask(_additive(attn_mask, "attn_mask", query.dtype), n, tgt, src)
            if kpm is not None:
                if tuple(kpm.shape) != (n, src):
                    raise InvalidArgumentError(
                        f"key_padding_mask must have shape {(n, src)}, got {tuple(kpm.shape)}"
                    )
                kpm = kpm.view(n, 1, 1, src)
                mask = kpm if mask is None else mask + kpm
        q = self.q_proj(query).view(n, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, src, h, d).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            w = torch.softmax(scores, dim=-1)
            if p > 0.0:
                w = F.dropout(w, p=p)
            out = torch.matmul(w, v)
            weights = w.mean(dim=1) if average_attn_weights else w
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, h * d))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _attn_mask(self, mask: torch.Tensor | None, n: int, tgt: int, src: int) -> torch.Tensor | None:
        """``attn_mask`` as ``(1 or N, 1 or num_heads, L, S)``; 3-D masks keep the original heads' rows."""
        if mask is None:
            return None
        if mask.dim() == 2:
            if tuple(mask.shape) != (tgt, src):
                raise InvalidArgumentError(
                    f"a 2-D attn_mask must have shape {(tgt, src)}, got {tuple(mask.shape)}"
                )
            return mask.view(1, 1, tgt, src)
        h0 = self.mask_num_heads
        if mask.dim() != 3 or tuple(mask.shape) != (n * h0, tgt, src):
            raise InvalidArgumentError(
                f"attn_mask must be 2-D {(tgt, src)} or 3-D {(n * h0, tgt, src)} (batch * num_heads of the "
                f"original module, {h0}), got shape {tuple(mask.shape)}"
            )
        mask = mask.view(n, h0, tgt, src)
        if self.head_ids != list(range(h0)):
            mask = mask.index_select(1, torch.tensor(self.head_ids, device=mask.device))
        return mask

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}"
        )


_PROJ = ("q_proj", "k_proj", "v_proj")


def _packed_names(mod: ProjectedMultiheadAttention) -> bool:
    return mod.num_heads * mod.head_dim == mod.embed_dim and mod.kdim == mod.vdim == mod.embed_dim


def _pack_state_dict(
    mod: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata: object
) -> None:
    """State-dict post-hook: ``nn.MultiheadAttention``'s names when ``mha_state_dict`` is set."""
    assert isinstance(mod, ProjectedMultiheadAttention)
    w_keys = [f"{prefix}{p}.weight" for p in _PROJ]
    if not mod.mha_state_dict or mod.num_heads * mod.head_dim != mod.embed_dim:
        return
    if not all(k in state_dict for k in w_keys):
        return
    own = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    ws = [own.pop(k) for k in w_keys]
    b_keys = [f"{prefix}{p}.bias" for p in _PROJ]
    bs = [own.pop(k) for k in b_keys if k in own]
    if _packed_names(mod):
        state_dict[prefix + "in_proj_weight"] = torch.cat(ws)
    else:
        for p, w in zip(_PROJ, ws):
            state_dict[f"{prefix}{p}_weight"] = w
    if len(bs) == 3:
        state_dict[prefix + "in_proj_bias"] = torch.cat(bs)
    state_dict.update(own)  # out_proj.* (its names are the same)


def _unpack_state_dict(
    mod: nn.Module,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: object,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: split ``nn.MultiheadAttention``'s tensors into the projections' names."""
    assert isinstance(mod, ProjectedMultiheadAttention)
    e = mod.embed_dim
    if mod.num_heads * mod.head_dim != e:
        return
    packed = state_dict.pop(prefix + "in_proj_weight", None)
    if packed is not None:
        if tuple(packed.shape) != (3 * e, e) or not _packed_names(mod):
            error_msgs.append(
                f"size mismatch for {prefix}in_proj_weight: expected {(3 * e, e)} for "
                f"{mod.__class__.__name__} with embed_dim={e}, kdim={mod.kdim}, vdim={mod.vdim}, "
                f"got {tuple(packed.shape)}"
            )
            return
        for p, w in zip(_PROJ, packed.split(e)):
            state_dict[f"{prefix}{p}.weight"] = w
    for p in _PROJ:
        w = state_dict.pop(f"{prefix}{p}_weight", None)
        if w is not None:
            state_dict[f"{prefix}{p}.weight"] = w
    bias = state_dict.pop(prefix + "in_proj_bias", None)
    if bias is not None:
        for p, b in zip(_PROJ, bias.split(e)):
            state_dict[f"{prefix}{p}.bias"] = b


def _stock_encoder_layer(layer: nn.Module) -> bool:
    """Whether torch's fused encoder-layer kernels can run ``layer`` (they read the dense weights)."""
    return (
        isinstance(layer.self_attn, nn.MultiheadAttention)
        and isinstance(layer.self_attn.out_proj, nn.Linear)
        and isinstance(layer.linear1, nn.Linear)
        and isinstance(layer.linear2, nn.Linear)
    )


def disable_fused_paths(model: nn.Module) -> list[str]:
    """Keep torch's fused transformer kernels away from layers holding other modules; return the names changed.

    In eval mode without gradients, ``nn.TransformerEncoderLayer`` runs one fused kernel with
    ``self_attn.in_proj_weight``, ``linear1.weight``, ... and ``nn.TransformerEncoder`` turns padded
    inputs into nested tensors; neither can run a :class:`ProjectedMultiheadAttention` or a
    ``SparseLinear``. For a layer holding one, ``activation_relu_or_gelu`` (read only by those
    fast-path checks) is set to 0 and the encoder's ``use_nested_tensor`` to False: the flags torch
    sets itself for layers it cannot fuse. The layers then take their regular path (the same
    function). A ProjectedMultiheadAttention already fails the layer's check (``in_proj_bias`` is
    None).
    """
    changed = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and not _stock_encoder_layer(mod):
            if getattr(mod, "activation_relu_or_gelu", 0):
                mod.activation_relu_or_gelu = 0
                changed.append(name)
        if isinstance(mod, nn.TransformerEncoder) and getattr(mod, "use_nested_tensor", False):
            layers = [m for m in mod.layers.modules() if isinstance(m, nn.TransformerEncoderLayer)]
            if any(not _stock_encoder_layer(m) for m in layers):
                mod.use_nested_tensor = False
                changed.append(name)
    return changed


@contextmanager
def shadow_runs(pairs: dict[nn.Module, nn.Module]) -> Iterator[None]:
    """While inside, each call of a key module also runs its value module on the same inputs (no grad).

    ``to_sparse`` uses it to see the inputs of a converted attention's projections while the
    model still holds the ``nn.MultiheadAttention``. A shadow that raises is ignored. The shadow's
    ``forward`` is called, not the module: the forward hooks it copied from the key module have run
    on these inputs already (a pre-hook's changes included) and must not run twice.
    """

    def hook(mod: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        shadow = pairs[mod]
        try:
            with train_mode(shadow, mode=mod.training), torch.no_grad():
                shadow.forward(*args, **kwargs)
        except Exception:  # the shadow only records inputs; the model's own call decides
            pass

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Unpacked:
    """``model.named_modules()`` as :func:`~hadamard_sparse.to_sparse` sees it (see :func:`unpacked_modules`)."""

    #: ``(name, module)`` in module order; a converted attention's projections are its copy's.
    modules: list[tuple[str, nn.Module]]
    #: name of each convertible ``nn.MultiheadAttention`` -> its (unattached) copy
    copies: dict[str, ProjectedMultiheadAttention]
    #: name of each child of a refused ``nn.MultiheadAttention`` -> why it stays as it is
    refused: dict[str, str]


def unpacked_modules(model: nn.Module) -> Unpacked:
    """The modules of ``model``, with every convertible ``nn.MultiheadAttention`` seen as a ProjectedMultiheadAttention.

    The attention itself is listed, followed by its copy's ``q_proj``, ``k_proj``, ``v_proj``
    and ``out_proj`` under the attention's name (``"layers.0.self_attn.q_proj"``), in place of
    its own ``out_proj``. ``model`` is not changed; the copies are swapped in by the caller.
    """
    copies: dict[str, ProjectedMultiheadAttention] = {}
    refused: dict[str, str] = {}
    modules: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            why = "it is the model itself" if name == "" else mha_problem(mod)
            if why is None:
                copies[name] = ProjectedMultiheadAttention.from_mha(mod)
                copies[name].mha_state_dict = True  # checkpoints keep the dense model's names
            else:
                for child, _ in mod.named_children():
                    refused[join_name(name, child)] = (
                        f"inside nn.MultiheadAttention {name!r}, which reads its weight directly and cannot "
                        f"be converted to ProjectedMultiheadAttention: {why}"
                    )
    for name, mod in model.named_modules():
        if any(name.startswith(c + ".") for c in copies):
            continue  # the attention's own children: its copy's are listed instead
        modules.append((name, mod))
        if name in copies:
            modules += [(f"{name}.{c}", m) for c, m in copies[name].named_children()]
    return Unpacked(modules, copies, refused)
