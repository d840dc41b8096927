"""The wire format: OpenAI's legacy `POST /v1/completions` request (validated with pydantic), its
response and server-sent-event chunks, and its error JSON. Sampling values go through the same
`check_options` as `codegen-jax generate`."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_STOPS = 64


class CompletionRequest(BaseModel):
    """The fields of `/v1/completions` we honour; unknown fields are ignored (as OpenAI's clients may
    send more), known ones of the wrong type are a 400."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] = ""
    suffix: str | None = None
    max_tokens: StrictInt | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: StrictInt = 1
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    stream_options: dict[str, Any] | None = None


class InfillRequest(BaseModel):
    """llama.cpp / TGI-style `/infill`: the code before and after the cursor."""

    model_config = ConfigDict(extra="ignore")

    input_prefix: str = ""
    input_suffix: str = ""
    n_predict: StrictInt = Field(default=64, alias="n_predict")
    temperature: float = 0.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: StrictInt | None = None


class ApiError(Exception):
    """An error the client gets as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def stops(req: CompletionRequest | InfillRequest) -> list[str]:
    """The stop strings of a request: none, one, or a list (at most MAX_STOPS)."""
    if req.stop is None:
        return []
    out = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if len(out) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop strings are supported; got {len(out)}", param="stop")
    return [s for s in out if s]


def unsupported(req: CompletionRequest) -> None:
    """Refuse what we do not implement rather than silently ignoring it."""
    if req.echo:
        raise ApiError(400, "echo=true is not supported", param="echo")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if req.best_of not in (None, req.n):
        raise ApiError(400, "best_of other than n is not supported", param="best_of")
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported (0 only)",
                       param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    if not 1 <= req.n <= 64:
        raise ApiError(400, f"n must be in [1, 64]; got {req.n}", param="n")


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str) -> str:
    """Ours -> OpenAI's: a natural end (EOS) or a stop string is "stop", the budget "length"."""
    return "length" if reason == "length" else "stop"


def response(cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}


def choice(index: int, text: str, reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}


def chunk(cid: str, model: str, index: int, text: str, reason: str | None) -> dict:
    """One server-sent event's payload: a piece of one choice's text (and its end)."""
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice(index, text, reason)]}
