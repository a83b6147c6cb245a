"""Image classification with a Vision Transformer.

Tiny (CPU, about a minute, no download): a 2-layer ViT with 2 x 2 patches on the
synthetic ``shapes`` set (8 x 8 grey images of six shapes on noise)::

  python -m experiments.train --config=experiments/configs/vit_shapes.py:tiny \\
      --workdir=runs/vit_shapes_tiny

Real size (accelerators): ViT-B (12 x 768, 12 heads, MLP 3072, the ``vit_b16`` body)
on ``cifar10`` at its native 32 x 32 with 4 x 4 patches (64 tokens; ViT-B/16 at 224
needs ImageNet-style data resized to 224, e.g. ``--config.data.source=...`` with a
resized TFDS set and ``--config.model.image_size=224 --config.model.patch_size=16``);
prepare once with ``tfds build cifar10 --file_format=array_record``::

  python -m experiments.train --config=experiments/configs/vit_shapes.py \\
      --workdir=runs/vit_cifar10 \\
      [--config.data.source_options.data_dir=~/tensorflow_datasets]

The same task runs the axial classifier: ``--config.model.name=axial_classifier``
with ``AxialTransformerConfig`` fields (see ``experiments/configs/axial_shapes.py``).
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) is the CPU variant."""
  tiny = common.variant(arg, "vit_shapes") == "tiny"
  c = config_dict.ConfigDict()
  c.task = "image_classification"
  c.task_options = common.task_options(c.task)

  # the vit_b16 body on CIFAR-10's 32 x 32 with 4 x 4 patches, bfloat16 compute.
  c.model = common.model("vit_b16", image_size=32, patch_size=4, num_classes=10,
                         block=dict(dropout_rate=0.1, dtype="bfloat16"))

  c.data = common.data(c.task, source="cifar10", eval_split="test",
                       mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                       batch_size=512, eval_batch_size=500, prefetch=2)

  c.optimizer = common.optimizer(warmup_steps=2000, b2=0.999, end_lr_fraction=0.01)
  c.train = common.train(num_steps=30_000, eval_every=2000, checkpoint_every=2000)

  if tiny:
    common.tiny(c, model=dict(image_size=8, patch_size=2, num_channels=1,
                              num_classes=6, num_layers=2, embed_dim=64),
                block=dict(num_heads=4, mlp_dim=128, dropout_rate=0.0,
                           dtype="float32"),
                data=dict(source="shapes", eval_split="validation", mean=(0.5,),
                          std=(0.5,), batch_size=64, eval_batch_size=100),
                optimizer=dict(learning_rate=2e-3, warmup_steps=20,
                               end_lr_fraction=0.1, weight_decay=0.01),
                train=dict(num_steps=300, log_every=25, eval_every=100, eval_batches=5,
                           checkpoint_every=300))
  return common.finish(c)
