"""Attention backends for open_clip models: ``configure_attention(model, "auto" | "sdpa" | "xformers")``.

What open_clip does by itself (open_clip 3.x, ``open_clip/transformer.py``): the standard ViT and text
towers are stacks of ``ResidualAttentionBlock``, each holding a ``torch.nn.MultiheadAttention`` that is
called as self-attention with ``need_weights=False``. PyTorch then takes one of two routes:

- the image tower (no mask) meets every condition of MHA's *fast path*, ``aten::_native_multi_head_attention``;
  on CPU that kernel is a plain matmul + softmax + matmul and does **not** go through
  ``scaled_dot_product_attention`` (a profile of ``encode_image`` shows ``aten::_softmax``, no SDPA op);
- the text tower passes a float causal mask, which blocks the fast path, so it runs
  ``F.multi_head_attention_forward``, which calls ``F.scaled_dot_product_attention`` with that mask.

So SDPA is not a given. ``configure_attention`` makes it one: it swaps the class of every
``nn.MultiheadAttention`` in the model for a subclass whose forward, for the self-attention call
open_clip makes, does the same maths explicitly (packed in-projection, per-head attention with the
same mask semantics, out-projection) through the chosen kernel. Parameters, buffers, state-dict keys
and ``isinstance(m, nn.MultiheadAttention)`` stay as they were; any other call (cross-attention in
``AttentionalPooler``, ``need_weights=True``, a key padding mask, ...) goes to the original forward.

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN on
  CUDA, the fused CPU kernel on CPU), with the original additive mask.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` in its (B, L, H, Dh) layout, CUDA only. The
  text tower's causal mask becomes ``LowerTriangularMask`` (checked to be exactly causal when the model is
  configured); any other mask is passed as an aligned additive bias tensor, the same maths.

open_clip's own ``Attention`` class (custom blocks: qk-norm, scaled-cosine, ...) already calls
``F.scaled_dot_product_attention`` itself and is left alone by both backends, as are timm image towers
(timm's attention uses SDPA). Under ``xformers`` those modules keep running SDPA.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers")


def xformers_available() -> tuple[bool, str]:
    """(whether xformers can run here, why not)."""
    if not torch.cuda.is_available():
        return False, "xformers needs a CUDA device and there is none"
    if importlib.util.find_spec("xformers") is None:
        return False, "xformers is not installed (pip install 'mimetic[xformers]')"
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # a wheel built against another torch fails here
        return False, f"xformers is installed but does not import: {type(e).__name__}: {e}"
    return True, ""


def configure_attention(model: nn.Module, backend: str = "auto") -> str:
    """Route every self-attention of ``model`` through ``backend``; return the backend actually in use.

    ``"auto"`` is xformers where CUDA and xformers are both there, otherwise SDPA. ``"xformers"`` where it
    cannot run (no CUDA, not installed, or the model has no ``nn.MultiheadAttention`` to route) falls back
    to ``"sdpa"`` with a logged warning that says why, and returns ``"sdpa"``. Calling it again switches.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend in ("auto", "xformers"):
        ok, why = xformers_available()
        if ok and not _has_mha(model):
            ok, why = False, "the model has no nn.MultiheadAttention self-attention for xformers to replace"
        if ok and _model_device(model).type != "cuda":
            ok, why = False, f"the model is on {_model_device(model)}, and xformers runs on CUDA only"
        if ok:
            _install(model, XformersMultiheadAttention)
            return "xformers"
        if backend == "xformers":
            log.warning("attention: xformers was asked for but %s; using PyTorch SDPA instead", why)
    _install(model, SdpaMultiheadAttention)
    return "sdpa"


def restore_attention(model: nn.Module) -> None:
    """Put every swapped ``nn.MultiheadAttention`` back to PyTorch's own forward (tests, comparisons)."""
    for m in model.modules():
        if isinstance(m, _RoutedMultiheadAttention):
            m.__class__ = nn.MultiheadAttention


def attention_backend(model: nn.Module) -> str | None:
    """The backend ``configure_attention`` installed on ``model``: "sdpa", "xformers", or None (untouched)."""
    for m in model.modules():
        if isinstance(m, _RoutedMultiheadAttention):
            return m.backend
    return None


# ---------------------------------------------------------------------------------------------------


def _has_mha(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _causal_mha(model: nn.Module) -> set[int]:
    """ids of the MHA modules that only ever see the text tower's causal mask (open_clip ``CLIP``).

    ``CLIP.encode_text`` always calls its transformer with ``self.attn_mask``; when that buffer is
    exactly the causal mask (0 on and below the diagonal, -inf above), xformers may take its
    ``LowerTriangularMask`` instead of a dense bias. Checked once here, not on every call.
    """
    found: set[int] = set()
    for owner in model.modules():
        mask = getattr(owner, "attn_mask", None)
        transformer = getattr(owner, "transformer", None)
        if not isinstance(mask, torch.Tensor) or transformer is None or mask.ndim != 2:
            continue
        n = mask.shape[0]
        causal = torch.full((n, n), float("-inf"), device=mask.device).triu_(1)
        if mask.shape == causal.shape and torch.equal(mask.float(), causal):
            found.update(id(m) for m in transformer.modules() if isinstance(m, nn.MultiheadAttention))
    return found


def _install(model: nn.Module, cls: type) -> None:
    causal = _causal_mha(model) if cls is XformersMultiheadAttention else set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.__class__ = cls
            m._mimetic_causal = id(m) in causal


def _additive_mask(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MHA's mask semantics: a bool mask marks positions NOT allowed to attend; a float mask is added."""
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def _mask_4d(attn_mask: torch.Tensor, batch: int, heads: int, tgt: int, src: int) -> torch.Tensor:
    """(L, S) or (B*H, L, S) -> broadcastable (B|1, H|1, L, S), as ``F.multi_head_attention_forward`` does."""
    if attn_mask.dim() == 2:
        return attn_mask.view(1, 1, tgt, src)
    return attn_mask.view(batch, heads, tgt, src)


class _RoutedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose self-attention goes through one named kernel. Never constructed:
    ``configure_attention`` swaps the class of existing modules, so parameters and state dict are untouched."""

    backend = "torch"
    _mimetic_causal = False

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        routable = (
            query is key
            and key is value
            and query.dim() == 3
            and not need_weights
            and key_padding_mask is None
            and not is_causal
            and self._qkv_same_embed_dim
            and self.in_proj_weight is not None
            and self.bias_k is None
            and self.bias_v is None
            and not self.add_zero_attn
            and (attn_mask is None or attn_mask.dim() in (2, 3))
        )
        if not routable:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        x = query if self.batch_first else query.transpose(0, 1)  # (B, L, E)
        batch, length, embed = x.shape
        heads = self.num_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, E)
        q, k, v = (t.view(batch, length, heads, embed // heads) for t in (q, k, v))  # (B, L, H, Dh)
        dropout = self.dropout if self.training else 0.0
        out = self._attend(q, k, v, attn_mask, dropout)  # (B, L, H, Dh)
        out = F.linear(out.reshape(batch, length, embed), self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _attend(self, q, k, v, attn_mask, dropout):  # pragma: no cover - overridden
        raise NotImplementedError


class SdpaMultiheadAttention(_RoutedMultiheadAttention):
    """Self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""

    backend = "sdpa"

    def _attend(self, q, k, v, attn_mask, dropout):
        batch, length, heads, _ = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        mask = None
        if attn_mask is not None:
            mask = _mask_4d(_additive_mask(attn_mask, q.dtype), batch, heads, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2)  # (B, L, H, Dh)


class XformersMultiheadAttention(_RoutedMultiheadAttention):
    """Self-attention through ``xformers.ops.memory_efficient_attention`` ((B, L, H, Dh) layout, CUDA)."""

    backend = "xformers"

    def _attend(self, q, k, v, attn_mask, dropout):
        import xformers.ops as xops

        batch, length, heads, _ = q.shape
        bias = None
        if attn_mask is not None:
            if self._mimetic_causal and attn_mask.dim() == 2:
                # The text tower's own mask, checked to be exactly causal in configure_attention.
                bias = xops.LowerTriangularMask()
            else:
                mask = _mask_4d(_additive_mask(attn_mask, q.dtype), batch, heads, length, length)
                # xformers wants the bias's last dimension 8-aligned in memory: pad, then slice back.
                padded = (length + 7) // 8 * 8
                bias = torch.zeros(batch, heads, length, padded, dtype=q.dtype, device=q.device)[..., :length]
                bias.copy_(mask.expand(batch, heads, length, length))
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout)
