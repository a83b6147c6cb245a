"""Builds the tiny Hugging Face fixtures of tests/pretrained (needs torch + transformers).

  /work/venv-hf/bin/python tests/pretrained/make_fixtures.py [OUT_DIR]

For each family (GPT-2, BERT, DistilBERT, ViT) a few tiny random models (2 layers,
width 32) are written with ``save_pretrained`` (``config.json`` + ``model.safetensors``),
together with ``reference.npz``: the fixed inputs of :func:`inputs` and the reference
outputs of the PyTorch model on them (logits, every hidden state, and where present the
pooled output and the NSP logits), including a row with padding in its attention mask.
The GPT-2 and BERT language models also get a tokenizer (byte-level BPE ``vocab.json`` +
``merges.txt``; WordPiece ``vocab.txt``) trained on a few sentences, and the ids the
``transformers`` tokenizers give for :data:`TOKENIZER_TEXTS`. ``VERSIONS.json`` names the
versions that made them. The tests import :func:`reference_outputs` too, to compare
against the live reference when torch and transformers are installed.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "fixtures")
BATCH, LENGTH, PAD = 2, 12, 4   # row 1 has PAD padding positions at its end
IMAGE, PATCH, CHANNELS = 8, 4, 3

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A transformer attends to every token of its context.",
    "Pretrained weights make fine-tuning cheap; prompting needs none.",
    "def attention(q, k, v): return softmax(q @ k.T) @ v",
    "Hello world! Hello JAX, hello Flax, hello attention maps.",
] * 4
TOKENIZER_TEXTS = ["Hello world!", "The lazy fox attends to the dog.",
                   "unseen wordz 123 ünïcode"]

# name -> (family, transformers class, config kwargs)
WIDTH = dict(gpt2=dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
             bert=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64),
             distilbert=dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                             max_position_embeddings=64),
             vit=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, image_size=IMAGE, patch_size=PATCH,
                      num_channels=CHANNELS))
FIXTURES = {
    "gpt2_lm": ("gpt2", "GPT2LMHeadModel", dict(activation_function="gelu_new")),
    "gpt2_model": ("gpt2", "GPT2Model", dict(vocab_size=96, activation_function="gelu",
                                             layer_norm_epsilon=1e-6)),
    "bert_pretraining": ("bert", "BertForPreTraining", dict(hidden_act="gelu")),
    "bert_model": ("bert", "BertModel", dict(vocab_size=96, type_vocab_size=3,
                                             hidden_act="gelu_new",
                                             layer_norm_eps=1e-6)),
    "bert_mlm": ("bert", "BertForMaskedLM", dict(vocab_size=96)),
    "bert_classifier": ("bert", "BertForSequenceClassification",
                        dict(vocab_size=96, num_labels=3)),
    "distilbert_model": ("distilbert", "DistilBertModel", dict(vocab_size=96)),
    "distilbert_mlm": ("distilbert", "DistilBertForMaskedLM", dict(vocab_size=96)),
    "vit_model": ("vit", "ViTModel", dict()),
    "vit_classifier": ("vit", "ViTForImageClassification",
                       dict(num_labels=5, layer_norm_eps=1e-6)),
}


def inputs(family: str, vocab_size: int, type_vocab_size: int = 2) -> dict[str, np.ndarray]:
  """The fixed inputs (numpy); row 1 of the text inputs ends in PAD padding positions."""
  rng = np.random.default_rng(0)
  if family == "vit":
    pixels = rng.normal(size=(BATCH, CHANNELS, IMAGE, IMAGE)).astype(np.float32)
    return {"pixel_values": pixels}
  ids = rng.integers(1, vocab_size, (BATCH, LENGTH)).astype(np.int64)
  mask = np.ones((BATCH, LENGTH), np.int64)
  mask[1, LENGTH - PAD:] = 0
  out = {"input_ids": ids, "attention_mask": mask}
  if family == "bert":
    types = np.zeros((BATCH, LENGTH), np.int64)
    types[:, LENGTH // 2:] = rng.integers(0, type_vocab_size, (BATCH, LENGTH // 2))
    out["token_type_ids"] = types
  return out


def reference_outputs(directory: str, family: str) -> dict[str, np.ndarray]:
  """Loads ``directory`` with transformers and runs it on :func:`inputs` (float32)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
    hf = json.load(f)
  cls = getattr(transformers, hf["architectures"][0])
  model = cls.from_pretrained(directory, attn_implementation="eager").eval()
  feed = inputs(family, hf.get("vocab_size", 0), hf.get("type_vocab_size", 2))
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v) for k, v in feed.items()},
                output_hidden_states=True)
  ref = {f"input_{k}": v for k, v in feed.items()}
  ref["hidden_states"] = np.stack([h.numpy() for h in out.hidden_states])
  for name, key in (("logits", "logits"), ("prediction_logits", "logits"),
                    ("seq_relationship_logits", "nsp_logits"),
                    ("pooler_output", "pooled"), ("last_hidden_state", "last_hidden_state")):
    value = getattr(out, name, None)
    if value is not None:
      ref[key] = value.numpy()
  if "last_hidden_state" not in ref and family != "vit":
    # GPT-2's last hidden state is after ln_f, BERT's after the last post-LN; ViT's
    # hidden states stop before its final layernorm, so it has none without the base.
    ref["last_hidden_state"] = ref["hidden_states"][-1]
  return ref


def _train_tokenizers(out: str) -> dict[str, str]:
  """Trains the byte-level BPE and WordPiece vocabularies; returns their directories."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  bpe_dir, wp_dir = os.path.join(out, "_bpe"), os.path.join(out, "_wordpiece")
  os.makedirs(bpe_dir, exist_ok=True)
  os.makedirs(wp_dir, exist_ok=True)
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=2,
                          special_tokens=["<|endoftext|>"])
  bpe.save_model(bpe_dir)
  wp = tokenizers.BertWordPieceTokenizer(lowercase=True)
  wp.train_from_iterator(CORPUS, vocab_size=160, min_frequency=1,
                         special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  wp.save_model(wp_dir)
  return {"gpt2": bpe_dir, "bert": wp_dir}


def _tokenizer_files(family: str, src: str, dst: str) -> tuple[int, int | None]:
  """Copies the vocabulary files into ``dst``; returns the vocabulary size and the
  ``<|endoftext|>`` id (GPT-2's BOS / EOS)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  names = ("vocab.json", "merges.txt") if family == "gpt2" else ("vocab.txt",)
  for name in names:
    shutil.copy(os.path.join(src, name), os.path.join(dst, name))
  if family == "gpt2":
    tok = transformers.GPT2Tokenizer(os.path.join(dst, "vocab.json"),
                                     os.path.join(dst, "merges.txt"))
  else:
    tok = transformers.BertTokenizer(os.path.join(dst, "vocab.txt"), do_lower_case=True)
  tok.save_pretrained(dst)
  ids = {text: tok.encode(text, add_special_tokens=False) for text in TOKENIZER_TEXTS}
  with open(os.path.join(dst, "reference_tokens.json"), "w", encoding="utf-8") as f:
    json.dump(ids, f, indent=1, ensure_ascii=False)
  eot = tok.convert_tokens_to_ids("<|endoftext|>") if family == "gpt2" else None
  return len(tok), eot


def make(name: str, out: str, vocab_dirs: dict[str, str]) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  family, cls_name, kwargs = FIXTURES[name]
  directory = os.path.join(out, name)
  os.makedirs(directory, exist_ok=True)
  kwargs = {**WIDTH[family], **kwargs}
  if "vocab_size" not in kwargs and family in vocab_dirs:
    kwargs["vocab_size"], eot = _tokenizer_files(family, vocab_dirs[family], directory)
    if eot is not None:
      kwargs.update(bos_token_id=eot, eos_token_id=eot)
  config_cls = getattr(transformers, {"gpt2": "GPT2Config", "bert": "BertConfig",
                                      "distilbert": "DistilBertConfig",
                                      "vit": "ViTConfig"}[family])
  torch.manual_seed(sum(map(ord, name)))
  model = getattr(transformers, cls_name)(config_cls(**kwargs)).eval()
  with torch.no_grad():  # non-trivial LayerNorm and bias values (init gives 1 / 0)
    for pname, p in model.named_parameters():
      if "LayerNorm" in pname or "ln_" in pname or "layer_norm" in pname or (
          pname.endswith("bias")):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  np.savez_compressed(os.path.join(directory, "reference.npz"),
                      **reference_outputs(directory, family))


def main(out: str = DEFAULT_OUT) -> None:
  import safetensors  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  vocab_dirs = _train_tokenizers(out)
  for name in FIXTURES:
    make(name, out, vocab_dirs)
  for d in vocab_dirs.values():
    shutil.rmtree(d)
  versions = {"torch": torch.__version__, "transformers": transformers.__version__,
              "tokenizers": tokenizers.__version__,
              "safetensors": safetensors.__version__, "numpy": np.__version__,
              "python": sys.version.split()[0],
              "made_by": "tests/pretrained/make_fixtures.py"}
  with open(os.path.join(out, "VERSIONS.json"), "w", encoding="utf-8") as f:
    json.dump(versions, f, indent=1)
  print(json.dumps(versions))


if __name__ == "__main__":
  main(*sys.argv[1:])
