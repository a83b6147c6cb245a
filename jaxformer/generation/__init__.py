"""Generation: sampling, KV-cache decoding, beam search, prompting, evaluation metrics.

```python
from jaxformer.generation import generate, generate_seq2seq, PromptClassifier
tokens_BT, lengths_B = generate(GPT(cfg), params, prompt_BL, max_new_tokens=64,
                                rng=key, temperature=0.8, top_p=0.95,
                                eos_id=tok.eos_id, pad_id=tok.pad_id,
                                prompt_lengths=lengths_B)      # right-padded prompts
```
Modules: ``sampling`` (logits processors, ``sample_token``), ``decode`` (the cached
sampling loop, ``generate``), ``seq2seq`` (``generate_seq2seq``), ``beam_search``,
``prompting`` (``PromptClassifier``), ``metrics`` (log-probs, perplexity, bits per byte,
BLEU).
"""

from jaxformer.generation.beam_search import beam_search_seq2seq
from jaxformer.generation.decode import generate, sample_loop
from jaxformer.generation.metrics import (bits_per_byte, bleu, perplexity,
                                          sequence_log_probs, token_log_probs)
from jaxformer.generation.prompting import PromptClassifier
from jaxformer.generation.sampling import (apply_temperature, greedy, process_logits,
                                           sample_token, top_k_filter, top_p_filter)
from jaxformer.generation.seq2seq import generate_seq2seq

__all__ = [
    "PromptClassifier",
    "apply_temperature",
    "beam_search_seq2seq",
    "bits_per_byte",
    "bleu",
    "generate",
    "generate_seq2seq",
    "greedy",
    "perplexity",
    "process_logits",
    "sample_loop",
    "sample_token",
    "sequence_log_probs",
    "token_log_probs",
    "top_k_filter",
    "top_p_filter",
]
