"""memgen: MemGen (generative latent memory for LLM agents) for PyTorch, at the cost of vanilla decoding.

The package imports without its compiled core; `memgen.ops.backend()` tells which implementation
each op runs and, when the native library is missing, why.
"""

from memgen import ops
from memgen.config import MemGenConfig
from memgen.delimiters import DEFAULT_DELIMITERS, build_delimiter_table
from memgen.generation_settings import generation_kwargs
from memgen.modeling import MemGenModel, MemGenOutput
from memgen.probing import nearest_tokens

__version__ = "0.1.0"

__all__ = ["DEFAULT_DELIMITERS", "MemGenConfig", "MemGenModel", "MemGenOutput", "build_delimiter_table",
           "generation_kwargs", "nearest_tokens", "ops", "__version__"]
