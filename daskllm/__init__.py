"""daskllm: large-language-model inference on a Dask cluster (data, tensor, sequence, expert parallel)."""
from .api import LLM
from .engine.request import RequestOutput
from .parallel.mesh import Mesh

__all__ = ["LLM", "Mesh", "RequestOutput"]
__version__ = "0.1.0"
