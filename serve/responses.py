"""OpenAI response bodies as pydantic models, for the OpenAPI description only.

The handlers build their responses as plain dicts (`serve/handlers/`); these models say what
those dicts look like, so `/openapi.json` documents them and the schema fuzzing tests hold
every response to them. Fields beyond these are allowed (a newer field is not a violation).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None = Field(description="A string or null, never a number (OpenAI's clients parse it).")


class ErrorResponse(BaseModel):
    """Every error leaves the server in this shape, also as the last event of a failed stream."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(ge=0, description="Prompt tokens served from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float = Field(description="Finite: -9999.0 stands for minus infinity.")
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """`POST /v1/chat/completions` without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int = Field(ge=0)
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion. `choices` is empty only in the usage
    chunk (sent, before `[DONE]`, when `stream_options.include_usage` is true)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class Completion(BaseModel):
    """`POST /v1/completions`; streamed, each `data:` event has this shape (without `usage`
    but in the last one, when `stream_options.include_usage` is true)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int = Field(ge=0)
    embedding: list[float] | str = Field(
        description="Floats, or with `encoding_format: base64` the little-endian float32 bytes in base64."
    )


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = Field(None, description="The model's own id when `id` is an alias (vLLM's field).")
    meta: dict[str, object] | None = Field(
        None, description="llama.cpp's extra facts: status, dtype, n_ctx, n_vocab, n_params, n_slots..."
    )


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class HealthCompile(BaseModel):
    compiled: int = Field(ge=0, description="Step shapes compiled, over the loaded models.")
    pending: int = Field(
        ge=0, description="Step shapes still to compile; requests that need one wait for it."
    )
    compiling: list[str] = Field(description='The shapes compiling now, e.g. "prefill T=64 C=0".')


class Health(BaseModel):
    status: Literal["ok", "loading", "error", "shutting_down"]
    models: dict[str, str] | None = Field(None, description="Per model, with more than one model.")
    errors: dict[str, str] | None = Field(None, description="Why each failed model failed.")
    compile: HealthCompile | None = Field(
        None, description="While step shapes still compile in the background (`--warmup first`)."
    )


class Slot(BaseModel):
    id: int = Field(ge=0)
    n_ctx: int
    is_processing: bool
    id_task: str | None
    n_prompt_tokens: int = Field(ge=0)
    n_decoded: int = Field(ge=0)


class TokenPiece(BaseModel):
    id: int = Field(ge=0)
    piece: str


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece] = Field(description="Ids, or `{id, piece}` with `with_pieces`.")


class DetokenizeResponse(BaseModel):
    content: str


class ApplyTemplateResponse(BaseModel):
    prompt: str
