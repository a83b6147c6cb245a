"""The config edge: every section typed once, errors naming the full path."""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os

import pytest

from experiments.configs import bert_mlm, gpt_bytes, transformer_reversal
from jaxformer import configs
from jaxformer import tasks
from jaxformer.data import sources
from jaxformer.data.config import DataConfig
from jaxformer.training import config as config_lib
from jaxformer.training import init as init_lib
from jaxformer.training.sharding import ShardingConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Section:
  count: int
  rate: float = 0.5
  name: str | None = None
  sizes: tuple[int, ...] = (1, 2)
  flag: bool = False


def test_parse_types_defaults_and_errors():
  got = configs.parse(_Section, {"count": 3, "rate": 1, "sizes": [4, 5]}, "sec")
  assert got == _Section(count=3, rate=1.0, sizes=(4, 5))
  assert isinstance(got.rate, float) and configs.parse(_Section, got, "sec") is got
  for section, match in [
      ({}, r"sec\.count is missing"),
      ({"count": 1, "nope": 2}, r"sec\.nope is not a field of sec.*valid: \['count'"),
      ({"count": True}, r"sec\.count=True must be an int"),
      ({"count": 1, "rate": "fast"}, r"sec\.rate='fast' must be a number"),
      ({"count": 1, "name": 3}, r"sec\.name=3 must be a string or None"),
      ({"count": 1, "sizes": "12"}, r"sec\.sizes='12' must be a tuple of an int"),
      ({"count": 1, "flag": 1}, r"sec\.flag=1 must be a bool"),
  ]:
    with pytest.raises(ValueError, match=match):
      configs.parse(_Section, section, "sec")
  assert configs.as_dict(got)["sizes"] == (4, 5)


def test_every_experiment_config_parses_into_typed_sections():
  for path in sorted(glob.glob(os.path.join(REPO, "experiments/configs/*.py"))):
    name = os.path.basename(path)[:-3]
    if name in ("__init__", "common"):
      continue
    module = importlib.import_module(f"experiments.configs.{name}")
    for arg in ("", "tiny"):
      c = module.get_config(arg)
      if c.data.source == "text_files":
        c.data.source_options.path = path
      run = config_lib.parse(c)
      assert isinstance(run.data, run.task.Data) and isinstance(run.train,
                                                                config_lib.TrainConfig)
      assert isinstance(run.sharding, ShardingConfig)
      assert isinstance(run.task_options, run.task.Options)
      assert run.init.origin == "scratch" and run.stored["task"] == c.task


@pytest.mark.parametrize("section,field,value,match", [
    ("train", "log_every", "5", r"train\.log_every='5' must be an int"),
    ("train", "seed", -1, r"train\.seed=-1"),
    ("train", "max_consecutive_skipped", 0, r"train\.max_consecutive_skipped=0"),
    ("train", "allow_config_changes", ("",), r"train\.allow_config_changes"),
    ("sharding", "cpu_devices", -2, r"sharding\.cpu_devices=-2"),
    ("distributed", "initialize", "maybe", r"distributed\.initialize='maybe'"),
    ("task_options", "sample_tokens", 2.5, r"task_options\.sample_tokens=2\.5"),
    ("data", "prefetch", -1, r"data\.prefetch=-1"),
])
def test_errors_name_the_full_path(section, field, value, match):
  c = configs.plain(gpt_bytes.get_config("tiny"))  # a plain dict takes any value
  c[section][field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.parse(c)


def test_each_source_owns_its_options_and_each_task_its_data():
  assert sources.option_names("reversal")[:1] == ("num_examples",)
  assert sources.option_names("imdb_reviews") == ("data_dir",)
  with pytest.raises(ValueError, match=r"data\.source_options\.data_dir is not an option "
                     r"of data\.source='stdlib_text'; valid: \['root'\]"):
    DataConfig(source="stdlib_text", source_options={"data_dir": "x"}, batch_size=1,
               eval_batch_size=1)
  c = configs.plain(transformer_reversal.get_config("tiny"))
  assert config_lib.parse(c).data.source_len == 16
  c["data"]["source_len"] = 0
  with pytest.raises(ValueError, match=r"data\.source_len=0"):
    config_lib.parse(c)
  # a field only another task reads is refused, naming it
  c = configs.plain(gpt_bytes.get_config("tiny"))
  c["data"]["label_key"] = "y"
  with pytest.raises(ValueError, match=r"data\.label_key is not a field of data"):
    config_lib.parse(c)
  del c["data"]["label_key"], c["data"]["seq_len"]
  with pytest.raises(ValueError, match=r"data\.seq_len is missing"):
    config_lib.parse(c)
  c = bert_mlm.get_config("tiny")
  c.data.pipeline = "pairs"
  with pytest.raises(ValueError, match=r"data\.pipeline='pairs' is not one of"):
    config_lib.parse(c)
  assert tasks.TASKS["masked_lm"].parse_options({"nsp": True}).nsp is True


def test_init_origin_is_chosen_once():
  assert config_lib.make_origin(init_lib.InitConfig()).where() == "scratch"
  with pytest.raises(ValueError, match="init origin 'elsewhere'"):
    init_lib.InitConfig(origin="elsewhere", path="x")
  with pytest.raises(ValueError, match="no checkpoint"):
    config_lib.make_origin(init_lib.InitConfig.parse(
        None, {"pretrained_workdir": "/nonexistent/run"}))
