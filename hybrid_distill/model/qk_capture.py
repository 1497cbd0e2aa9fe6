"""Capture the query/key projections of attention modules during a normal forward pass.

Relations (paper Eq. 2) are ``q k^T / sqrt(d_head)`` with the block's *own* projections, taken after its
pre-norm and after any q/k norm. We never materialise attention maps: a hook grabs ``q, k`` as
``(B, H, N, d)`` tensors while the block runs its fused (SDPA) attention unchanged.

Supported attention modules: timm ``Attention`` (fused ``qkv`` linear, optional ``q_norm``/``k_norm``),
``nn.MultiheadAttention`` (open_clip's ``ResidualAttentionBlock``) and timm's RoPE attentions ``EvaAttention`` /
``AttentionRope`` (EVA-01/02 and the other ``Eva`` models). For timm ``Attention``, the hook sits on the output of
``qkv`` so no projection is computed twice (the student's gradients flow through it). For the other two a forward
pre-hook recomputes q, k from the module's input (and, for RoPE attentions, its ``rope`` argument) exactly as the
module does: for RoPE attentions that is after the q/k biases, ``q_norm``/``k_norm`` and the rotary embedding
(applied to the patch tokens only), i.e. the q, k whose product the attention actually softmaxes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import nn

QK = tuple[torch.Tensor, torch.Tensor]
ROPE_ATTENTIONS = (EvaAttention, AttentionRope)


def attention_of(block: nn.Module) -> nn.Module:
    """The self-attention module of a transformer block (timm ``Block`` or open_clip ``ResidualAttentionBlock``)."""
    attn = getattr(block, "attn", None)
    if attn is None:
        raise TypeError(f"{type(block).__name__} has no `attn` attention module; cannot capture q/k")
    return attn


def head_dims(attn: nn.Module) -> tuple[int, int]:
    """(num_heads, head_dim) of a supported attention module."""
    if isinstance(attn, (nn.MultiheadAttention, *ROPE_ATTENTIONS)):
        return attn.num_heads, attn.head_dim
    if hasattr(attn, "qkv") and hasattr(attn, "num_heads"):
        return attn.num_heads, attn.head_dim
    raise TypeError(f"unsupported attention module {type(attn).__name__}: need timm Attention (fused qkv), "
                    "timm EvaAttention/AttentionRope or nn.MultiheadAttention")


def _split_timm_qkv(attn: nn.Module, qkv: torch.Tensor) -> QK:
    B, N, _ = qkv.shape
    qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
    return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])


def _mha_qk(attn: nn.MultiheadAttention, x: torch.Tensor) -> QK:
    if not attn.batch_first:
        x = x.transpose(0, 1)
    B, N, D = x.shape
    bias = attn.in_proj_bias[: 2 * D] if attn.in_proj_bias is not None else None
    qk = F.linear(x, attn.in_proj_weight[: 2 * D], bias)  # (B, N, 2D)
    qk = qk.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, H, N, d)
    return qk[0], qk[1]


def _fused_qk(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The q, k part ``(B, N, 2 A)`` of a fused ``qkv`` projection, with Eva's separate ``q_bias``/``k_bias``."""
    A = attn.num_heads * attn.head_dim
    weight = attn.qkv.weight[: 2 * A]
    if getattr(attn, "q_bias", None) is not None:  # EvaAttention: bias-free qkv linear + (q_bias, k_bias=0, v_bias)
        bias = torch.cat((attn.q_bias, attn.k_bias))
        if getattr(attn, "qkv_bias_separate", False):
            return F.linear(x, weight) + bias
        return F.linear(x, weight, bias)
    bias = attn.qkv.bias[: 2 * A] if attn.qkv.bias is not None else None
    return F.linear(x, weight, bias)


def _apply_rope(t: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool) -> torch.Tensor:
    """Rotate the patch tokens of ``t`` ``(B, H, N, d)`` by ``rope`` (sin|cos); prefix tokens stay as they are."""
    P = num_prefix_tokens
    return torch.cat([t[:, :, :P], apply_rot_embed_cat(t[:, :, P:], rope, half=half)], dim=2).type_as(t)


def _rope_attention_qk(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> QK:
    """q, k of a timm ``EvaAttention``/``AttentionRope``: projections (+ biases), q/k norm, RoPE, kv-head expansion."""
    B, N, _ = x.shape
    if attn.qkv is not None:
        qk = _fused_qk(attn, x).reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
    else:
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, -1, attn.head_dim).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        q = _apply_rope(q, rope, attn.num_prefix_tokens, half)
        k = _apply_rope(k, rope, attn.num_prefix_tokens, half)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: head h uses kv head h // groups (as AttentionRope)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q, k


def qk_from_input(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> QK:
    """q, k ``(B, H, N, d)`` that ``attn`` computes from its (already normalised) input ``x`` ``(B, N, D)``.

    Args:
        attn: a supported attention module.
        x: the attention's input (the block's pre-norm output for pre-norm blocks).
        rope: the rotary embedding the block passes to a RoPE attention (``None`` for the others).
    """
    if isinstance(attn, ROPE_ATTENTIONS):
        return _rope_attention_qk(attn, x, rope)
    if rope is not None:
        raise TypeError(f"{type(attn).__name__} does not take a rotary embedding")
    if isinstance(attn, nn.MultiheadAttention):
        return _mha_qk(attn, x)
    return _split_timm_qkv(attn, attn.qkv(x))


@contextlib.contextmanager
def capture_qk(blocks: Sequence[nn.Module], indices: Sequence[int]) -> Iterator[dict[int, QK]]:
    """Within the context, every forward through ``blocks[i]`` (i in ``indices``) stores ``(q, k)`` in the dict.

    Blocks with a persistent tap (``install_qk_taps``) get no hook: their ``(q, k)`` is taken from the tap when
    the context exits (unless the caller stored one for that index itself), so the context also works inside
    ``torch.compile``, which does not see hooks added after it traced a module.

    Example::

        with capture_qk(model.blocks, [9, 10]) as qk:
            model(x)
        q9, k9 = qk[9]  # (B, H, N, d)
    """
    store: dict[int, QK] = {}
    tapped = [i for i in indices if _tap_module(attention_of(blocks[i])) is not None]
    handles = [_register(attention_of(blocks[i]), i, store) for i in indices if i not in tapped]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
        for i in tapped:
            qk = take_qk(blocks[i])
            if qk is not None and i not in store:
                store[i] = qk


# Persistent taps: hooks installed once, before any torch.compile. Each leaves its output on the module it hooks
# (attribute TAP_ATTR; on the hooked module itself, so a deep copy of the model taps into its own copy).
TAP_ATTR = "_hd_qk"


def install_qk_taps(blocks: Sequence[nn.Module], indices: Sequence[int]) -> None:
    """Tap ``(q, k)`` of ``blocks[i]`` on every forward from now on; read it with ``take_qk``.

    The compile-friendly counterpart of ``capture_qk``: dynamo does not guard on module hooks, so hooks added or
    removed around a compiled call are not seen; hooks present when the model is traced are traced with it.
    Installing twice is a no-op. Until taken, the last ``(q, k)`` (for timm ``Attention``, the whole ``qkv``
    output) stays referenced by the module.
    """
    for i in indices:
        attn = attention_of(blocks[i])
        head_dims(attn)  # fail early on an unsupported module
        if _tap_module(attn) is not None:
            continue
        target = attn if isinstance(attn, (nn.MultiheadAttention, *ROPE_ATTENTIONS)) else attn.qkv
        setattr(target, TAP_ATTR, None)
        if target is attn:
            attn.register_forward_pre_hook(_tap_pre_hook, with_kwargs=True)
        else:
            attn.qkv.register_forward_hook(_tap_qkv_hook)


def take_qk(block: nn.Module) -> QK | None:
    """The ``(q, k)`` ``(B, H, N, d)`` of ``block``'s last forward since the previous take (None if none)."""
    attn = attention_of(block)
    target = _tap_module(attn)
    if target is None:
        raise ValueError(f"{type(block).__name__} has no q/k tap; call install_qk_taps first")
    value = getattr(target, TAP_ATTR)
    setattr(target, TAP_ATTR, None)
    if value is None or target is attn:
        return value
    return _split_timm_qkv(attn, value)


def _tap_module(attn: nn.Module) -> nn.Module | None:
    """The module holding ``attn``'s tap (the attention itself, or its fused ``qkv`` linear), if tapped."""
    for target in (attn, getattr(attn, "qkv", None)):
        if target is not None and hasattr(target, TAP_ATTR):
            return target
    return None


def _recomputing() -> bool:
    """True inside a backward pass (eager): a checkpointed block being recomputed must not refill its tap (the
    tensor would keep that block's recomputed graph alive until the next forward). Compiled code never replays the
    tap in the backward (``skip_fwd_side_effects_in_bwd_under_checkpoint``)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _tap_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if _recomputing():
        return
    if isinstance(module, nn.MultiheadAttention):
        setattr(module, TAP_ATTR, _mha_qk(module, args[0] if args else kwargs["query"]))
        return
    x = args[0] if args else kwargs["x"]
    setattr(module, TAP_ATTR, _rope_attention_qk(module, x, args[1] if len(args) > 1 else kwargs.get("rope")))


def _tap_qkv_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    if _recomputing():
        return
    setattr(module, TAP_ATTR, output)  # (B, N, 3 A); split into q, k by take_qk


def _register(attn: nn.Module, index: int, store: dict[int, QK]) -> torch.utils.hooks.RemovableHandle:
    head_dims(attn)  # fail early on an unsupported module
    if isinstance(attn, nn.MultiheadAttention):
        def pre_hook(module, args, kwargs):
            query = args[0] if args else kwargs["query"]
            store[index] = _mha_qk(module, query)
        return attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if isinstance(attn, ROPE_ATTENTIONS):
        def rope_pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            rope = args[1] if len(args) > 1 else kwargs.get("rope")
            store[index] = _rope_attention_qk(module, x, rope)
        return attn.register_forward_pre_hook(rope_pre_hook, with_kwargs=True)

    def qkv_hook(module, args, output):
        store[index] = _split_timm_qkv(attn, output)
    return attn.qkv.register_forward_hook(qkv_hook)
