from tokenmill.model.loader import load_model
from tokenmill.model.transformer import DecoderLM

__all__ = ["DecoderLM", "load_model"]
