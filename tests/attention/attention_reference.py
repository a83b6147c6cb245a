"""Float64 NumPy reference for attention: forward and an analytic backward."""

from __future__ import annotations

import numpy as np


def allowed_mask(batch, heads, q_len, kv_len, *, mask=None, is_causal=False,
                 q_seg=None, kv_seg=None):
  """Bool ``[B, H, Lq, Lk]``: explicit mask and causal (bottom-right) and segments."""
  allowed = np.ones((batch, heads, q_len, kv_len), bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask, bool), allowed.shape)
  if is_causal:
    q_pos = np.arange(q_len)[:, None] + (kv_len - q_len)
    allowed &= q_pos >= np.arange(kv_len)[None, :]
  if q_seg is not None:
    allowed &= (np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :])
  return allowed


def attention(q, k, v, *, mask=None, bias=None, is_causal=False, q_seg=None, kv_seg=None,
              scale=None, hard=False, d_out=None):
  """Returns ``out [B, Lq, H, Dv]``, ``weights [B, H, Lq, Lk]`` and, given ``d_out``,
  the gradients ``(dq, dk, dv)`` of ``sum(out * d_out)``. Everything float64.

  ``hard=True``: one-hot weights, no gradient to q and k; ``"straight_through"``: the
  one-hot forward with the softmax's gradients for q and k."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  scale = d ** -0.5 if scale is None else scale
  k_rep = np.repeat(k, g, axis=2)    # query head i reads kv head i // g
  v_rep = np.repeat(v, g, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k_rep) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  allowed = allowed_mask(b, h, lq, lk, mask=mask, is_causal=is_causal, q_seg=q_seg,
                         kv_seg=kv_seg)
  masked = np.where(allowed, logits, -np.inf)
  row_ok = allowed.any(-1, keepdims=True)
  safe = np.where(row_ok, masked, 0.0)
  e = np.exp(safe - safe.max(-1, keepdims=True))
  e = np.where(allowed, e, 0.0)
  soft = np.where(row_ok, e / np.where(row_ok, e.sum(-1, keepdims=True), 1.0), 0.0)
  if hard:
    w = np.zeros_like(logits)
    best = np.argmax(safe, axis=-1)
    np.put_along_axis(w, best[..., None], 1.0, axis=-1)
  else:
    w = soft
  w = np.where(row_ok, w, 0.0)
  out = np.einsum("bhqk,bkhd->bqhd", w, v_rep)
  if d_out is None:
    return out, w
  g_out = np.asarray(d_out, np.float64)
  dv_rep = np.einsum("bhqk,bqhd->bkhd", w, g_out)
  if hard is True:
    dq = np.zeros_like(q)
    dk_rep = np.zeros_like(k_rep)
  else:
    dw = np.einsum("bqhd,bkhd->bhqk", g_out, v_rep)
    ds = soft * (dw - (dw * soft).sum(-1, keepdims=True)) * scale
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k_rep)
    dk_rep = np.einsum("bhqk,bqhd->bkhd", ds, q)
  dk = dk_rep.reshape(b, lk, hkv, g, d).sum(3)
  dv = dv_rep.reshape(b, lk, hkv, g, v.shape[-1]).sum(3)
  return out, w, (dq, dk, dv)
