"""Logical axis names, defined once, and the rules that map them onto a device mesh.

Every parameter is annotated with ``nn.with_logical_partitioning(init, PARAM_AXES)`` and
key activations with ``nn.with_logical_constraint(x, ACT_AXES)``. The training config
picks a rule set (``rules_for(...)``) that maps these names onto the mesh axes
``data``, ``fsdp``, ``tensor`` and ``context``: one device, data parallel, FSDP, tensor
and context parallel are the same model code with different rules. ``context`` splits
the length axis of the activations (each sequence over the devices of the axis); the
attention then runs as ring attention (``jaxformer.attention.ring``).

Parameters and activations use different names so that, for example, FSDP shards a
weight's ``embed`` dimension without also sharding the activations' feature dimension.
"""

from __future__ import annotations

# --- parameter axes -------------------------------------------------------------------
EMBED = "embed"          # model width d_model
HEADS = "heads"          # query heads
KV_HEADS = "kv_heads"    # key/value heads (grouped-query attention)
HEAD_DIM = "head_dim"    # per-head width
QKV = "qkv"              # the stacked q/k/v axis of a fused projection (never sharded)
MLP = "mlp"              # feed-forward hidden width
VOCAB = "vocab"          # vocabulary / classes
NORM = "norm"            # LayerNorm / RMSNorm scale and bias
POSITION = "position"    # learned position table rows
LAYERS = "layers"        # the stacked axis of nn.scan over layers
PATCH = "patch"          # flattened patch pixels (ViT)

# --- activation axes ------------------------------------------------------------------
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_HEAD_DIM = "act_head_dim"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

MESH_AXES = ("data", "fsdp", "tensor", "context")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def rules_for(*, fsdp: bool = True, tensor: bool = True) -> Rules:
  """Logical-axis rules onto the mesh ``("data", "fsdp", "tensor", "context")``.

  Mesh axes of size 1 are harmless, so the default rules serve every layout: a mesh
  ``data=8, fsdp=1, tensor=1`` is pure data parallelism, ``data=1, fsdp=8`` is FSDP,
  ``tensor=2`` adds Megatron-style tensor parallelism over heads and MLP width,
  ``context=4`` splits each sequence into 4 (the activations' length axis).

  Args:
    fsdp: shard parameters' ``embed`` axis over ``fsdp`` (ZeRO-3 style).
    tensor: shard heads / mlp / vocab over ``tensor``.
  Returns:
    A tuple of ``(logical_name, mesh_axes)`` pairs for ``nn.logical_to_mesh_sharding``.
  """
  t = "tensor" if tensor else None
  return (
      # activations
      (ACT_BATCH, ("data", "fsdp")),
      (ACT_LENGTH, "context"),
      (ACT_EMBED, None),
      (ACT_HEADS, t),
      (ACT_KV_HEADS, t),
      (ACT_HEAD_DIM, None),
      (ACT_MLP, t),
      (ACT_VOCAB, t),
      # parameters
      (EMBED, "fsdp" if fsdp else None),
      (HEADS, t),
      (KV_HEADS, t),
      (HEAD_DIM, None),
      (QKV, None),
      (MLP, t),
      (VOCAB, t),
      (NORM, None),
      (POSITION, None),
      (LAYERS, None),
      (PATCH, None),
  )


DEFAULT_RULES: Rules = rules_for()
