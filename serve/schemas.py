"""OpenAI request bodies as pydantic models: the only place request JSON is validated.

Strict types (a number is not a string, a string is not a number), OpenAI's ranges, unknown
fields ignored (clients send fields we do not use). Responses are plain dicts built by the
handlers in OpenAI's exact shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llama_jax import MAX_STOP_CHARS, SAMPLING_FIELDS

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


def sampling(name: str) -> Any:
    """An optional request field for the library's sampling field `name`: its range and
    description from `llama_jax.sampling.FIELDS`; absent or null, the library's default."""
    knob = SAMPLING_FIELDS[name]
    default = "none" if knob.default is None else knob.default
    return Field(None, description=f"{knob.description} Default: {default}.", **knob.bounds())


LogitBias = Annotated[float, Field(**SAMPLING_FIELDS["logit_bias"].bounds())]
ReasoningFormat = Literal["auto", "deepseek", "none"]
Choices = Annotated[list[str], Field(min_length=1, max_length=1024)]


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = Field(None, description="A regular expression the whole output matches.")
    choice: Choices | None = Field(None, description="The output is exactly one of these strings.")
    grammar: str | None = Field(None, description="A Lark grammar (a `start:` rule) or GBNF (`root ::=`).")
    json_object: bool | None = Field(None, description="Any JSON object.")


class SamplingFields(_Body):
    """What chat and legacy completions share: the model, sampling and stopping."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float | None = sampling("temperature")
    top_p: float | None = sampling("top_p")
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = sampling("seed")
    presence_penalty: float | None = sampling("presence_penalty")
    frequency_penalty: float | None = sampling("frequency_penalty")
    logit_bias: dict[str, LogitBias] | None = Field(
        None, description=SAMPLING_FIELDS["logit_bias"].description
    )
    user: str | None = None
    # Extensions (llama.cpp, vLLM)
    top_k: int | None = sampling("top_k")
    min_p: float | None = sampling("min_p")
    repetition_penalty: float | None = sampling("repetition_penalty")
    ignore_eos: bool = False
    # Structured output beyond `response_format` (serve/structured.py): at most one of these.
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = Field(
        None, description="vLLM's older `structured_outputs.json`."
    )
    guided_regex: str | None = Field(None, description="vLLM's older `structured_outputs.regex`.")
    guided_choice: Choices | None = Field(None, description="vLLM's older `structured_outputs.choice`.")
    guided_grammar: str | None = Field(None, description="vLLM's older `structured_outputs.grammar`.")
    json_schema: dict[str, Any] | None = Field(None, description="llama.cpp's: a JSON schema for the output.")
    grammar: str | None = Field(None, description="llama.cpp's: a GBNF grammar for the output.")

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
    top_logprobs: int | None = sampling("top_logprobs")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra chat template variables, e.g. Qwen3's `enable_thinking: false`."
    )
    reasoning_format: ReasoningFormat | None = Field(
        None,
        description="This request's: a leading reasoning block goes to `reasoning_content` "
        '("auto", "deepseek") or stays in `content` ("none"). Default: the server\'s `--reasoning-format`.',
    )

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: int | None = sampling("top_logprobs")
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


# -- The Responses API (`POST /v1/responses`, serve/handlers/responses.py) --------------------


class InputPart(_Body):
    """A part of an input message: text only (`input_text`, or `output_text` of an earlier turn)."""

    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Body):
    """A call the model made in an earlier turn, sent back with its output."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class ReasoningItem(_Body):
    """An earlier turn's reasoning: accepted and left out of the prompt (templates drop it)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["reasoning"]


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(_Body):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def for_chat(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters or {"type": "object"}}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def response_format(self) -> dict[str, Any]:
        """The same constraint as chat's `response_format`."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name or "response", "schema": self.schema_ or {}},
        }


class TextConfig(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    """`POST /v1/responses`: stateless (no `previous_response_id`; nothing is stored)."""

    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float | None = sampling("temperature")
    top_p: float | None = sampling("top_p")
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    previous_response_id: str | None = Field(
        None, description="Not supported: this server stores nothing (400)."
    )
    store: bool | None = Field(None, description="Accepted; nothing is stored.")
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Extensions (vLLM)
    seed: int | None = sampling("seed")
    top_k: int | None = sampling("top_k")
    chat_template_kwargs: dict[str, Any] | None = None
