"""From engine outputs to responses: Server-Sent Events, the per-choice stream state, the
disconnect watcher for non-streamed requests, and the pieces every response shares (finish
reason, usage, top logprobs, a token's raw bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from tokenmill.engine.detokenizer import BYTE_TO_UNICODE, safe_stream_end
from tokenmill.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.async_engine import AsyncEngine


class ReleasingIterator:
    """A response body that calls release once it has ended: its last event sent, an error, the
    client gone (cancelled), closed, or dropped unstarted (a generator never started would skip
    its finally: hence a class, whose __del__ releases too)."""

    def __init__(self, inner: Any, release: Callable[[], None]) -> None:
        self._inner, self._release = inner, release

    def __aiter__(self) -> ReleasingIterator:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._inner.__anext__()
        except BaseException:  # StopAsyncIteration included: the stream is over
            self._release()
            raise

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._inner, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._release()

    def __del__(self) -> None:
        self._release()


async def wait_for_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Runs work; if the client disconnects first, cancels it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)  # nobody is listening; nginx's "client closed request"


@dataclass
class Delta:
    """What one streamed chunk of a choice carries."""

    text: str
    text_start: int  # where `text` starts in the choice's full text
    tokens: tuple[int, int]  # the [start, end) token range it covers
    finish_reason: str | None
    first: bool  # the choice's first chunk


class ChoiceState:
    """How much of one choice has been streamed."""

    __slots__ = ("text", "tokens", "done")

    def __init__(self) -> None:
        self.text = 0
        self.tokens = 0
        self.done = False

    def advance(self, c: CompletionOutput, params: SamplingParams) -> Delta | None:
        """The next chunk for this choice, or None when there is nothing new. One chunk per step
        with new tokens, even when their text is held back (a partial character, a possible stop
        string): clients time tokens by chunks."""
        if self.done:
            return None
        end = safe_stream_end(c.text, params.stop or [], c.finished(), self.text)
        ntok = len(c.token_ids)
        reason = finish_reason(c)
        if end == self.text and reason is None and ntok == self.tokens:
            return None
        delta = Delta(c.text[self.text:end], self.text, (self.tokens, ntok), reason, self.tokens == 0)
        self.text, self.tokens, self.done = end, ntok, c.finished()
        return delta


class StreamFailed(Exception):
    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def finish_reason(c: CompletionOutput) -> str | None:
    return c.finish_reason if c.finish_reason in ("stop", "length") else None


_BYTE_LEVEL = {c: b for b, c in BYTE_TO_UNICODE.items()}
_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def raw_token_bytes(vocab_str: str) -> bytes:
    """Bytes of a vocabulary string: SentencePiece byte tokens (<0xE2>) or byte-level BPE."""
    m = _HEX_BYTE.match(vocab_str)
    if m:
        return bytes([int(m.group(1), 16)])
    if all(c in _BYTE_LEVEL for c in vocab_str):
        return bytes(_BYTE_LEVEL[c] for c in vocab_str)
    return vocab_str.encode("utf-8")


def top(entry: PositionLogprobs, k: int, sampled: int | None) -> list[tuple[int, Any]]:
    """The k most likely tokens of a position (plus the sampled one when given), best first."""
    items = [(t, lp) for t, lp in entry.items() if lp.rank <= k or t == sampled]
    return sorted(items, key=lambda x: x[1].rank)


async def collect_finished(engine: AsyncEngine, group) -> dict[str, RequestOutput]:
    final: dict[str, RequestOutput] = {}
    async for batch in engine.stream(group):
        for out in batch:
            if out.finished:
                final[out.request_id] = out
    return final


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
          compute: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's usage object, plus `compute` (device seconds, FLOPs, energy, cost and the energy's
    source: tokenmill/ops/energy.py) when the engine accounted for the request."""
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens,
                         "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if compute is not None:
        u["compute"] = compute
    return u


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of a growing text could be the start of marker: what a
    stream holds back so that it never sends a marker's beginning as text."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


SSE_DONE = "data: [DONE]\n\n"  # the last event of every stream, as OpenAI ends them


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_response(events: AsyncIterator[str], release: Callable[[], None]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        # However the stream ends (done, client gone, cancelled), abort what is unfinished now
        # rather than whenever the generator is garbage-collected.
        try:
            async for event in events:
                yield event
        finally:
            release()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
