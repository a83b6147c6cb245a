"""Data: tokenizers, random-access sources and grain pipelines.

The modules are the API (``from jaxformer.data import pipeline``); the most used names
are re-exported here.
"""

from jaxformer.data.config import DataConfig
from jaxformer.data.embedded import stdlib_text_source
from jaxformer.data.pipeline import classification_pipeline
from jaxformer.data.pipeline import example_pipeline
from jaxformer.data.pipeline import image_pipeline
from jaxformer.data.pipeline import lm_pipeline
from jaxformer.data.pipeline import read
from jaxformer.data.pipeline import read_lm
from jaxformer.data.pipeline import ReadOptions
from jaxformer.data.pipeline import seq2seq_pipeline
from jaxformer.data.sources import get_source
from jaxformer.data.sources import text_files_source
from jaxformer.data.sources import tfds_source
from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.data.tokenizers import CharTokenizer
from jaxformer.data.tokenizers import SentencePieceTokenizer
from jaxformer.data.tokenizers import Tokenizer
from jaxformer.data.tokenizers import train_sentencepiece
