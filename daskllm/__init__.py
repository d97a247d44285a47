"""daskllm: large-language-model inference on a Dask cluster (data, tensor, sequence, expert parallel)."""
from .parallel.mesh import Mesh

__all__ = ["LLM", "Mesh", "RequestOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    # The API pulls in Dask; the model and strategies do not, so import it only when asked for.
    if name == "LLM":
        from .api import LLM
        return LLM
    if name == "RequestOutput":
        from .engine.request import RequestOutput
        return RequestOutput
    raise AttributeError(f"module 'daskllm' has no attribute {name!r}")
