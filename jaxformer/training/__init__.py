"""Training: state, optimizer, train/eval steps, loop, sharding, checkpoints, logging.

Small modules, each usable on its own (from a notebook as well as from the CLI):

* :mod:`~jaxformer.training.config`: the config's edge: every section parsed once into
  a frozen dataclass (``TrainConfig``, the task's ``Options`` and ``Data``,
  ``ShardingConfig``, ``InitConfig``, ...), errors naming the full path.
* :mod:`~jaxformer.training.init`: where parameters start (scratch, a Hugging Face
  directory, one of our runs: :mod:`~jaxformer.training.finetune`), one interface:
  the model section, the tokenizer, loading into the sharded state, what trains.
* :mod:`~jaxformer.training.state`: ``TrainState`` and its sharded creation.
* :mod:`~jaxformer.training.optimizer`: ``OptimizerConfig``, AdamW + schedules, decay
  mask, clipping, gradient accumulation.
* :mod:`~jaxformer.training.steps`: pure jitted ``train_step`` / ``eval_step``
  (NaN / spike skipping), the ``TaskFn`` protocol.
* :mod:`~jaxformer.training.sharding`: the ``Sharding`` value (mesh + logical-axis
  rules, built once from ``ShardingConfig``): batch and state shardings, ``activate``.
* :mod:`~jaxformer.training.checkpoint`: orbax checkpoints (state + data iterator +
  config), fallback past damaged ones, SIGTERM / SIGINT handling.
* :mod:`~jaxformer.training.workdir_lock`: one run per workdir.
* :mod:`~jaxformer.training.resume_check`: which config changes a resume accepts.
* :mod:`~jaxformer.training.divergence`: stop after too many skipped steps in a row.
* :mod:`~jaxformer.training.distributed`: ``jax.distributed.initialize`` when needed.
* :mod:`~jaxformer.training.metrics_logger`: progress, ``metrics.jsonl``, TensorBoard,
  MFU.
* :mod:`~jaxformer.training.loop`: ``train(config, workdir)``: build, restore or
  init, the step loop; the task (:mod:`jaxformer.tasks`) owns the data, loss, evals
  and sample, the origin what the parameters start from.

Entry point: ``python -m experiments.train --config=experiments/configs/<name>.py
--workdir=DIR``.
"""
