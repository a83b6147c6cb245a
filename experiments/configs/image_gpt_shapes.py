"""ImageGPT: autoregressive pixels (palette ids in raster order) with a GPT decoder.

Pixels in [0, 1] (``data.mean=0, data.std=1``) are rounded per channel to
``task_options.levels`` evenly spaced values; the palette ids (``levels ** channels``
= ``model.num_clusters``) are modelled as a causal LM. Eval reports ``nll`` and
``bits_per_token`` (bits per pixel) on held-out images.

Tiny (CPU, about a minute, no download): 8 x 8 grey ``shapes``, 4 grey levels::

  python -m experiments.train --config=experiments/configs/image_gpt_shapes.py:tiny \\
      --workdir=runs/image_gpt_shapes_tiny

Real size (accelerators): iGPT-S (24 x 512, 8 heads, the ``image_gpt_small`` preset)
on ``cifar10`` 32 x 32 with 8 levels per channel = 512 colors (iGPT's palette size;
iGPT's own palette is k-means, this one a regular grid); prepare once with
``tfds build cifar10 --file_format=array_record``::

  python -m experiments.train --config=experiments/configs/image_gpt_shapes.py \\
      --workdir=runs/image_gpt_cifar10 \\
      [--config.data.source_options.data_dir=~/tensorflow_datasets]
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """The config; ``arg="tiny"`` (alias ``"runlocal"``) is the CPU variant."""
  tiny = common.variant(arg, "image_gpt_shapes") == "tiny"
  c = config_dict.ConfigDict()
  c.task = "image_lm"
  c.task_options = common.task_options(c.task, levels=8)

  # image_gpt_small (iGPT-S), rematerialised, bfloat16 compute.
  c.model = common.model("image_gpt_small", remat=True, block=dict(dtype="bfloat16"))

  c.data = common.data(c.task, source="cifar10", eval_split="test",
                       mean=(0.0,), std=(1.0,),  # keep pixels in [0, 1] for the palette
                       batch_size=128, eval_batch_size=128, prefetch=2)

  c.optimizer = common.optimizer(warmup_steps=5000, weight_decay=0.0,
                                 end_lr_fraction=0.0)
  c.train = common.train(num_steps=100_000, eval_every=5000, checkpoint_every=5000)

  if tiny:
    common.tiny(c, task_options=dict(levels=4),
                model=dict(image_size=(8, 8), num_clusters=4, num_layers=2,
                           embed_dim=64, remat=False),
                block=dict(num_heads=4, mlp_dim=128, dtype="float32"),
                data=dict(source="shapes", eval_split="validation", batch_size=32,
                          eval_batch_size=64),
                optimizer=dict(learning_rate=2e-3, warmup_steps=20,
                               end_lr_fraction=0.1),
                train=dict(num_steps=300, log_every=25, eval_every=100, eval_batches=4,
                           checkpoint_every=300))
  return common.finish(c)
