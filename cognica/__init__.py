"""Cognica-BP/PoE-v1.0-1.3B-base for vLLM and SGLang: the engine-free core.

`cognica.config` parses config.json, `cognica.checkpoint` validates and reads the weights,
`cognica.tokenizer` converts the pickled tiktoken tokenizer safely, `cognica.model` is the
pure-torch reference, `cognica.factory` writes random checkpoints in the published layout.
Nothing here imports an engine.
"""

from cognica.config import ARCHITECTURE, ARCHITECTURE_ALIASES, MODEL_TYPE, CognicaConfig, ConfigError

__version__ = "0.1.0"
__all__ = ["ARCHITECTURE", "ARCHITECTURE_ALIASES", "MODEL_TYPE", "CognicaConfig", "ConfigError", "__version__"]
