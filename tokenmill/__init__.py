"""tokenmill: an LLM inference server on PyTorch."""

from tokenmill.inputs import TextPrompt, TokensPrompt
from tokenmill.llm import LLM
from tokenmill.outputs import (
    ClassificationRequestOutput,
    CompletionOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    ScoringRequestOutput,
)
from tokenmill.sampling_params import BeamSearchParams, SamplingParams

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestMetrics", "EmbeddingRequestOutput", "ClassificationRequestOutput", "ScoringRequestOutput",
           "TextPrompt", "TokensPrompt"]
__version__ = "0.1.0"
