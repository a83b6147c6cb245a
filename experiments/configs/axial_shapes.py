"""Axial Transformer, generative: pixels in raster order with causal axial attention.

The outer stack summarises the rows above (row attention + causal column attention),
the inner stack reads the current row causally; logits at pixel (i, j) see only earlier
pixels. Pixels are quantised exactly as in ``image_gpt_shapes.py`` (``levels`` per
channel, ``levels ** channels = model.num_clusters``); eval reports ``nll`` and
``bits_per_token`` (bits per pixel) on held-out images, comparable with ImageGPT's.

Tiny (CPU, about a minute, no download): 8 x 8 grey ``shapes``, 4 grey levels::

  python -m experiments.train --config=experiments/configs/axial_shapes.py:tiny \\
      --workdir=runs/axial_shapes_tiny

Real size (accelerators): ``axial_cifar10`` (4 outer + 4 inner layers x 128, 4 heads)
on ``cifar10`` with 8 levels per channel (512 colors); prepare once with
``tfds build cifar10 --file_format=array_record``::

  python -m experiments.train --config=experiments/configs/axial_shapes.py \\
      --workdir=runs/axial_cifar10 \\
      [--config.data.source_options.data_dir=~/tensorflow_datasets]
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) is the CPU variant."""
  tiny = common.variant(arg, "axial_shapes") == "tiny"
  c = config_dict.ConfigDict()
  c.task = "axial_lm"
  c.task_options = common.task_options(c.task, levels=8)

  # axial_cifar10 with 8 levels per channel (512 colors), bfloat16 compute.
  c.model = common.model("axial_cifar10", num_clusters=512, num_inner_layers=4,
                         block=dict(dtype="bfloat16"))

  c.data = common.data(c.task, source="cifar10", eval_split="test",
                       mean=(0.0,), std=(1.0,),  # keep pixels in [0, 1] for the palette
                       batch_size=64, eval_batch_size=64, prefetch=2)

  c.optimizer = common.optimizer(warmup_steps=2000, weight_decay=0.0, b2=0.98,
                                 end_lr_fraction=0.0)
  c.train = common.train(num_steps=100_000, eval_every=5000, checkpoint_every=5000)

  if tiny:
    common.tiny(c, task_options=dict(levels=4),
                model=dict(image_size=(8, 8), num_channels=1, num_clusters=4,
                           num_layers=1, num_inner_layers=1, embed_dim=32),
                block=dict(num_heads=2, mlp_dim=64, dtype="float32"),
                data=dict(source="shapes", eval_split="validation", batch_size=32,
                          eval_batch_size=64),
                optimizer=dict(learning_rate=3e-3, warmup_steps=20,
                               end_lr_fraction=0.1),
                train=dict(num_steps=300, log_every=25, eval_every=100, eval_batches=4,
                           checkpoint_every=300))
  return common.finish(c)
