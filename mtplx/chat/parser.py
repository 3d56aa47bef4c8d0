"""Generated text -> chat events, incrementally: reasoning, text, and tool calls as they form.

    parser = ChatParser(fmt, tools, start_in_reasoning=True)
    for delta in generated_text_deltas:
        for ev in parser.feed(delta): ...       # TextDelta / ReasoningDelta / ToolCallStart / ToolCallArgs / ToolCallEnd
    for ev in parser.finish(): ...

Guarantees, whatever the split of the text into deltas:
- no piece of `<tool_call>` / `</think>` markup is ever released as text while it may still
  become a marker (the possible start of a marker is held back until it is decided);
- a call is announced (ToolCallStart: id + name) as soon as its name is complete, and its
  arguments follow as JSON fragments that join to json.dumps(arguments) (XML: one fragment per
  finished parameter; JSON: the whole object when the call closes);
- text before a call is kept (minus the blank lines that separate it from the call);
- a call that is malformed before its name is known, or unfinished at the end, comes back as text;
  one that breaks after it was announced is closed as incomplete (`ToolCallEnd.complete=False`).
  Either way `failures` records why.
"""

from __future__ import annotations

import json
import re

from mtplx.chat.events import ChatEvent, ReasoningDelta, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart
from mtplx.chat.formats import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN, ChatFormat
from mtplx.chat.tools import Tool, ToolCall, coerce_arguments, new_call_id

MAX_NAME = 256  # characters of a function name before the call is declared malformed

_FUNCTION_RE = re.compile(r"\s*<function=([^>\n]*)>")
_PARAM_RE = re.compile(r"\s*<parameter=([^>\n]*)>")
_JSON_NAME_RE = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_PARAM_CLOSE = "</parameter>"
_FUNCTION_CLOSE = "</function>"
_AFTER_PARAM = ("<parameter=", _FUNCTION_CLOSE, CALL_CLOSE)


def _marker_tail(s: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `s` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(s)), best, -1):
            if s.endswith(m[:k]):
                best = k
                break
    return best


def _newline_tail(s: str) -> int:
    return len(s) - len(s.rstrip("\n"))


class _Call:
    """The call being parsed: its markup so far and what was already announced."""

    def __init__(self, index: int, lead: str = ""):
        self.index = index
        self.lead = lead  # the blank space dropped before <tool_call> (given back if this is no call)
        self.text = ""  # markup after <tool_call>
        self.pos = 0  # XML: parsed up to here
        self.id: str | None = None
        self.name: str | None = None
        self.tool: Tool | None = None
        self.values: dict[str, str] = {}  # XML: raw parameter values, in order
        self.fragments: list[str] = []  # argument JSON fragments sent
        self.function_closed = False
        self.value: tuple[str, int] | None = None  # XML: the parameter being read (name, where its value starts)
        self.scan = 0  # where the search for a closing tag resumes (long values are scanned once)


class ChatParser:
    def __init__(self, fmt: ChatFormat, tools: list[Tool] | None = None, *, parse_tools: bool = True,
                 start_in_reasoning: bool = False, id_prefix: str = "call_"):
        self.fmt = fmt
        self.tools = {t.name: t for t in tools or []}
        self.parse_tools = bool(parse_tools and fmt.tool_format and self.tools)
        self.id_prefix = id_prefix
        self.state = "reasoning" if start_in_reasoning else "content"
        self.buf = ""
        self.content_started = False  # content text already released
        self.reasoning_started = False  # reasoning text already seen
        self.calls: list[ToolCall] = []
        self.failures: list[str] = []  # one reason per malformed / unfinished call
        self._call: _Call | None = None

    # ---- public --------------------------------------------------------------------------
    def feed(self, text: str) -> list[ChatEvent]:
        self.buf += text
        out: list[ChatEvent] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[ChatEvent]:
        out: list[ChatEvent] = []
        while self._step(out, final=True):
            pass
        if self.state == "call":
            self._abandon(out, "unfinished")
        elif self.buf and (self.buf.strip() or not self.calls):  # space after the last call is dropped
            self._release(out, self.buf)
            self.buf = ""
        return out

    # ---- states --------------------------------------------------------------------------
    def _step(self, out: list, final: bool) -> bool:
        if self.state == "reasoning":
            return self._reasoning(out, final)
        if self.state == "content":
            return self._content(out, final)
        return self._xml_call(out, final) if self.fmt.tool_format == "xml" else self._json_call(out, final)

    def _release(self, out: list, text: str) -> None:
        if not text:
            return
        if self.state == "reasoning":
            out.append(ReasoningDelta(text))
        else:
            self.content_started = True
            out.append(TextDelta(text))

    def _reasoning(self, out: list, final: bool) -> bool:
        if not self.reasoning_started:  # the line break after <think> is markup, wherever the split falls
            self.buf = self.buf.lstrip("\n")
            if not self.buf:
                return False
            self.reasoning_started = True
        i = self.buf.find(THINK_CLOSE)
        if i >= 0:
            self._release(out, self.buf[:i].rstrip("\n"))
            self.buf = self.buf[i + len(THINK_CLOSE):]
            self.state = "content"
            return True
        if final:
            self._release(out, self.buf.rstrip("\n"))
            self.buf = ""
            return False
        hold = _marker_tail(self.buf, (THINK_CLOSE,))
        head = self.buf[: len(self.buf) - hold]
        hold += _newline_tail(head)
        self._release(out, self.buf[: len(self.buf) - hold])
        self.buf = self.buf[len(self.buf) - hold:]
        return False

    def _content(self, out: list, final: bool) -> bool:
        if not self.content_started:
            stripped = self.buf.lstrip("\n")
            if self.fmt.thinking and not self.calls:
                if stripped.startswith(THINK_OPEN):  # the model opened its own reasoning block
                    self.buf = stripped[len(THINK_OPEN):].lstrip("\n")
                    self.state = "reasoning"
                    return True
                if not final and THINK_OPEN.startswith(stripped):
                    return False  # maybe <think>: wait
            self.buf = stripped
        markers = (CALL_OPEN,) if self.parse_tools else ()
        if self.parse_tools:
            i = self.buf.find(CALL_OPEN)
            if i >= 0:
                before = self.buf[:i]
                self._release(out, before.rstrip())  # the blank lines before a call are markup
                self.buf = self.buf[i + len(CALL_OPEN):]
                self._call = _Call(len(self.calls), before[len(before.rstrip()):])
                self.state = "call"
                return True
        if final:
            return False
        hold = _marker_tail(self.buf, markers)
        if self.parse_tools:
            head = self.buf[: len(self.buf) - hold]
            hold = len(self.buf) - len(head.rstrip())  # blank space right before a call is dropped
        if self.calls and not self.buf[: len(self.buf) - hold].strip():
            return False  # only space between calls so far
        self._release(out, self.buf[: len(self.buf) - hold])
        self.buf = self.buf[len(self.buf) - hold:]
        return False

    # ---- calls ---------------------------------------------------------------------------
    def _announce(self, out: list, call: _Call, name: str) -> bool:
        if name not in self.tools:
            return False
        call.name, call.tool, call.id = name, self.tools[name], new_call_id(self.id_prefix)
        out.append(ToolCallStart(call.index, call.id, name))
        return True

    def _args(self, out: list, call: _Call, fragment: str) -> None:
        call.fragments.append(fragment)
        out.append(ToolCallArgs(call.index, fragment))

    def _close(self, out: list, arguments: dict) -> None:
        call = self._call
        joined = "".join(call.fragments)
        full = json.dumps(arguments, ensure_ascii=False)
        if full.startswith(joined):  # the fragments sent so far are a prefix: send the rest
            if len(full) > len(joined):
                self._args(out, call, full[len(joined):])
        tc = ToolCall(call.id, call.name, arguments)
        self.calls.append(tc)
        out.append(ToolCallEnd(call.index, tc))
        self._call = None
        self.state = "content"

    def _abandon(self, out: list, reason: str) -> None:
        """The call cannot be completed: text when it was never announced, else closed as incomplete."""
        call = self._call
        call.text += self.buf
        self.failures.append(reason)
        raw = CALL_OPEN + call.text
        self._call, self.buf, self.state = None, "", "content"
        if call.id is None:
            self._release(out, call.lead + raw)
            return
        values = dict(call.values)
        if call.value is not None:  # a parameter cut off mid-value keeps what it has
            name, start = call.value
            values[name] = call.text[start:].removeprefix("\n")
        tc = ToolCall(call.id, call.name, coerce_arguments(values, call.tool))
        out.append(ToolCallEnd(call.index, tc, complete=False, raw=raw))

    def _xml_call(self, out: list, final: bool) -> bool:
        call = self._call
        call.text += self.buf
        self.buf = ""
        if call.value is not None:
            return self._xml_value(out, call, final)
        rest = call.text[call.pos:]
        if call.name is None:
            m = _FUNCTION_RE.match(rest)
            if m is None:
                s = rest.lstrip()
                pending = "<function=".startswith(s) or (s.startswith("<function=") and "\n" not in s)
                if not pending or len(rest) > MAX_NAME:
                    self._abandon(out, "malformed")
                    return True
                return False
            if not self._announce(out, call, m.group(1).strip()):
                self._abandon(out, "unknown_tool")
                return True
            call.pos += m.end()
            return True
        stripped = rest.lstrip()
        if call.function_closed or stripped.startswith(CALL_CLOSE):
            if stripped.startswith(CALL_CLOSE):
                call.pos = len(call.text) - len(stripped) + len(CALL_CLOSE)
                self.buf = call.text[call.pos:]
                self._close(out, coerce_arguments(call.values, call.tool))
                return True
            if stripped and not CALL_CLOSE.startswith(stripped):
                self._abandon(out, "malformed")
                return True
            return False
        if stripped.startswith(_FUNCTION_CLOSE):
            call.pos = len(call.text) - len(stripped) + len(_FUNCTION_CLOSE)
            call.function_closed = True
            return True
        m = _PARAM_RE.match(rest)
        if m is None:
            if stripped and not any(t.startswith(stripped[:len(t)]) for t in _AFTER_PARAM):
                self._abandon(out, "malformed")
                return True
            return False
        call.value = (m.group(1).strip(), call.pos + m.end())
        call.scan = call.value[1]
        return True

    def _xml_value(self, out: list, call: _Call, final: bool) -> bool:
        name, start = call.value
        end = self._param_end(call, final)
        if end is None:
            return False
        value = call.text[start:end]
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        call.values[name] = value
        typed = coerce_arguments({name: value}, call.tool)[name]
        sep = "{" if not call.fragments else ", "
        self._args(out, call, f"{sep}{json.dumps(name, ensure_ascii=False)}: {json.dumps(typed, ensure_ascii=False)}")
        call.pos, call.value = end + len(_PARAM_CLOSE), None
        return True

    @staticmethod
    def _param_end(call: _Call, final: bool) -> int | None:
        """Where the value being read ends: the first </parameter> that is followed by another
        parameter, </function> or </tool_call> (a value may itself contain '</parameter>')."""
        text = call.text
        j = text.find(_PARAM_CLOSE, call.scan)
        while j >= 0:
            after = text[j + len(_PARAM_CLOSE): j + len(_PARAM_CLOSE) + 64].lstrip()
            if any(after.startswith(t) for t in _AFTER_PARAM):
                return j
            if not after or any(t.startswith(after) for t in _AFTER_PARAM):
                call.scan = j
                return j if final else None  # undecided until more text comes
            j = text.find(_PARAM_CLOSE, j + 1)
        call.scan = max(call.scan, len(text) - len(_PARAM_CLOSE) + 1)
        return None

    def _json_call(self, out: list, final: bool) -> bool:
        call = self._call
        call.text += self.buf
        self.buf = ""
        if call.name is None:
            m = _JSON_NAME_RE.match(call.text)
            if m is not None:
                try:
                    name = json.loads(f'"{m.group(1)}"')
                except ValueError:
                    name = m.group(1)
                if not self._announce(out, call, name):
                    self._abandon(out, "unknown_tool")
                    return True
            elif call.text.strip() and not call.text.lstrip().startswith("{"):
                self._abandon(out, "malformed")
                return True
        i = call.text.find(CALL_CLOSE, call.scan)
        if i < 0:
            call.scan = max(call.scan, len(call.text) - len(CALL_CLOSE) + 1)
            if final:
                self._abandon(out, "unfinished")
                return True
            return False
        body, self.buf = call.text[:i], call.text[i + len(CALL_CLOSE):]
        call.text = body
        try:
            obj = json.loads(body)
            args = obj.get("arguments", obj.get("parameters", {}))
            args = json.loads(args) if isinstance(args, str) else args
            ok = isinstance(obj.get("name"), str) and isinstance(args, dict)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            self._abandon(out, "malformed")
            return True
        if call.name is None and not self._announce(out, call, obj["name"]):
            self._abandon(out, "unknown_tool")
            return True
        self._close(out, args)
        return True
