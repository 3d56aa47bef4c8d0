"""Chat format of a checkpoint: prompts with tools and reasoning in, events out (no HTTP, no model math).

    tools.py      Tool / ToolCall, tool schemas from each API, argument typing, tool_choice
    formats.py    the checkpoint's tool-call format (Qwen3.5 XML or Qwen3 JSON), built-in templates
    prompt.py     messages + tools + tool_choice -> prompt text and the parser's starting state
    parser.py     generated text -> TextDelta / ReasoningDelta / ToolCall* events, incrementally
    events.py     the event model every API surface renders in its own wire format
"""
