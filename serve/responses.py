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
    reasoning_content: str | None = Field(
        None, description="The output's reasoning block (`<think>`...`</think>`), when it had one."
    )
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
    reasoning_content: str | None = None
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
    count: int | None = Field(
        None, ge=0, description="How many tokens (vLLM's shape: `prompt` or `messages`)."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="The model's tokens per sequence (vLLM's shape)."
    )


class DetokenizeResponse(BaseModel):
    content: str


class ApplyTemplateResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str = Field(description="llama-jax's version (vLLM's `/version`).")


class SamplingDefaults(BaseModel):
    """What a request that sets none of these gets."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    n_predict: int = Field(
        description="max_tokens when a request gives none (less if the context is shorter)."
    )
    presence_penalty: float
    frequency_penalty: float
    repeat_penalty: float


class GenerationSettings(BaseModel):
    n_ctx: int = Field(description="Tokens per sequence.")
    params: SamplingDefaults


class Props(BaseModel):
    """llama.cpp's `/props`: the model's defaults and facts."""

    default_generation_settings: GenerationSettings
    total_slots: int = Field(ge=1)
    model_alias: str = Field(description="The model's id.")
    model_path: str
    chat_template: str
    bos_token: str
    eos_token: str
    modalities: dict[str, bool]
    build_info: str


class ResponseUsage(BaseModel):
    input_tokens: int = Field(ge=0)
    input_tokens_details: dict[str, int] = Field(description="`cached_tokens`: from the prefix cache.")
    output_tokens: int = Field(ge=0)
    output_tokens_details: dict[str, int] = Field(description="`reasoning_tokens`: those of the reasoning.")
    total_tokens: int = Field(ge=0)


class ResponseOutputItem(BaseModel):
    """A `message` (`content`: `output_text` parts), a `function_call` (`call_id`, `name`,
    `arguments`) or a `reasoning` item (`content`: `reasoning_text` parts)."""

    type: Literal["message", "function_call", "reasoning"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] | None = None
    content: list[dict[str, object]] | None = None
    summary: list[dict[str, object]] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


class ResponseObject(BaseModel):
    """`POST /v1/responses` without `stream`; streamed, the `response` of `response.created`,
    `response.in_progress` and the last event, `response.completed` (or `response.incomplete`)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[ResponseOutputItem]
    error: dict[str, object] | None
    incomplete_details: dict[str, str] | None
    instructions: str | None
    max_output_tokens: int | None
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    tool_choice: str | dict[str, str]
    tools: list[dict[str, object]]
    text: dict[str, object]
    previous_response_id: None
    store: Literal[False]
    metadata: dict[str, str]
    usage: ResponseUsage | None


class ResponseStreamEvent(BaseModel):
    """One event of a streamed response, sent as `event: {type}` and `data: {json}` (no
    `[DONE]`): `response.created`, `response.in_progress`, `response.output_item.added`,
    `response.content_part.added`, `response.output_text.delta` / `.done`,
    `response.reasoning_text.delta` / `.done`, `response.function_call_arguments.delta` /
    `.done`, `response.content_part.done`, `response.output_item.done`, then
    `response.completed` or `response.incomplete`."""

    type: str
    sequence_number: int = Field(ge=0)
    response: ResponseObject | None = None
    output_index: int | None = Field(None, ge=0)
    item_id: str | None = None
    item: ResponseOutputItem | None = None
    content_index: int | None = Field(None, ge=0)
    part: dict[str, object] | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
