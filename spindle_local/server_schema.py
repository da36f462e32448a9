"""Request bodies of the OpenAI-compatible server and its errors, in OpenAI's format.

Bodies are validated from the raw bytes with pydantic in strict JSON mode, so a string
where a number belongs is an error (400), not silently converted. Fields the server does
not use are ignored, as OpenAI clients send many optional ones. No llama.cpp here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error() -> ApiError:
    return ApiError(500, "The server had an error while processing your request; see the server log.",
                    type="server_error", code="internal_error")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """The ``{"role", "content"}`` pair the chat template renders."""
        if isinstance(self.content, list):
            text = "".join(p.text for p in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": clean_text(text)}


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Sampling(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # llama.cpp's extension
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)  # accepted, not applied
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)  # accepted, not applied
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "'stop' takes at most 4 sequences", param="stop", code="invalid_value")
        return tuple(clean_text(s) for s in stops if s)

    def bias(self, n_vocab: int) -> dict[int, float]:
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                tok = int(key)
            except ValueError:
                tok = -1
            if not 0 <= tok < n_vocab:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})",
                               param="logit_bias", code="invalid_value")
            if not -100.0 <= value <= 100.0:
                raise ApiError(400, f"logit_bias: bias {value} for token {tok} is outside [-100, 100]",
                               param="logit_bias", code="invalid_value")
            out[tok] = value
        return out


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def clean_text(text: str) -> str:
    """Replace lone surrogates (valid JSON, invalid UTF-8) so that llama.cpp gets valid text."""
    return text.encode("utf-8", "replace").decode("utf-8")


def parse_body(model: type[_Strict], raw: bytes) -> Any:
    """Validate a request body; any problem becomes a 400 :class:`ApiError` naming the field."""
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise _from_validation(e) from None


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance", "literal"}


def _from_validation(e: ValidationError) -> ApiError:
    errors = e.errors(include_url=False, include_context=False, include_input=False)
    if any(err["type"] == "json_invalid" for err in errors):
        return ApiError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                        code="invalid_json")
    err = errors[0]
    path: list[str] = []
    for item in err["loc"]:
        if isinstance(item, int):
            path.append(f"[{item}]")
            continue
        name = str(item)
        if "[" in name or name.split("-")[0] in _TYPE_NAMES or name in _TYPE_NAMES:
            break  # pydantic's union-member markers, not field names
        path.append(("." if path else "") + name)
    param = "".join(path) or None
    if err["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    where = f"'{param}'" if param else "the request body"
    code = "invalid_type" if err["type"].endswith("_type") or err["type"].endswith("_parsing") else "invalid_value"
    return ApiError(400, f"Invalid value for {where}: {err['msg']}.", param=param, code=code)
