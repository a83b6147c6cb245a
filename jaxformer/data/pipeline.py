"""grain input pipelines: language modelling, classification, seq2seq, images.

All pipelines start from a random-access source (``__len__``, ``__getitem__ -> dict``;
``tfds.data_source``, :mod:`jaxformer.data.embedded`, :mod:`jaxformer.data.sources`)
and return a grain ``DatasetIterator`` of dicts of numpy arrays with ``get_state()`` /
``set_state()`` (plain JSON-serialisable dicts: store them with the checkpoint).

Common arguments: ``seed`` fixes the shuffle (a different permutation every epoch);
``shard_index``/``shard_count`` give each process its own disjoint part of the source
(``source[shard_index::shard_count]``, before shuffling); ``num_epochs=None`` repeats
forever; ``prefetch > 0`` produces that many batches ahead in a background thread
(the state still describes exactly the batches handed out).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import grain
import numpy as np

from jaxformer.data import packing
from jaxformer.data import tokenizers as tok_lib


def _check_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < minimum):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def _check_common(source, *, batch_size: int, seed: int, shard_index: int,
                  shard_count: int, num_epochs: int | None, prefetch: int) -> None:
  if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
    raise TypeError("source must be random access (__len__ and __getitem__), got "
                    f"{type(source).__name__}.")
  _check_int("batch_size", batch_size, 1)
  _check_int("seed", seed, 0)
  _check_int("shard_count", shard_count, 1)
  if not isinstance(shard_index, (int, np.integer)) or not (
      0 <= shard_index < shard_count):
    raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got "
                     f"{shard_index!r}.")
  if num_epochs is not None:
    _check_int("num_epochs", num_epochs, 1)
  _check_int("prefetch", prefetch, 0)
  if len(source) < shard_count:
    raise ValueError(f"source has {len(source)} records, fewer than shard_count="
                     f"{shard_count}.")


def _records(source, *, seed: int, shard_index: int, shard_count: int,
             num_epochs: int | None, shuffle: bool) -> grain.MapDataset:
  """The shard of ``source``, shuffled per epoch and repeated."""
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(num_epochs)


def _finish(ds: grain.IterDataset, prefetch: int) -> grain.DatasetIterator:
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=prefetch)
  return iter(ds)


def _get(record: dict[str, Any], key: str, argument: str) -> Any:
  try:
    return record[key]
  except KeyError:
    raise ValueError(f"{argument}={key!r} is not a feature of the source; records "
                     f"have {sorted(record)}.") from None


# --- language modelling ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizeDocument:
  """``record -> int32 [BOS, tokens..., EOS]`` (a picklable grain map)."""

  tokenizer: tok_lib.Tokenizer
  text_key: str = "text"

  def __call__(self, record: dict[str, Any]) -> np.ndarray:
    ids = self.tokenizer.encode_array(_get(record, self.text_key, "text_key"))
    tok_lib.check_ids(ids, self.tokenizer.vocab_size, "token ids of a document")
    out = np.empty(len(ids) + 2, np.int32)
    out[0], out[1:-1], out[-1] = self.tokenizer.bos_id, ids, self.tokenizer.eos_id
    return out


def lm_dataset(source, tokenizer: tok_lib.Tokenizer, *, seq_len: int,
               batch_size: int, seed: int, shard_index: int = 0,
               shard_count: int = 1, pack: bool = True,
               num_epochs: int | None = None, text_key: str = "text",
               shuffle: bool = True, streams: int | None = None,
               drop_remainder: bool = False) -> grain.IterDataset:
  """The grain dataset behind :func:`lm_pipeline` (same arguments, no prefetch)."""
  _check_common(source, batch_size=batch_size, seed=seed, shard_index=shard_index,
                shard_count=shard_count, num_epochs=num_epochs, prefetch=0)
  _check_int("seq_len", seq_len, 1)
  if not isinstance(tokenizer, tok_lib.Tokenizer):
    raise TypeError(f"tokenizer must be a jaxformer Tokenizer, got "
                    f"{type(tokenizer).__name__}.")
  if streams is None:
    streams = batch_size if num_epochs is None else 1
  docs = _records(source, seed=seed, shard_index=shard_index,
                  shard_count=shard_count, num_epochs=num_epochs, shuffle=shuffle)
  docs = docs.map(TokenizeDocument(tokenizer, text_key))
  return packing.PackedLMDataset(
      docs, seq_len=seq_len, batch_size=batch_size, pad_id=tokenizer.pad_id,
      pack=pack, streams=streams, drop_remainder=drop_remainder,
      source_name=repr(source))


def lm_pipeline(source, tokenizer: tok_lib.Tokenizer, *, seq_len: int,
                batch_size: int, seed: int, shard_index: int = 0,
                shard_count: int = 1, pack: bool = True,
                num_epochs: int | None = None, text_key: str = "text",
                shuffle: bool = True, streams: int | None = None,
                drop_remainder: bool = False,
                prefetch: int = 0) -> grain.DatasetIterator:
  """Packed language-modelling batches (layout: :mod:`jaxformer.data.packing`).

  Args:
    source: random-access records with a text feature (str or UTF-8 bytes).
    tokenizer: a :class:`~jaxformer.data.tokenizers.Tokenizer`.
    seq_len: tokens per row ``L``.
    batch_size: rows per batch ``B`` (per process).
    seed: shuffle seed.
    shard_index: this process's shard, in ``[0, shard_count)``.
    shard_count: number of shards (processes).
    pack: several documents per row (with segment ids) or one chunk per row.
    num_epochs: passes over the shard; None = forever.
    text_key: the record feature holding the text.
    shuffle: shuffle documents (per epoch).
    streams: independent document streams the rows are filled from (see
      :mod:`~jaxformer.data.packing`); default ``batch_size`` when ``num_epochs`` is
      None (every row of a batch from another document) and 1 otherwise (dense).
    drop_remainder: drop a last batch with empty rows (finite ``num_epochs``).
    prefetch: batches to produce ahead in a background thread (0 = none).

  Returns:
    An iterator of dicts of numpy arrays::

      inputs      int32   [B, L]  token ids
      targets     int32   [B, L]  next-token ids (EOS ends every document)
      segment_ids int32   [B, L]  document (chunk) id within the row, 1..; 0 = padding
      positions   int32   [B, L]  position within the segment, from 0
      weights     float32 [B, L]  1.0 where the target counts in the loss
  """
  _check_int("prefetch", prefetch, 0)
  ds = lm_dataset(source, tokenizer, seq_len=seq_len, batch_size=batch_size,
                  seed=seed, shard_index=shard_index, shard_count=shard_count,
                  pack=pack, num_epochs=num_epochs, text_key=text_key,
                  shuffle=shuffle, streams=streams, drop_remainder=drop_remainder)
  return _finish(ds, prefetch)


# --- fixed-size examples: classification, seq2seq, images ------------------------------


def _pad_ids(ids: np.ndarray, length: int, pad_id: int) -> np.ndarray:
  out = np.full(length, pad_id, np.int32)
  out[:len(ids)] = ids[:length]
  return out


@dataclasses.dataclass(frozen=True)
class StackAndPad:
  """grain batch_fn: stacks examples, pads a short last batch with zero rows.

  Adds ``weights`` float32 ``[B]``: 1.0 for real examples, 0.0 for padding rows, so
  every batch has the same shape (no recompilation on the last eval batch).
  """

  batch_size: int

  def __call__(self, examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    n = len(examples)
    batch = {}
    for key in examples[0]:
      first = examples[0][key]
      out = np.zeros((self.batch_size, *np.shape(first)), np.asarray(first).dtype)
      for i, ex in enumerate(examples):
        out[i] = ex[key]
      batch[key] = out
    weights = np.zeros(self.batch_size, np.float32)
    weights[:n] = 1.0
    batch["weights" if "weights" not in batch else "example_weights"] = weights
    return batch


def example_pipeline(source, transform: Callable[[dict[str, Any]], dict[str, Any]]
                     | None = None, *, batch_size: int, seed: int,
                     shard_index: int = 0, shard_count: int = 1,
                     num_epochs: int | None = None, shuffle: bool = True,
                     drop_remainder: bool = False,
                     prefetch: int = 0) -> grain.DatasetIterator:
  """Batches of fixed-shape examples: ``transform(record)`` stacked along axis 0.

  Adds ``weights`` ``[B]`` (``example_weights`` if the examples have ``weights``):
  1.0 for real examples, 0.0 for rows padding a short last batch. The other pipelines
  below are this with a specific ``transform``; use it directly for sources whose
  records are already arrays (e.g. :class:`jaxformer.data.nsp_pairs.NSPSource`).
  """
  _check_common(source, batch_size=batch_size, seed=seed, shard_index=shard_index,
                shard_count=shard_count, num_epochs=num_epochs, prefetch=prefetch)
  ds = _records(source, seed=seed, shard_index=shard_index, shard_count=shard_count,
                num_epochs=num_epochs, shuffle=shuffle)
  if transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                               batch_fn=StackAndPad(batch_size))
  return _finish(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), prefetch)


@dataclasses.dataclass(frozen=True)
class EncodeClassification:
  """``record -> {"inputs", "inputs_mask", "labels"}``: ``[CLS] text [SEP]`` (add_cls).

  With ``add_cls`` the text is cut to ``seq_len - 2`` tokens and framed as BERT's
  tokenizer does and as the masked-LM pre-training (``[CLS] a [SEP] b [SEP]``) sees
  it; without, the bare tokens cut to ``seq_len``.
  """

  tokenizer: tok_lib.Tokenizer
  seq_len: int
  text_key: str
  label_key: str
  add_cls: bool

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode_array(_get(record, self.text_key, "text_key"))
    tok_lib.check_ids(ids, self.tokenizer.vocab_size, "token ids of a text")
    if self.add_cls:
      tok = self.tokenizer
      ids = np.concatenate([np.asarray([tok.cls_id], np.int32),
                            ids[:max(self.seq_len - 2, 0)],
                            np.asarray([tok.sep_id], np.int32)])
    ids = ids[:self.seq_len]
    mask = np.zeros(self.seq_len, bool)
    mask[:len(ids)] = True
    return {"inputs": _pad_ids(ids, self.seq_len, self.tokenizer.pad_id),
            "inputs_mask": mask,
            "labels": np.int32(_get(record, self.label_key, "label_key"))}


def classification_pipeline(source, tokenizer: tok_lib.Tokenizer, *, seq_len: int,
                            batch_size: int, seed: int, shard_index: int = 0,
                            shard_count: int = 1, num_epochs: int | None = None,
                            text_key: str = "text", label_key: str = "label",
                            add_cls: bool = True, shuffle: bool = True,
                            drop_remainder: bool = False,
                            prefetch: int = 0) -> grain.DatasetIterator:
  """Text classification batches (e.g. ``imdb_reviews``).

  Each text is tokenized, framed as ``[CLS] text [SEP]`` (``add_cls``; the text cut
  so that both fit in ``seq_len``) and padded with ``[PAD]``. Common arguments: see
  the module docstring.

  Returns:
    An iterator of dicts::

      inputs       int32   [B, L]  token ids
      inputs_mask  bool    [B, L]  True on real tokens, False on padding
      labels       int32   [B]     class ids
      weights      float32 [B]     1.0 for real examples, 0.0 for rows padding a
                                   short last batch
  """
  _check_int("seq_len", seq_len, 1)
  transform = EncodeClassification(tokenizer, seq_len, text_key, label_key, add_cls)
  return example_pipeline(source, transform, batch_size=batch_size, seed=seed,
                           shard_index=shard_index, shard_count=shard_count,
                           num_epochs=num_epochs, shuffle=shuffle,
                           drop_remainder=drop_remainder, prefetch=prefetch)


@dataclasses.dataclass(frozen=True)
class EncodeSeq2Seq:
  """``record -> {"inputs", "inputs_mask", "decoder_inputs", "targets", "weights"}``."""

  tokenizer: tok_lib.Tokenizer
  source_len: int
  target_len: int
  source_key: str
  target_key: str

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    src = tok.encode_array(_get(record, self.source_key, "source_key"))
    tgt = tok.encode_array(_get(record, self.target_key, "target_key"))
    for ids in (src, tgt):
      tok_lib.check_ids(ids, tok.vocab_size, "token ids of a text")
    eos = np.asarray([tok.eos_id], np.int32)
    src = np.concatenate([src[:self.source_len - 1], eos])
    tgt = np.concatenate([tgt[:self.target_len - 1], eos])
    targets = _pad_ids(tgt, self.target_len, tok.pad_id)
    decoder_inputs = np.full(self.target_len, tok.pad_id, np.int32)
    decoder_inputs[0] = tok.bos_id
    decoder_inputs[1:len(tgt)] = tgt[:-1]
    mask = np.zeros(self.source_len, bool)
    mask[:len(src)] = True
    weights = np.zeros(self.target_len, np.float32)
    weights[:len(tgt)] = 1.0
    return {"inputs": _pad_ids(src, self.source_len, tok.pad_id), "inputs_mask": mask,
            "decoder_inputs": decoder_inputs, "targets": targets, "weights": weights}


def seq2seq_pipeline(source, tokenizer: tok_lib.Tokenizer, *, source_len: int,
                     target_len: int, batch_size: int, seed: int,
                     source_key: str = "source", target_key: str = "target",
                     shard_index: int = 0, shard_count: int = 1,
                     num_epochs: int | None = None, shuffle: bool = True,
                     drop_remainder: bool = False,
                     prefetch: int = 0) -> grain.DatasetIterator:
  """Source/target pairs (``reversal``; ``wmt14_translate/de-en`` with keys de/en).

  Both sides are tokenized with ``tokenizer``, truncated so that ``EOS`` fits and
  padded with ``[PAD]``; the decoder input is the target shifted right behind
  ``[BOS]`` (teacher forcing). Common arguments: see the module docstring.

  Returns:
    An iterator of dicts::

      inputs          int32   [B, Ls]  source ids, EOS, then PAD
      inputs_mask     bool    [B, Ls]  True on real source tokens
      decoder_inputs  int32   [B, Lt]  BOS, target ids (without the last), PAD
      targets         int32   [B, Lt]  target ids, EOS, then PAD
      weights         float32 [B, Lt]  1.0 on real target tokens (0 on padding rows)
      example_weights float32 [B]      1.0 for real examples, 0.0 for padding rows
  """
  _check_int("source_len", source_len, 1)
  _check_int("target_len", target_len, 1)
  transform = EncodeSeq2Seq(tokenizer, source_len, target_len, source_key, target_key)
  return example_pipeline(source, transform, batch_size=batch_size, seed=seed,
                           shard_index=shard_index, shard_count=shard_count,
                           num_epochs=num_epochs, shuffle=shuffle,
                           drop_remainder=drop_remainder, prefetch=prefetch)


@dataclasses.dataclass(frozen=True)
class NormalizeImage:
  """``record -> {"image": float32 (x / 255 - mean) / std, "labels": int32}``."""

  mean: tuple[float, ...]
  std: tuple[float, ...]
  image_key: str
  label_key: str

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(_get(record, self.image_key, "image_key"))
    if image.ndim == 2:
      image = image[..., None]
    image = image.astype(np.float32) / np.float32(255.0)
    image = (image - np.asarray(self.mean, np.float32)) / np.asarray(self.std,
                                                                      np.float32)
    return {"image": image,
            "labels": np.int32(_get(record, self.label_key, "label_key"))}


def image_pipeline(source, *, batch_size: int, seed: int,
                   mean: float | tuple[float, ...] = 0.5,
                   std: float | tuple[float, ...] = 0.5, image_key: str = "image",
                   label_key: str = "label", shard_index: int = 0,
                   shard_count: int = 1, num_epochs: int | None = None,
                   shuffle: bool = True, drop_remainder: bool = False,
                   prefetch: int = 0) -> grain.DatasetIterator:
  """Image classification batches (``mnist``, ``cifar10``, ``shapes``).

  Pixels are scaled to [0, 1], then normalised per channel: ``(x - mean) / std``
  (scalars, or one value per channel). Common arguments: see the module docstring.

  Returns:
    An iterator of dicts::

      image    float32 [B, H, W, C]  normalised pixels
      labels   int32   [B]           class ids
      weights  float32 [B]           1.0 for real examples, 0.0 for padding rows
  """
  mean_t = tuple(np.atleast_1d(np.asarray(mean, np.float64)).tolist())
  std_t = tuple(np.atleast_1d(np.asarray(std, np.float64)).tolist())
  if any(s <= 0 for s in std_t):
    raise ValueError(f"std must be positive, got {std!r}.")
  transform = NormalizeImage(mean_t, std_t, image_key, label_key)
  return example_pipeline(source, transform, batch_size=batch_size, seed=seed,
                           shard_index=shard_index, shard_count=shard_count,
                           num_epochs=num_epochs, shuffle=shuffle,
                           drop_remainder=drop_remainder, prefetch=prefetch)
