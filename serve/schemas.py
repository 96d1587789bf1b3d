"""OpenAI request bodies as pydantic models: the only place request JSON is validated.

Strict types (a number is not a string, a string is not a number), OpenAI's ranges, unknown
fields ignored (clients send fields we do not use). Responses are plain dicts built by the
handlers in OpenAI's exact shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llama_jax.stopping import MAX_STOP_CHARS

MAX_STOP = 16
MAX_N = 16
MAX_EMBEDDING_INPUTS = 2048


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI's optional fields accept an explicit null, which clients and proxies send.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ContentPart(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ToolCallFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (text parts joined by the template module)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if isinstance(self.content, list):
            out["content"] = [p.model_dump(exclude_none=True) for p in self.content]
        if self.content is None:
            out["content"] = ""
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Body):
    include_usage: bool = False


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(_Body):
    """What chat and legacy completions share: the model, sampling and stopping."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # Extensions (llama.cpp, vLLM)
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_total(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # Matching is linear, but building the matcher is too: bound it per request.
        total = len(stop) if isinstance(stop, str) else sum(len(s) for s in stop or [])
        if total > MAX_STOP_CHARS:
            raise ValueError(f"the stop strings total {total} characters (limit {MAX_STOP_CHARS})")
        return stop

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


class TokenizeRequest(_Body):
    """llama.cpp's `content`, or vLLM's `prompt` or `messages` (exactly one of the three)."""

    model: str | None = None  # default: the first served model
    content: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special: bool = False  # llama.cpp's name: BOS before `content`
    add_special_tokens: bool | None = None  # vLLM's: default true for `prompt`, false for `messages`
    add_generation_prompt: bool = True  # with `messages`
    parse_special: bool = True
    with_pieces: bool = False

    @model_validator(mode="after")
    def _one_text(self) -> TokenizeRequest:
        given = [k for k in ("content", "prompt", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of content, prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: TokenIds


class ApplyTemplateRequest(_Body):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
