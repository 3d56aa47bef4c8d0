"""The streaming event model shared by every API surface (OpenAI chat, Anthropic, Responses).

A generation is a sequence of these, in order, then a finish. Each API renders them in its
own wire format; none of them looks at the model's markup.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtplx.chat.tools import ToolCall


@dataclass
class TextDelta:
    text: str


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int  # 0, 1, ... within this turn
    id: str
    name: str


@dataclass
class ToolCallArgs:
    index: int
    fragment: str  # a piece of the arguments' JSON text; the pieces join to json.dumps(call.arguments)


@dataclass
class ToolCallEnd:
    index: int
    call: ToolCall
    complete: bool = True  # False: the generation ended inside the call (arguments may be partial)
    raw: str = ""  # the call's markup as generated (what a non-streaming reply shows for an incomplete call)


ChatEvent = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgs | ToolCallEnd
