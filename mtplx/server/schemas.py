"""Request schemas (pydantic v2, strict types: JSON `"5"` is not an int, `true` is not a number).

Unknown fields are ignored (clients send many); fields we understand but cannot honour get a
clear 400 from the routes (`unsupported()`), never silent wrong behaviour.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 4_000_000  # characters in one string field (bodies are bounded in bytes anyway)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0)]
MinP = Annotated[float, Field(ge=0.0, lt=1.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
MaxTokens = Annotated[int, Field(ge=1)]
StopStr = Annotated[str, Field(min_length=1, max_length=1000)]


# --------------------------------------------------------------------------------- OpenAI
class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT)]


class OtherPart(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Annotated[str, Field(max_length=64)]


ContentPart = Union[TextPart, OtherPart]


class ToolCallFunction(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    arguments: Annotated[str, Field(max_length=MAX_TEXT)] | dict[str, Any] = ""  # a JSON string (some clients: an object)


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_TEXT)] | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: Annotated[str, Field(max_length=MAX_TEXT)] | None = None  # vLLM / llama.cpp convention
    reasoning: Annotated[str, Field(max_length=MAX_TEXT)] | None = None  # the same, as some clients name it


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: Annotated[str, Field(max_length=512)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    max_tokens: MaxTokens | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=16)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None  # vLLM extension
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM/llama.cpp extension (benchmarks)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None  # accepted; "none" turns the template's thinking off
    # vLLM extension: extra variables for the chat template, e.g. {"enable_thinking": false}
    chat_template_kwargs: Annotated[dict[str, Union[bool, int, float, str, None]], Field(max_length=16)] | None = None


class CompletionRequest(_SamplingFields):
    prompt: Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[list[int], Field(min_length=1)] | Annotated[
        list[Annotated[str, Field(max_length=MAX_TEXT)]], Field(min_length=1, max_length=1)]
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


# ------------------------------------------------------------------------------ Anthropic
class ATextBlock(_Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT)]


class AOtherBlock(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Annotated[str, Field(max_length=64)]


ABlock = Union[ATextBlock, AOtherBlock]


class AMessage(_Strict):
    role: Literal["user", "assistant", "system"]  # Claude Code puts system messages inside `messages`
    content: Annotated[str, Field(max_length=MAX_TEXT)] | list[ABlock]


class MessagesRequest(_Strict):
    model: Annotated[str, Field(max_length=512)]
    messages: Annotated[list[AMessage], Field(min_length=1)]
    max_tokens: MaxTokens
    system: Annotated[str, Field(max_length=MAX_TEXT)] | list[ATextBlock] | None = None
    stop_sequences: Annotated[list[StopStr], Field(max_length=16)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    # accepted and not used: context_management, output_config, service_tier, cache_control (in blocks)


class CountTokensRequest(_Strict):
    model: Annotated[str, Field(max_length=512)]
    messages: Annotated[list[AMessage], Field(min_length=1)]
    system: Annotated[str, Field(max_length=MAX_TEXT)] | list[ATextBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


# ------------------------------------------------------------------------------ Responses
class ResponsesRequest(_Strict):
    model: Annotated[str, Field(max_length=512)] | None = None
    input: Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[list[Any], Field(min_length=1)]
    instructions: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    # accepted and not used: include, prompt_cache_key, truncation, service_tier, user, safety_identifier
