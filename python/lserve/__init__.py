"""lserve: long-context LLM serving with unified block-sparse attention.

    >>> from lserve import Engine, SamplingParams
    >>> engine = Engine()  # SmolLM2-135M-Instruct on the CPU
    >>> engine.generate("Hello", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
"""
from lserve.outputs import CompletionOutput, Logprob, RequestOutput
from lserve.sampling import SamplingParams
from lserve.sparsity import SparsityConfig

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams", "SparsityConfig", "RequestOutput", "CompletionOutput", "Logprob", "cmake_prefix_path"]


def __getattr__(name):
    # Engine imports the compiled core; keep `import lserve` light for tools that only need paths.
    if name == "Engine":
        from lserve.engine import Engine

        return Engine
    if name == "cmake_prefix_path":
        import os

        return os.path.join(os.path.dirname(__file__), "lib", "cmake")
    raise AttributeError(f"module 'lserve' has no attribute {name!r}")
