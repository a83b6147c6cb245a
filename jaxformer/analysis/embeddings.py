"""Token embeddings: cosine similarity and nearest neighbours in any model's table.

```python
table_VD = embedding_table(params)                    # the model's token embedding
ids_QK, sims_QK = nearest_neighbours(table_VD, jnp.array([ord("a"), ord("(")]), k=5)
```
Cosine similarity ignores the vectors' lengths, which in a trained table mostly track
token frequency; the angle is what groups tokens used alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# What every jaxformer model calls its input token table (GPT, BERT, the axial LM).
TOKEN_EMBEDDING = "token_embedding"


def cosine_similarity(a_ND: Array, b_MD: Array, *, eps: float = 1e-8) -> Array:
  """All pairwise cosine similarities of two sets of vectors.

  Args:
    a_ND: ``[N, D]`` (or ``[D]`` for one vector).
    b_MD: ``[M, D]`` (or ``[D]``).
    eps: floor of each vector's norm, so a zero vector has similarity 0, not NaN.
  Returns:
    ``[N, M]`` float32 in [-1, 1]; a 1-D input drops its axis (two vectors -> scalar).
  """
  a_ND, b_MD = jnp.asarray(a_ND), jnp.asarray(b_MD)
  if a_ND.shape[-1] != b_MD.shape[-1] or a_ND.ndim > 2 or b_MD.ndim > 2:
    raise ValueError(f"cosine_similarity takes [N, D] and [M, D] (or [D]) with the same "
                     f"D; got shapes {a_ND.shape} and {b_MD.shape}")
  a = a_ND.astype(jnp.float32)
  b = b_MD.astype(jnp.float32)
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
  return jnp.clip(jnp.matmul(a, b.T if b.ndim == 2 else b), -1.0, 1.0)


def nearest_neighbours(table_VD: Array, query_ids_Q: Array, k: int, *,
                       exclude_self: bool = True) -> tuple[Array, Array]:
  """The ``k`` rows of ``table_VD`` most cosine-similar to each query row.

  Args:
    table_VD: ``[V, D]`` an embedding table (one row per token id).
    query_ids_Q: ``[Q]`` int row ids to look up.
    k: neighbours per query, ``1 <= k <= V - exclude_self``.
    exclude_self: leave the query's own row out of its neighbours.
  Returns:
    ``(ids [Q, k] int32, similarities [Q, k] float32)``, most similar first.
  """
  table_VD = jnp.asarray(table_VD)
  query_ids_Q = jnp.asarray(query_ids_Q)
  if table_VD.ndim != 2:
    raise ValueError(f"table must be [V, D], got shape {table_VD.shape}")
  if query_ids_Q.ndim != 1 or not jnp.issubdtype(query_ids_Q.dtype, jnp.integer):
    raise TypeError(f"query_ids must be a 1-D int array, got {query_ids_Q.dtype} "
                    f"{query_ids_Q.shape}")
  vocab = table_VD.shape[0]
  limit = vocab - int(exclude_self)
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
    raise ValueError(f"k={k!r}; expected an int in [1, {limit}]")
  try:   # checked when the ids are concrete; under jit an out-of-range id is clamped
    lo, hi = int(query_ids_Q.min()), int(query_ids_Q.max())
  except (jax.errors.ConcretizationTypeError, ValueError):
    lo, hi = 0, 0
  if lo < 0 or hi >= vocab:
    raise ValueError(f"query_ids must be in [0, {vocab}); got min {lo}, max {hi}")
  sims_QV = cosine_similarity(table_VD[query_ids_Q], table_VD)
  if exclude_self:
    sims_QV = jnp.where(jnp.arange(vocab)[None, :] == query_ids_Q[:, None],
                        -jnp.inf, sims_QV)
  sims_QK, ids_QK = jax.lax.top_k(sims_QV, k)
  return ids_QK.astype(jnp.int32), sims_QK


def embedding_table(params: Mapping[str, Any], name: str = TOKEN_EMBEDDING) -> Array:
  """The ``[V, D]`` table of the first embedding module called ``name`` in ``params``.

  Looks through the whole tree (depth first, in key order), so it finds
  ``params["token_embedding"]["embedding"]`` of a GPT or BERT as well as a table
  nested inside an encoder; logical-partitioning boxes are unwrapped.
  """
  params = nn.meta.unbox(params)
  stack = [("", params)]
  while stack:
    path, node = stack.pop()
    if not isinstance(node, Mapping):
      continue
    if name in node and isinstance(node[name], Mapping) and "embedding" in node[name]:
      return jnp.asarray(node[name]["embedding"])
    stack.extend((f"{path}/{key}", node[key]) for key in sorted(node, reverse=True))
  raise KeyError(f"no '{name}/embedding' table in these params; pass name= for the "
                 "model's token embedding module")
