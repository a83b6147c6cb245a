"""Training: state, optimizer, train/eval steps, loop, sharding, checkpoints, logging.

Small modules, each usable on its own (from a notebook as well as from the CLI):

* :mod:`~jaxformer.training.state`: ``TrainState`` and its sharded creation.
* :mod:`~jaxformer.training.optimizer`: ``OptimizerConfig``, AdamW + schedules, decay
  mask, clipping, gradient accumulation.
* :mod:`~jaxformer.training.steps`: pure jitted ``train_step`` / ``eval_step``
  (NaN / spike skipping), the ``TaskFn`` protocol.
* :mod:`~jaxformer.training.sharding`: mesh ``("data", "fsdp", "tensor")``, rules,
  batch sharding.
* :mod:`~jaxformer.training.checkpoint`: orbax checkpoints (state + data iterator +
  config), fallback past damaged ones, SIGTERM / SIGINT handling.
* :mod:`~jaxformer.training.workdir_lock`: one run per workdir.
* :mod:`~jaxformer.training.resume_check`: which config changes a resume accepts.
* :mod:`~jaxformer.training.divergence`: stop after too many skipped steps in a row.
* :mod:`~jaxformer.training.distributed`: ``jax.distributed.initialize`` when needed.
* :mod:`~jaxformer.training.metrics_logger`: progress, ``metrics.jsonl``, TensorBoard,
  MFU.
* :mod:`~jaxformer.training.validate`: the config's checks, naming the field.
* :mod:`~jaxformer.training.loop`: ``train(config, workdir)``; the task
  (:mod:`jaxformer.tasks`) owns the data, loss, evals and sample.

Entry point: ``python -m experiments.train --config=experiments/configs/<name>.py
--workdir=DIR``.
"""
