"""grain input pipelines: language modelling, classification, seq2seq, images.

A pipeline is a per-record transform (:class:`TokenizeDocument`,
:class:`EncodeClassification`, :class:`EncodeSeq2Seq`, :class:`NormalizeImage`, or
records that are already examples) applied by one of two readers with one
:class:`ReadOptions` value: :func:`read` stacks fixed-shape examples into batches,
:func:`read_lm` packs tokenized documents into rows. Each reader starts from a
random-access source (``__len__``, ``__getitem__ -> dict``; ``tfds.data_source``,
:mod:`jaxformer.data.embedded`, :mod:`jaxformer.data.sources`) and returns a grain
``DatasetIterator`` of dicts of numpy arrays with ``get_state()`` / ``set_state()``
(plain JSON-serialisable dicts: store them with the checkpoint). The
``*_pipeline`` functions are the same with the transform's and the read options'
arguments side by side.

Read options: ``seed`` fixes the shuffle (a different permutation every epoch);
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadOptions:
  """How a reader walks its source (see the module docstring).

  Attributes:
    batch_size: rows per batch (per process).
    seed: shuffle seed.
    shard_index: this process's shard, in ``[0, shard_count)``.
    shard_count: number of shards (processes).
    num_epochs: passes over the shard; None = forever.
    shuffle: shuffle records (per epoch).
    drop_remainder: drop a last, short batch (finite ``num_epochs``).
    prefetch: batches to produce ahead in a background thread (0 = none).
  """

  batch_size: int
  seed: int = 0
  shard_index: int = 0
  shard_count: int = 1
  num_epochs: int | None = None
  shuffle: bool = True
  drop_remainder: bool = False
  prefetch: int = 0

  def __post_init__(self):
    _check_int("batch_size", self.batch_size, 1)
    _check_int("seed", self.seed, 0)
    _check_int("shard_count", self.shard_count, 1)
    if not isinstance(self.shard_index, (int, np.integer)) or not (
        0 <= self.shard_index < self.shard_count):
      raise ValueError(f"shard_index must be in [0, shard_count={self.shard_count}), "
                       f"got {self.shard_index!r}.")
    if self.num_epochs is not None:
      _check_int("num_epochs", self.num_epochs, 1)
    _check_int("prefetch", self.prefetch, 0)

  def records(self, source) -> grain.MapDataset:
    """This shard of ``source``, shuffled per epoch and repeated."""
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
      raise TypeError("source must be random access (__len__ and __getitem__), got "
                      f"{type(source).__name__}.")
    if len(source) < self.shard_count:
      raise ValueError(f"source has {len(source)} records, fewer than shard_count="
                       f"{self.shard_count}.")
    ds = grain.MapDataset.source(source)[self.shard_index::self.shard_count]
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed)
    return ds.repeat(self.num_epochs)

  def finish(self, ds: grain.IterDataset) -> grain.DatasetIterator:
    """The iterator of ``ds``, with ``prefetch`` batches produced ahead."""
    if self.prefetch:
      ds = grain.experimental.ThreadPrefetchIterDataset(
          ds, prefetch_buffer_size=self.prefetch)
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


def lm_dataset(source, tokenizer: tok_lib.Tokenizer, options: ReadOptions, *,
               seq_len: int, pack: bool = True, text_key: str = "text",
               streams: int | None = None) -> grain.IterDataset:
  """The grain dataset behind :func:`read_lm` (``options.prefetch`` is not applied)."""
  _check_int("seq_len", seq_len, 1)
  if not isinstance(tokenizer, tok_lib.Tokenizer):
    raise TypeError(f"tokenizer must be a jaxformer Tokenizer, got "
                    f"{type(tokenizer).__name__}.")
  if streams is None:
    streams = options.batch_size if options.num_epochs is None else 1
  docs = options.records(source).map(TokenizeDocument(tokenizer, text_key))
  return packing.PackedLMDataset(
      docs, seq_len=seq_len, batch_size=options.batch_size, pad_id=tokenizer.pad_id,
      pack=pack, streams=streams, drop_remainder=options.drop_remainder,
      source_name=repr(source))


def read_lm(source, tokenizer: tok_lib.Tokenizer, options: ReadOptions, *,
            seq_len: int, pack: bool = True, text_key: str = "text",
            streams: int | None = None) -> grain.DatasetIterator:
  """Packed language-modelling batches (layout: :mod:`jaxformer.data.packing`).

  Args:
    source: random-access records with a text feature (str or UTF-8 bytes).
    tokenizer: a :class:`~jaxformer.data.tokenizers.Tokenizer`.
    options: how the source is read (``batch_size`` rows ``B`` per batch, ...).
    seq_len: tokens per row ``L``.
    pack: several documents per row (with segment ids) or one chunk per row.
    text_key: the record feature holding the text.
    streams: independent document streams the rows are filled from (see
      :mod:`~jaxformer.data.packing`); default ``batch_size`` when ``num_epochs`` is
      None (every row of a batch from another document) and 1 otherwise (dense).

  Returns:
    An iterator of dicts of numpy arrays::

      inputs      int32   [B, L]  token ids
      targets     int32   [B, L]  next-token ids (EOS ends every document)
      segment_ids int32   [B, L]  document (chunk) id within the row, 1..; 0 = padding
      positions   int32   [B, L]  position within the segment, from 0
      weights     float32 [B, L]  1.0 where the target counts in the loss
  """
  return options.finish(lm_dataset(source, tokenizer, options, seq_len=seq_len,
                                   pack=pack, text_key=text_key, streams=streams))


def lm_pipeline(source, tokenizer: tok_lib.Tokenizer, *, seq_len: int,
                pack: bool = True, text_key: str = "text", streams: int | None = None,
                **read: Any) -> grain.DatasetIterator:
  """:func:`read_lm` with the :class:`ReadOptions` fields as keyword arguments."""
  return read_lm(source, tokenizer, ReadOptions(**read), seq_len=seq_len, pack=pack,
                 text_key=text_key, streams=streams)


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


def read(source, transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
         options: ReadOptions) -> grain.DatasetIterator:
  """Batches of fixed-shape examples: ``transform(record)`` stacked along axis 0.

  Adds ``weights`` ``[B]`` (``example_weights`` if the examples have ``weights``):
  1.0 for real examples, 0.0 for rows padding a short last batch. ``transform=None``
  reads sources whose records are already examples (e.g.
  :class:`jaxformer.data.nsp_pairs.NSPSource`).
  """
  ds = options.records(source)
  if transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(options.batch_size, drop_remainder=options.drop_remainder,
                batch_fn=StackAndPad(options.batch_size))
  return options.finish(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def example_pipeline(source, transform: Callable[[dict[str, Any]], dict[str, Any]]
                     | None = None, **read_options: Any) -> grain.DatasetIterator:
  """:func:`read` with the :class:`ReadOptions` fields as keyword arguments."""
  return read(source, transform, ReadOptions(**read_options))


@dataclasses.dataclass(frozen=True)
class EncodeClassification:
  """``record -> {"inputs", "inputs_mask", "labels"}``: ``[CLS] text [SEP]`` (add_cls).

  With ``add_cls`` the text is cut to ``seq_len - 2`` tokens and framed as BERT's
  tokenizer does and as the masked-LM pre-training (``[CLS] a [SEP] b [SEP]``) sees
  it; without, the bare tokens cut to ``seq_len``.
  """

  tokenizer: tok_lib.Tokenizer
  seq_len: int
  text_key: str = "text"
  label_key: str = "label"
  add_cls: bool = True

  def __post_init__(self):
    _check_int("seq_len", self.seq_len, 1)

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
                            text_key: str = "text", label_key: str = "label",
                            add_cls: bool = True,
                            **read_options: Any) -> grain.DatasetIterator:
  """Text classification batches (e.g. ``imdb_reviews``): :func:`read` of
  :class:`EncodeClassification` with the :class:`ReadOptions` fields as keywords.

  Each text is tokenized, framed as ``[CLS] text [SEP]`` (``add_cls``; the text cut
  so that both fit in ``seq_len``) and padded with ``[PAD]``.

  Returns:
    An iterator of dicts::

      inputs       int32   [B, L]  token ids
      inputs_mask  bool    [B, L]  True on real tokens, False on padding
      labels       int32   [B]     class ids
      weights      float32 [B]     1.0 for real examples, 0.0 for rows padding a
                                   short last batch
  """
  return read(source, EncodeClassification(tokenizer, seq_len, text_key, label_key,
                                           add_cls), ReadOptions(**read_options))


@dataclasses.dataclass(frozen=True)
class EncodeSeq2Seq:
  """``record -> {"inputs", "inputs_mask", "decoder_inputs", "targets", "weights"}``."""

  tokenizer: tok_lib.Tokenizer
  source_len: int
  target_len: int
  source_key: str = "source"
  target_key: str = "target"

  def __post_init__(self):
    _check_int("source_len", self.source_len, 1)
    _check_int("target_len", self.target_len, 1)

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
                     target_len: int, source_key: str = "source",
                     target_key: str = "target",
                     **read_options: Any) -> grain.DatasetIterator:
  """Source/target pairs (``reversal``; ``wmt14_translate/de-en`` with keys de/en):
  :func:`read` of :class:`EncodeSeq2Seq` with the :class:`ReadOptions` fields as
  keywords.

  Both sides are tokenized with ``tokenizer``, truncated so that ``EOS`` fits and
  padded with ``[PAD]``; the decoder input is the target shifted right behind
  ``[BOS]`` (teacher forcing).

  Returns:
    An iterator of dicts::

      inputs          int32   [B, Ls]  source ids, EOS, then PAD
      inputs_mask     bool    [B, Ls]  True on real source tokens
      decoder_inputs  int32   [B, Lt]  BOS, target ids (without the last), PAD
      targets         int32   [B, Lt]  target ids, EOS, then PAD
      weights         float32 [B, Lt]  1.0 on real target tokens (0 on padding rows)
      example_weights float32 [B]      1.0 for real examples, 0.0 for padding rows
  """
  return read(source, EncodeSeq2Seq(tokenizer, source_len, target_len, source_key,
                                    target_key), ReadOptions(**read_options))


@dataclasses.dataclass(frozen=True)
class NormalizeImage:
  """``record -> {"image": float32 (x / 255 - mean) / std, "labels": int32}``."""

  mean: tuple[float, ...]
  std: tuple[float, ...]
  image_key: str
  label_key: str

  @classmethod
  def of(cls, mean: float | tuple[float, ...], std: float | tuple[float, ...],
         image_key: str = "image", label_key: str = "label") -> NormalizeImage:
    """Pixels scaled to [0, 1], then ``(x - mean) / std`` per channel (scalars, or one
    value per channel)."""
    mean_t = tuple(np.atleast_1d(np.asarray(mean, np.float64)).tolist())
    std_t = tuple(np.atleast_1d(np.asarray(std, np.float64)).tolist())
    if any(s <= 0 for s in std_t):
      raise ValueError(f"std must be positive, got {std!r}.")
    return cls(mean_t, std_t, image_key, label_key)

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(_get(record, self.image_key, "image_key"))
    if image.ndim == 2:
      image = image[..., None]
    image = image.astype(np.float32) / np.float32(255.0)
    image = (image - np.asarray(self.mean, np.float32)) / np.asarray(self.std,
                                                                      np.float32)
    return {"image": image,
            "labels": np.int32(_get(record, self.label_key, "label_key"))}


def image_pipeline(source, *, mean: float | tuple[float, ...] = 0.5,
                   std: float | tuple[float, ...] = 0.5, image_key: str = "image",
                   label_key: str = "label",
                   **read_options: Any) -> grain.DatasetIterator:
  """Image classification batches (``mnist``, ``cifar10``, ``shapes``): :func:`read`
  of :class:`NormalizeImage` with the :class:`ReadOptions` fields as keywords.

  Returns:
    An iterator of dicts::

      image    float32 [B, H, W, C]  normalised pixels
      labels   int32   [B]           class ids
      weights  float32 [B]           1.0 for real examples, 0.0 for padding rows
  """
  return read(source, NormalizeImage.of(mean, std, image_key, label_key),
              ReadOptions(**read_options))
