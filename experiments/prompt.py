"""Zero-shot classification by prompting a causal LM; prints accuracy and chance.

  python -m experiments.prompt --workdir=runs/gpt_bytes \\
      [--template="Review: {text}\\nSentiment:" --labels=negative,positive \\
       --data=labelled.jsonl]
  python -m experiments.prompt --pretrained=path/to/gpt2 --data=labelled.tsv

``--workdir`` is one of our training runs (its stored config rebuilds the model and
tokenizer, its newest checkpoint, or ``--step``, gives the params; read-only);
``--pretrained`` a Hugging Face causal LM directory. Each text is put in the
``--template`` and scored by the log-probability of each label's verbalizer after it
(:class:`jaxformer.generation.prompting.PromptClassifier`). ``--labels`` is a list
(``negative,positive``: label = word, verbalized with a leading space) or a JSON mapping
(``{"0": " bad", "1": " good"}``). ``--data`` is JSONL (``{"text", "label"}``) or TSV
(``text<TAB>label``); numeric labels index a ``--labels`` list. Without ``--data``, the
built-in :data:`jaxformer.data.labelled.SENTIMENT` set. Everything is :func:`evaluate`.
A bad input prints one ``error:`` line and exits with status 1 (``--verbose``: the
traceback too).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags

from experiments import command_line
from jaxformer.data import labelled
from jaxformer.generation.prompting import PromptClassifier
from jaxformer.pretrained import from_huggingface
from jaxformer.pretrained import spec_of
from jaxformer.pretrained.tokenizers import load_tokenizer
from jaxformer.training import saved_run

DEFAULT_TEMPLATE = "Review: {text}\nSentiment:"


def parse_labels(spec: str) -> dict[str, str]:
  """The verbalizer of ``--labels``: a JSON object, or comma-separated words."""
  spec = spec.strip()
  if spec.startswith("{"):
    try:
      mapping = json.loads(spec)
    except json.JSONDecodeError as e:
      raise ValueError(f"--labels={spec!r} is not a JSON object ({e})") from None
    if not isinstance(mapping, dict) or len(mapping) < 2:
      raise ValueError(f"--labels={spec!r} must map >= 2 labels to verbalizers")
    return {str(k): str(v) for k, v in mapping.items()}
  words = [w.strip() for w in spec.split(",") if w.strip()]
  if len(words) < 2:
    raise ValueError(f"--labels={spec!r} must name >= 2 labels")
  return {w: " " + w for w in words}


def _canonical(labels: Sequence[str], verbalizer: dict[str, str]) -> list[str]:
  """Labels of the data as verbalizer keys (a numeric label indexes the key list)."""
  keys = list(verbalizer)
  return [l if l in verbalizer or not l.isdigit() or int(l) >= len(keys)
          else keys[int(l)] for l in labels]


def load_model(workdir: str | None, pretrained: str | None, step: int | None = None
               ) -> tuple[Any, Any, Any, int]:
  """``(model, params, tokenizer, max_len)`` of a run of ours or a Hugging Face dir."""
  if bool(workdir) == bool(pretrained):
    raise ValueError("give exactly one of --workdir and --pretrained")
  if workdir:
    def causal(config):
      name = config["model"].get("name")
      command_line.require_causal_lm(name, f"a {name!r} run", f"prompting {workdir}")
    run = saved_run.load_run(workdir, step, check=causal)
    return run.model, run.params, run.tokenizer, run.model_config.max_len
  spec = spec_of(pretrained)
  command_line.require_causal_lm(spec.model, f"{spec.hf_class} ({spec.family})",
                                 f"prompting {pretrained}")
  model, params = from_huggingface(pretrained)
  return model, params, load_tokenizer(pretrained), model.config.max_len


def evaluate(model_and_tokenizer: tuple[Any, Any, Any, int], texts: Sequence[str],
             labels: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
             verbalizer: dict[str, str] | None = None, batch_size: int = 16
             ) -> dict[str, float]:
  """``accuracy``, ``chance`` (1 / classes), ``majority`` (most frequent label's
  share) and ``num_examples`` of prompting on ``texts``."""
  model, params, tokenizer, max_len = model_and_tokenizer
  verbalizer = verbalizer or parse_labels("negative,positive")
  labels = _canonical(labels, verbalizer)
  classifier = PromptClassifier(
      model, params, tokenizer, template, verbalizer, batch_size=batch_size,
      add_bos=getattr(tokenizer, "bos_id", None) is not None, max_length=max_len)
  result = dict(classifier.evaluate(texts, labels))
  result["chance"] = 1.0 / len(verbalizer)
  result["majority"] = max(collections.Counter(labels).values()) / len(labels)
  return result


def _define_flags() -> None:
  """Command-line flags, defined only when run as a script (the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "A training run of ours (experiments.train).")
  flags.DEFINE_integer("step", None, "Its checkpoint step (default: newest).")
  flags.DEFINE_string("pretrained", None, "A Hugging Face causal LM directory.")
  flags.DEFINE_string("template", DEFAULT_TEMPLATE, "Prompt with one {text} field.")
  flags.DEFINE_string("labels", "negative,positive",
                      "Comma-separated label words, or a JSON label -> verbalizer map.")
  flags.DEFINE_string("data", None, "Labelled JSONL/TSV file (default: built-in set).")
  flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")
  command_line.define_verbose()


@command_line.user_errors
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.data:
    texts, labels = labelled.read_labelled(f.data)
  else:
    texts, labels = map(list, zip(*labelled.SENTIMENT))
  template = f.template.replace("\\n", "\n")  # a shell passes "\n" literally
  result = evaluate(load_model(f.workdir, f.pretrained, f.step), texts, labels,
                    template=template, verbalizer=parse_labels(f.labels),
                    batch_size=f.batch_size)
  print(f"accuracy {result['accuracy']:.4f} on {result['num_examples']} examples | "
        f"chance {result['chance']:.4f} | majority {result['majority']:.4f}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=command_line.parse_flags)
