"""Mask constructors: values against NumPy, composition, and use in attention."""

from __future__ import annotations

from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.attention import (combine_masks, dot_product_attention, make_causal_mask,
                                 make_key_mask, make_padding_mask, make_prefix_mask,
                                 make_segment_mask)


class MasksTest(parameterized.TestCase):

  @parameterized.parameters((4, None), (3, 6), (1, 5))
  def test_causal_is_bottom_right_aligned(self, q_len, kv_len):
    got = make_causal_mask(q_len, kv_len)
    kv = q_len if kv_len is None else kv_len
    want = np.tril(np.ones((q_len, kv), bool), k=kv - q_len)
    np.testing.assert_array_equal(got, want[None, None])

  def test_padding(self):
    tokens = np.array([[5, 6, 0], [7, 0, 0]])
    got = make_padding_mask(tokens != 0)
    valid = tokens != 0
    want = valid[:, None, :, None] & valid[:, None, None, :]
    np.testing.assert_array_equal(got, want)
    cross = make_padding_mask(tokens != 0, np.ones((2, 4), bool))
    self.assertEqual(cross.shape, (2, 1, 3, 4))
    np.testing.assert_array_equal(cross[0, 0, 2], False)

  def test_key_and_prefix_masks(self):
    valid = np.array([[1, 1, 0], [1, 0, 0]])
    got = make_key_mask(valid)
    self.assertEqual(got.shape, (2, 1, 1, 3))
    np.testing.assert_array_equal(got[:, 0, 0], valid.astype(bool))
    with pytest.raises(ValueError, match=r"make_key_mask: kv_valid must be"):
      make_key_mask(np.ones(3))
    # queries at positions 2 and 3 of 6 key slots: keys up to their own position
    got = make_prefix_mask(jnp.asarray([2, 3]), 6)
    want = np.arange(6)[None, :] <= np.array([2, 3])[:, None]
    np.testing.assert_array_equal(got, want[None, None])
    # all queries at the end of the keys: the bottom-right causal mask
    np.testing.assert_array_equal(make_prefix_mask(jnp.arange(2, 5), 5),
                                  make_causal_mask(3, 5))

  def test_segment(self):
    ids = np.array([[1, 1, 2, 2, 0]])
    got = make_segment_mask(ids)
    np.testing.assert_array_equal(got[0, 0], ids[0][:, None] == ids[0][None, :])
    pair = make_segment_mask(ids, np.array([[2, 0]]))
    np.testing.assert_array_equal(pair[0, 0, :, 0], [False, False, True, True, False])

  def test_combine(self):
    self.assertIsNone(combine_masks(None, None))
    causal = make_causal_mask(4)
    seg = make_segment_mask(np.array([[1, 1, 2, 2]]))
    got = combine_masks(causal, None, seg)
    np.testing.assert_array_equal(got, np.asarray(causal) & np.asarray(seg))
    with pytest.raises(ValueError, match="rank-4"):
      combine_masks(jnp.ones((4, 4), bool))

  def test_segment_mask_equals_segment_ids_in_attention(self):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 4)), jnp.float32) for _ in range(3))
    ids = jnp.asarray([[1, 1, 1, 2, 2, 3], [1, 2, 2, 2, 2, 2]])
    a = dot_product_attention(q, k, v, segment_ids=ids, is_causal=True)
    b = dot_product_attention(q, k, v, mask=combine_masks(make_segment_mask(ids),
                                                          make_causal_mask(6)))
    np.testing.assert_allclose(a, b, atol=1e-6)

  def test_errors(self):
    with pytest.raises(ValueError, match="q_length=-1"):
      make_causal_mask(-1)
    with pytest.raises(ValueError, match="batch of q_valid"):
      make_padding_mask(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"must be \[batch, length\]"):
      make_segment_mask(np.ones((3,)))
