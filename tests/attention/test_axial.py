"""Axial attention == MultiHeadAttention applied along each row / column."""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.attention import (AxialAttention, AxialAttentionStack, MultiHeadAttention,
                                 axial_attention_stack)


def _image(shape=(2, 3, 5, 8), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class AxialTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("rows", 1, False), ("columns", 2, True),
                                  ("negative_axis", -2, False))
  def test_equals_attention_per_line(self, axis, causal):
    x = _image()
    layer = AxialAttention(num_heads=2, axis=axis, is_causal=causal)
    variables = layer.init(jax.random.key(0), x)
    got = self.variant(layer.apply)(variables, x)
    mha = MultiHeadAttention(num_heads=2)
    mha_vars = {"params": variables["params"]["attention"]}
    moved = np.moveaxis(np.asarray(x), axis, 1)           # [B, L_axis, other, D]
    want = np.stack([mha.apply(mha_vars, jnp.asarray(moved[:, :, j]), is_causal=causal)
                     for j in range(moved.shape[2])], axis=2)
    np.testing.assert_allclose(got, np.moveaxis(want, 1, axis), atol=1e-5)

  def test_three_spatial_axes(self):
    x = _image((1, 2, 3, 4, 8))
    layer = AxialAttention(num_heads=2, axis=2)
    variables = layer.init(jax.random.key(0), x)
    got = layer.apply(variables, x)
    mha = MultiHeadAttention(num_heads=2)
    mha_vars = {"params": variables["params"]["attention"]}
    want = mha.apply(mha_vars, x[:, 1, :, 3])               # one line along axis 2
    np.testing.assert_allclose(got[:, 1, :, 3], want, atol=1e-5)

  def test_return_weights(self):
    x = _image()
    layer = AxialAttention(num_heads=2, axis=1, is_causal=True)
    variables = layer.init(jax.random.key(0), x)
    y, w = layer.apply(variables, x, return_weights=True)
    np.testing.assert_allclose(y, layer.apply(variables, x), atol=1e-6)
    self.assertEqual(w.shape, (2, 5, 2, 3, 3))           # [B, W, H, L_rows, L_rows]
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    mha = MultiHeadAttention(num_heads=2)
    _, w_col = mha.apply({"params": variables["params"]["attention"]}, x[:, :, 4],
                         is_causal=True, return_weights=True)
    np.testing.assert_allclose(w[:, 4], w_col, atol=1e-6)
    (y2, w2), state = layer.apply(variables, x, return_weights=True,
                                  mutable=["intermediates"])
    (sown,) = state["intermediates"]["axial_attention_weights"]
    np.testing.assert_array_equal(sown, w2)
    (folded,) = state["intermediates"]["attention"]["attention_weights"]
    self.assertEqual(folded.shape, (10, 2, 3, 3))        # [B * W, H, L, L]
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    self.assertEqual(state, {})                          # nothing sown without weights

  def test_out_kernel_init_reaches_the_output_projection(self):
    x = _image()
    layer = AxialAttention(num_heads=2, axis=1, out_kernel_init=jax.nn.initializers.zeros)
    params = layer.init(jax.random.key(0), x)["params"]["attention"]
    np.testing.assert_array_equal(params["out"]["kernel"].value, 0.0)
    self.assertGreater(float(jnp.abs(params["qkv"]["kernel"].value).max()), 0.0)
    np.testing.assert_array_equal(layer.apply({"params": {"attention": params}}, x), 0.0)

  def test_stack_attends_within_rows_first_then_within_columns(self):
    """As its docstring says: the first layer of axial_attention_stack mixes only the
    pixels of a row (along W), the second only those of a column (along H)."""
    x = _image()
    stack = axial_attention_stack(2, 2)
    p = stack.init(jax.random.key(0), x)["params"]
    first = AxialAttention(num_heads=2, axis=stack.axes[0])
    second = AxialAttention(num_heads=2, axis=stack.axes[1])
    bumped = x.at[:, 1, 2].add(1.0)       # one pixel: row 1, column 2
    self.assertEqual(tuple(stack.axes), (2, 1))
    for layer, params, kept in ((first, p["axis_0"], "row"),
                                (second, p["axis_1"], "column")):
      changed = np.abs(np.asarray(layer.apply({"params": params}, bumped)
                                  - layer.apply({"params": params}, x))).max(-1) > 0
      want = np.zeros(changed.shape, bool)
      if kept == "column":
        want[:, :, 2] = True               # every row of column 2, nothing else
      else:
        want[:, 1, :] = True               # every column of row 1, nothing else
      np.testing.assert_array_equal(changed, want, err_msg=kept)

  def test_stack_is_rows_then_columns(self):
    x = _image()
    stack = axial_attention_stack(2, 2, is_causal=(True, False))
    self.assertIsInstance(stack, AxialAttentionStack)
    variables = stack.init(jax.random.key(0), x)
    got = stack.apply(variables, x)
    p = variables["params"]
    rows = AxialAttention(num_heads=2, axis=2, is_causal=True)     # along W
    cols = AxialAttention(num_heads=2, axis=1, is_causal=False)    # along H
    want = cols.apply({"params": p["axis_1"]}, rows.apply({"params": p["axis_0"]}, x))
    np.testing.assert_allclose(got, want, atol=1e-6)

  def test_bad_axis(self):
    x = _image()
    for axis in (0, 3, -1, -4):
      with pytest.raises(ValueError, match=f"axis={axis} for a rank-4 input"):
        AxialAttention(num_heads=2, axis=axis).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="one entry per axis"):
      AxialAttentionStack(num_heads=2, axes=(1, 2), is_causal=(True,)).init(
          jax.random.key(0), x)
