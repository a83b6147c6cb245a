"""Position-wise feed-forward network."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxformer import axes

Array = jax.Array
Dtype = Any
Initializer = Any

# name -> (activation, gated). "gelu" is the tanh approximation (GPT-2); "gelu_exact" is
# the erf form (BERT, ViT). Gated variants (GLU family) use two input projections.
ACTIVATIONS = {
    "gelu": (lambda x: nn.gelu(x, approximate=True), False),
    "gelu_exact": (lambda x: nn.gelu(x, approximate=False), False),
    "relu": (nn.relu, False),
    "swiglu": (nn.silu, True),
    "geglu": (lambda x: nn.gelu(x, approximate=True), True),
}


def check_activation(activation: str, *, field: str = "activation") -> None:
  """Raises ValueError unless ``activation`` is a key of :data:`ACTIVATIONS`."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"{field}={activation!r}; expected one of {sorted(ACTIVATIONS)}")


def dense(features: int, in_axis: str, out_axis: str, *, use_bias: bool, dtype: Dtype,
          param_dtype: Dtype, kernel_init: Initializer,
          name: str | None = None) -> nn.Dense:
  """``nn.Dense`` whose kernel/bias carry logical axis names ``(in_axis, out_axis)``."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
      name=name)


class MLP(nn.Module):
  """``x [B, L, D] -> wo(act(wi(x))) [B, L, D]`` (gated: ``wo(act(wi_gate(x)) * wi(x))``).

  Attributes:
    hidden_dim: inner width (``mlp`` axis).
    activation: a key of :data:`ACTIVATIONS`.
    use_bias: biases on both projections.
    dropout_rate: dropout on the hidden activations (0 in GPT-2/BERT/ViT; the dropout
      after the whole sublayer is applied by the block).
    kernel_init: initializer of ``wi`` (and ``wi_gate``).
    out_kernel_init: initializer of ``wo``; None = ``kernel_init`` (GPT-2 / nanoGPT use
      ``normal(init_stddev / sqrt(2 * num_layers))``).
  """
  hidden_dim: int
  activation: str = "gelu"
  use_bias: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  out_kernel_init: Initializer | None = None

  @nn.compact
  def __call__(self, x_BLD: Array, deterministic: bool = True) -> Array:
    check_activation(self.activation)
    act, gated = ACTIVATIONS[self.activation]
    features = x_BLD.shape[-1]
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h_BLF = dense(self.hidden_dim, axes.EMBED, axes.MLP, kernel_init=self.kernel_init,
                  name="wi", **kw)(x_BLD)
    if gated:
      gate_BLF = dense(self.hidden_dim, axes.EMBED, axes.MLP, kernel_init=self.kernel_init,
                       name="wi_gate", **kw)(x_BLD)
      h_BLF = act(gate_BLF) * h_BLF
    else:
      h_BLF = act(h_BLF)
    h_BLF = nn.with_logical_constraint(h_BLF,
                                       (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
    h_BLF = nn.Dropout(self.dropout_rate)(h_BLF, deterministic=deterministic)
    out_init = self.kernel_init if self.out_kernel_init is None else self.out_kernel_init
    return dense(features, axes.MLP, axes.EMBED, kernel_init=out_init, name="wo",
                 **kw)(h_BLF)
