"""The HTTP routes, one module per endpoint family, each with `register(app, ctx)`.

admin (health, models, metrics), tokenize (/tokenize, /detokenize), completions
(/v1/completions), chat (/v1/chat/completions), responses (/v1/responses, OpenAI's Responses API
over chat), embeddings (/v1/embeddings), score (/classify, /score, /rerank: vLLM's), files
(/v1/files) and vector_stores (/v1/vector_stores: OpenAI's, for RAG; server/retrieval.py). A route that
takes a body parses it itself with `ctx.parse` (to answer with OpenAI-style 400s rather than
FastAPI's 422) and declares it with `openapi_extra=body(Model)`; the model goes in BODIES so
the schema has its definition.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    FileBatchRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
    VectorStoreCreateRequest,
    VectorStoreFileRequest,
    VectorStoreFileUpdateRequest,
    VectorStoreSearchRequest,
    VectorStoreUpdateRequest,
)

BODIES: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest,
                                       EmbeddingRequest, ResponsesRequest, ClassifyRequest, ScoreRequest,
                                       RerankRequest, VectorStoreCreateRequest, VectorStoreUpdateRequest,
                                       VectorStoreFileRequest, VectorStoreFileUpdateRequest, FileBatchRequest,
                                       VectorStoreSearchRequest)


def body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses `model` itself (to answer with OpenAI-style
    400s rather than FastAPI's 422), so /docs and schema-driven clients see its fields."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
