import os

import openai
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


@pytest.fixture(scope="module")
def client(server):
    """The official openai client for the module's `server` fixture (a ServerProcess)."""
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(model_dir):
    """The served name of the tiny model: its folder's name."""
    return os.path.basename(model_dir)
