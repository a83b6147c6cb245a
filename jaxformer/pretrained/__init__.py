"""Hugging Face checkpoints <-> jaxformer models, parameters and tokenizers.

```python
from jaxformer.pretrained import from_huggingface, to_huggingface, load_tokenizer
model, params = from_huggingface("path/to/gpt2")        # config.json + *.safetensors
logits = model.apply({"params": params}, tokens_BL)
tokenizer = load_tokenizer("path/to/gpt2")               # vocab.json + merges.txt
to_huggingface(model.config, params, "out/gpt2")          # GPT-2 and BERT
```
"""

from jaxformer.pretrained.loading import from_huggingface
from jaxformer.pretrained.loading import load_params
from jaxformer.pretrained.loading import spec_of
from jaxformer.pretrained.loading import to_huggingface
from jaxformer.pretrained.tokenizers import load_tokenizer

__all__ = ["from_huggingface", "to_huggingface", "load_params", "spec_of",
           "load_tokenizer"]
