import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.models import make_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer."""
    return make_model(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="session")
def llm(model_dir):
    from tokenmill import LLM

    return LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=256, seed=0)
