"""tokenmill: an LLM inference server on PyTorch."""

from tokenmill.llm import LLM
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics"]
__version__ = "0.1.0"
