"""Cognica-BP/PoE-v1.0-1.3B-base for vLLM and SGLang: the engine-free core.

`cognica.config` parses config.json, `cognica.checkpoint` validates and reads the weights,
`cognica.tokenizer` converts the pickled tiktoken tokenizer safely, `cognica.model` is the
pure-torch reference, `cognica.factory` writes random checkpoints in the published layout,
`cognica.hub` resolves Hugging Face repo ids. Importing the package registers the Auto classes with transformers.
Nothing here imports an engine.
"""

from cognica.config import ARCHITECTURE, ARCHITECTURE_ALIASES, MODEL_TYPE, CognicaConfig, ConfigError
from cognica.hf import register as _register_with_transformers

# `import cognica` is all a transformers user needs: AutoConfig / AutoModelForCausalLM / AutoTokenizer then load a
# checkpoint directory or Hub id with no trust_remote_code, and the repo's remote code is never imported.
_register_with_transformers()

__version__ = "0.1.0"
__all__ = ["ARCHITECTURE", "ARCHITECTURE_ALIASES", "MODEL_TYPE", "CognicaConfig", "ConfigError", "__version__"]
