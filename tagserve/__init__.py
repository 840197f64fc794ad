"""tagserve: a fast engine and vLLM-compatible server for transformer token classification."""

from tagserve.config import PoolerConfig
from tagserve.llm import LLM
from tagserve.outputs import PoolingOutput, PoolingRequestOutput
from tagserve.params import PoolingParams

__version__ = "0.1.0"
__all__ = ["LLM", "PoolerConfig", "PoolingOutput", "PoolingParams", "PoolingRequestOutput",
           "__version__"]
