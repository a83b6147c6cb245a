"""Resume config check: harmless changes allowed, the rest one error (old -> new),
deliberate changes through train.allow_config_changes."""

from __future__ import annotations

import copy

import pytest

from jaxformer.training import resume_check

STORED = {"task": "causal_lm",
          "model": {"name": "gpt", "num_layers": 2, "dims": [1, 2]},
          "optimizer": {"learning_rate": 1e-3, "b2": 0.99},
          "data": {"seq_len": 64, "pack": True, "prefetch": 2, "batch_size": 12},
          "train": {"seed": 0, "num_steps": 100, "log_every": 10,
                    "allow_config_changes": []},
          "sharding": {"mesh_shape": [-1, 1, 1]}}


def _changed(**edits):
  config = copy.deepcopy(STORED)
  for key, value in edits.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def test_harmless_changes_are_returned_not_refused():
  new = _changed(train__num_steps=200, train__log_every=5, data__prefetch=0,
                 sharding__mesh_shape=(1, 2, 1))
  harmless, allowed = resume_check.check_resume(STORED, new)
  assert harmless == {"data.prefetch": (2, 0), "sharding.mesh_shape": ([-1, 1, 1],
                                                                       [1, 2, 1]),
                      "train.log_every": (10, 5), "train.num_steps": (100, 200)}
  assert allowed == {}
  assert resume_check.check_resume(STORED, _changed(model__dims=(1, 2))) == ({}, {})


def test_trajectory_changes_are_one_error_listing_each_field():
  new = _changed(optimizer__learning_rate=0.111, train__seed=1, data__seq_len=32,
                 data__pack=False, data__batch_size=8, train__num_steps=7)
  new["model"]["extra"] = 1
  with pytest.raises(ValueError) as e:
    resume_check.check_resume(STORED, new, where="checkpoint 5")
  message = str(e.value)
  for line in ("optimizer.learning_rate: 0.001 -> 0.111", "train.seed: 0 -> 1",
               "data.seq_len: 64 -> 32", "data.pack: True -> False",
               "data.batch_size: 12 -> 8", "model.extra: '<absent>' -> 1"):
    assert line in message
  assert "checkpoint 5" in message and "allow_config_changes" in message
  assert "num_steps" not in message


def test_allow_config_changes_permits_named_keys_and_sections():
  new = _changed(optimizer__learning_rate=1e-4, optimizer__b2=0.95,
                 train__allow_config_changes=("optimizer.learning_rate",))
  with pytest.raises(ValueError, match="optimizer.b2: 0.99 -> 0.95") as e:
    resume_check.check_resume(STORED, new)
  assert "learning_rate" not in str(e.value)
  new["train"]["allow_config_changes"] = ("optimizer",)
  harmless, allowed = resume_check.check_resume(STORED, new)
  assert allowed == {"optimizer.b2": (0.99, 0.95),
                     "optimizer.learning_rate": (1e-3, 1e-4)}
  assert harmless == {"train.allow_config_changes": ([], ["optimizer"])}


@pytest.mark.parametrize("value", ["optimizer", ("optimizer", 3), ("",)])
def test_bad_allow_config_changes(value):
  with pytest.raises(ValueError, match="train.allow_config_changes"):
    resume_check.allowed_changes({"train": {"allow_config_changes": value}})


def test_log_changes_records_deliberate_changes():
  class Logger:
    def __init__(self):
      self.text, self.rows = [], []

    def log_text(self, text):
      self.text.append(text)

    def log_row(self, row):
      self.rows.append(row)
  logger = Logger()
  changes = {"harmless": {"train.num_steps": (100, 200)},
             "allowed": {"optimizer.learning_rate": (1e-3, 1e-4)}}
  resume_check.log_changes(logger, 50, changes,
                           {"optimizer": {"schedule": "cosine"}})
  assert "train.num_steps: 100 -> 200" in logger.text[0]
  assert "schedule" in logger.text[0]
  assert logger.rows == [{"step": 50, "config_changes": {
      "optimizer.learning_rate": {"old": 1e-3, "new": 1e-4}}}]
  resume_check.log_changes(logger, 0, {}, {"optimizer": {}})  # from scratch: nothing
  assert len(logger.text) == 2 and len(logger.rows) == 1


if __name__ == "__main__":
  pytest.main([__file__])
