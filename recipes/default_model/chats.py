"""Stage v2-1: chat and tool-calling data, rendered with the default model's own chat template.

    python recipes/default_model/chats.py     # -> runs/default_model/{chat_train.txt,chat_eval.jsonl,chats.json}

Everything comes from what every machine has: the CPython standard library (functions and
their docstrings, via `ast`) and pydoc's topic texts. Kinds of exchange:
- code: a signature + docstring asked for (three phrasings), the function answered in a code block;
- explain: "what does X do" answered with the substance of its docstring; pydoc topics explained;
- tools: random tool schemas (verb_noun names, 1-3 parameters of string / integer / number /
  boolean type), a request naming the values, the call in the template's XML format with the
  values copied, a tool result and a short answer that uses it (training episodes also name
  tools, parameters and values from wide stdlib-derived pools, `WidePools`, so that they must be
  copied from the prompt). Some with text before the call,
  some with two calls, some where no tool fits and the answer is plain text;
- some turns with a short <think> block (enable_thinking), some multi-turn, some small talk.
Every assistant turn ends with <|im_end|>. Each document is the prompt exactly as the server
renders it (the template with add_generation_prompt) followed by the answer, so training sees
what inference sees.

Held out for evaluation: the functions of common.HELD_OUT_MODULES, and tool episodes built from
verbs, nouns and request phrasings that no training episode uses.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# ---- vocabulary of the tool episodes (train / held-out) ---------------------------------------

VERBS = {  # verb -> past participle
    "get": "fetched", "fetch": "fetched", "find": "found", "search": "searched", "create": "created",
    "delete": "deleted", "update": "updated", "list": "listed", "send": "sent", "convert": "converted",
    "compute": "computed", "check": "checked", "add": "added", "remove": "removed",
    "schedule": "scheduled", "translate": "translated", "resize": "resized", "download": "downloaded",
    "upload": "uploaded", "book": "booked", "cancel": "cancelled", "read": "read", "write": "written",
    "rename": "renamed", "count": "counted", "lookup": "looked up", "summarize": "summarized",
    "validate": "validated", "format": "formatted", "sort": "sorted", "open": "opened", "close": "closed",
}
HELD_OUT_VERBS = {
    "archive": "archived", "restore": "restored", "publish": "published", "measure": "measured",
    "encrypt": "encrypted", "merge": "merged", "reserve": "reserved", "ping": "pinged",
    "share": "shared", "inspect": "inspected",
}
NOUNS = [
    "weather", "file", "user", "email", "order", "invoice", "ticket", "meeting", "playlist", "song",
    "image", "note", "task", "reminder", "contact", "flight", "hotel", "stock_price", "currency",
    "distance", "recipe", "document", "event", "message", "repository", "issue", "branch", "package",
    "report", "temperature", "account", "calendar_entry", "video", "backup", "alarm", "device",
]
HELD_OUT_NOUNS = [
    "parcel", "telescope", "podcast", "lease", "satellite", "greenhouse", "locker", "voucher",
    "glacier", "violin", "tram_route", "beehive",
]

CITIES = ["Paris", "Tokyo", "Berlin", "Lagos", "Lima", "Oslo", "New York", "Cairo", "Sydney",
          "Madrid", "Toronto", "Seoul", "Nairobi", "Hanoi", "Quito", "Dublin"]
NAMES = ["Alice", "Bob", "Maria Lopez", "Chen Wei", "Priya", "Omar", "Sven", "Aiko", "Fatima", "Luca"]
WORDS = ["alpha", "budget", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "iris", "juniper",
         "kepler", "lumen", "maple", "nova", "onyx", "pepper", "quartz", "raven", "sierra", "tango",
         "umber", "vertex", "willow", "xenon", "yarrow", "zephyr"]
STRING_VALUES = {
    "city": CITIES, "location": CITIES, "name": NAMES, "user": NAMES, "recipient": NAMES,
    "owner": NAMES, "language": ["French", "German", "Spanish", "Japanese", "Italian", "Swahili"],
    "unit": ["celsius", "fahrenheit", "km", "miles", "kg", "pounds"],
    "date": ["2026-03-14", "2027-01-09", "tomorrow", "next Monday", "2026-11-30"],
    "symbol": ["AAPL", "MSFT", "TSLA", "NVDA", "SAP", "ASML"],
    "color": ["red", "teal", "navy", "amber", "violet"],
    "status": ["open", "closed", "pending", "done"],
}
STRING_PARAMS = ["city", "location", "name", "user", "recipient", "owner", "language", "unit", "date",
                 "symbol", "color", "status", "path", "query", "title", "text", "email", "url", "tag",
                 "code", "label", "branch_name", "topic"]
INT_PARAMS = ["count", "limit", "year", "port", "page", "days", "quantity", "user_id", "size",
              "minutes", "priority", "seats"]
NUMBER_PARAMS = ["amount", "price", "latitude", "longitude", "ratio", "weight", "threshold", "budget"]
BOOL_PARAMS = ["verbose", "recursive", "force", "dry_run", "public", "urgent", "notify", "overwrite"]

# How a request names one argument. {p} is the parameter's name in words, {v} its value.
ARG_PHRASES = ["{p} {v}", "{p} {v}", "{p} {v}", "{p} \"{v}\"", "{p}: {v}", "{p} = {v}", "the {p} {v}",
               # v2.2: connector words and value-first orders, so a value is found past the words
               # around it (none of these is a held-out phrasing)
               "{p} is {v}", "{p} equal to {v}", "{p} -> {v}", "{p}={v}", "{p} should be {v}", "{p} ({v})",
               "{v} for the {p}", "{v} for {p}", "{v} is the {p}", "a {p} {v}"]
HELD_OUT_ARG_PHRASES = ["{p} set to {v}", "{v} as the {p}", "{p} of {v}", "{p} being {v}"]
BOOL_PHRASES = {True: ["with {p} on", "{p}: true", "{p} enabled", "and {p} true", "{p} switched on", "{p}=true",
                       "{p} yes"],
                False: ["with {p} off", "{p}: false", "{p} disabled", "and {p} false", "{p} switched off",
                        "{p}=false", "without {p}"]}
HELD_OUT_BOOL_PHRASES = {True: ["turning {p} on"], False: ["turning {p} off"]}
REQUESTS = [
    "Please {verb} the {noun} {args}.",
    "Can you {verb} the {noun} {args}?",
    "I need you to {verb} a {noun} {args}.",
    "{Verb} the {noun} {args}, please.",
    "Could you {verb} the {noun} for me, {args}?",
    "{Verb} {noun} {args}",
    "Hey, {verb} the {noun} {args}.",
    "I want to {verb} the {noun}: {args}.",
    "Let's {verb} the {noun} {args}.",
    "Is it possible to {verb} the {noun} {args}?",
    "Quick one: {verb} the {noun}, {args}.",
    "{Verb} this {noun} now [{args}].",
]
HELD_OUT_REQUESTS = [
    "Go ahead and {verb} the {noun} {args}.",
    "My request: {verb} the {noun}, {args}.",
    "Would you {verb} that {noun} {args}?",
    "Time to {verb} the {noun} ({args})!",
]
SYSTEMS = ["", "", "", "You are a helpful assistant.", "You are a concise coding assistant.",
           "You are mtplx's default model. Answer briefly.", "Be direct and brief."]
SMALL_TALK = [
    ("Hello!", "Hello! Ask me about Python, or give me tools to call."),
    ("Hi", "Hi! How can I help you with Python today?"),
    ("Who are you?", "I am the small default model of mtplx, trained on the Python standard library. "
                     "I can answer short Python questions and call tools."),
    ("Thanks!", "You're welcome."),
    ("What can you do?", "I can write small Python functions, explain standard library code and call "
                         "the tools you give me."),
    ("Say hello in one word.", "Hello."),
]



@dataclass
class WidePools:
    """Training-only pools far wider than the lists above, so that a tool's name, its parameter
    names and its string values can only be got right by copying them from the prompt: verb_noun
    pairs split from stdlib function names, stdlib argument names, and the words of those names."""
    pairs: list[tuple[str, str]]
    params: list[str]
    values: list[str]
    share: float = 0.6  # of the training tools, the share named from `pairs`


def wide_pools(root: Path) -> WidePools:
    from corpus import iter_stdlib_files

    held = set(HELD_OUT_VERBS) | {w for n in HELD_OUT_NOUNS for w in n.split("_")}
    pairs, params = set(), {}
    for rel, text in iter_stdlib_files(root):
        if rel.startswith("test/") or common.is_held_out(rel):
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if re.fullmatch(r"[a-z]{3,10}_[a-z]{3,12}(_[a-z]{3,12})?", node.name) and not held & set(node.name.split("_")):
                verb, noun = node.name.split("_", 1)
                pairs.add((verb, noun))
            for a in node.args.args + node.args.kwonlyargs:
                if re.fullmatch(r"[a-z]{3,12}(_[a-z]{3,10})?", a.arg) and a.arg not in ("self", "cls"):
                    params[a.arg] = params.get(a.arg, 0) + 1
    values = sorted({w for v, n in pairs for w in [v, *n.split("_")]})
    return WidePools(sorted(pairs), sorted(a for a, c in params.items() if c >= 3 and a not in held), values)


# ---- stdlib functions and topics -------------------------------------------------------------

def first_paragraph(doc: str, limit: int = 360) -> str:
    para = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines()).strip()
    if len(text) > limit:
        cut = text[:limit].rsplit(". ", 1)[0]
        text = cut + ("." if not cut.endswith(".") else "")
    return text


def iter_functions(root: Path, max_chars: int = 700):
    """(module name, qualified name, signature, docstring, source) of documented functions."""
    from corpus import iter_stdlib_files

    for rel, text in iter_stdlib_files(root):
        if rel.startswith("test/"):
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for cls, node in _defs(tree):
            doc = ast.get_docstring(node)
            if not doc or node.name.startswith("__") or len(doc) < 20:
                continue
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            src = textwrap.dedent("\n".join(lines[start:node.end_lineno]))
            if len(src) > max_chars or "\t" in src or src.count("\n") < 3:
                continue
            sig = f"{node.name}({ast.unparse(node.args)})"
            if node.returns is not None:
                sig += f" -> {ast.unparse(node.returns)}"
            qual = f"{module}.{cls + '.' if cls else ''}{node.name}"
            yield rel, module, qual, sig, doc, src


def _defs(tree):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield "", node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name, sub


def pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    out = []
    for key, text in sorted(topics.items()):
        body = [p for p in text.split("\n\n") if p.strip() and not p.startswith(" ") and "*" not in p[:3]]
        if len(body) >= 2:
            answer = first_paragraph("\n\n".join(body[1:3]), 420)
            if len(answer) > 60:
                out.append((key.replace("-", " "), answer))
    return out


def code_exchange(rng: random.Random, fn) -> tuple[str, str]:
    _, module, qual, sig, doc, src = fn
    name = sig.split("(")[0]
    head = src.split('"""')[0] if '"""' in src else src.splitlines()[0]
    kind = rng.randrange(3)
    if kind == 0:
        summary = first_paragraph(doc, 200).rstrip(".")
        user = f"Write a Python function `{sig}` that does this: {summary}."
    elif kind == 1:
        stub = head.rstrip() + f'\n    """{doc.strip()}"""' if '"""' in src else head
        user = f"Implement the body of this function:\n\n```python\n{stub.rstrip()}\n```"
    else:
        user = f"Complete `{name}` from `{module}`:\n\n```python\ndef {sig}:\n    \"\"\"{first_paragraph(doc, 200)}\"\"\"\n```"
    return user, f"```python\n{src.rstrip()}\n```"


def explain_exchange(rng: random.Random, fn) -> tuple[str, str]:
    _, module, qual, sig, doc, src = fn
    name = sig.split("(")[0]
    user = rng.choice([f"What does `{qual}` do?", f"Explain `{name}` in `{module}`.",
                       f"What is `{qual}` for?", f"Briefly, what does `{name}` of `{module}` do?"])
    return user, f"`{name}`: {first_paragraph(doc)}"


# ---- tool episodes ---------------------------------------------------------------------------

def tool_name(rng: random.Random, verb: str, noun: str) -> str:
    if rng.random() < 0.25:
        parts = noun.split("_")
        return verb + "".join(p.capitalize() for p in parts)
    return f"{verb}_{noun}"


def make_param(rng: random.Random, taken: set[str], wide: WidePools | None) -> dict:
    kind = rng.choices(["string", "integer", "number", "boolean"], weights=[5, 3, 2, 1.5])[0]
    pool = {"string": STRING_PARAMS, "integer": INT_PARAMS, "number": NUMBER_PARAMS, "boolean": BOOL_PARAMS}[kind]
    if wide and rng.random() < 0.4:
        pool = wide.params
    name = rng.choice([p for p in pool if p not in taken])
    return {"name": name, "type": kind}


def param_value(rng: random.Random, p: dict, wide: WidePools | None = None):
    t, name = p["type"], p["name"]
    if t == "integer":
        return rng.choice([rng.randint(1, 12), rng.randint(10, 500), rng.randint(1000, 9999)])
    if t == "number":
        return round(rng.uniform(0.5, 500.0), rng.choice([1, 2]))
    if t == "boolean":
        return rng.random() < 0.6
    if wide and rng.random() < 0.3:
        return rng.choice(wide.values)
    if name in STRING_VALUES and rng.random() < 0.7:
        return rng.choice(STRING_VALUES[name])
    w = rng.choice(WORDS)
    if name == "path":
        return rng.choice([f"src/{w}.py", f"docs/{w}.md", f"data/{w}_{rng.randint(1, 99)}.csv", f"/tmp/{w}.log"])
    if name == "email":
        return f"{w}@{rng.choice(['example.com', 'mail.org', 'corp.net'])}"
    if name == "url":
        return f"https://{w}.{rng.choice(['com', 'org', 'io'])}/{rng.choice(WORDS)}"
    if name in ("code", "label", "tag"):
        return f"{w.upper()[:3]}-{rng.randint(100, 9999)}"
    if name in ("query", "text", "title", "topic"):
        return " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return rng.choice([w, w.capitalize(), f"{w}-{rng.randint(1, 99)}"])


def make_tool(rng: random.Random, verb: str, noun: str, wide: WidePools | None = None) -> dict:
    params, taken = [], set()
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        p = make_param(rng, taken, wide)
        taken.add(p["name"])
        params.append(p)
    words = noun.replace("_", " ")
    props = {p["name"]: {"type": p["type"], "description": f"The {p['name'].replace('_', ' ')} of the {words}."}
             for p in params}
    required = [p["name"] for i, p in enumerate(params) if i == 0 or rng.random() < 0.7]
    return {"type": "function", "function": {
        "name": tool_name(rng, verb, noun),
        "description": rng.choice([f"{verb.capitalize()} a {words}.", f"{verb.capitalize()} the {words} given its "
                                   + ", ".join(p["name"] for p in params) + ".", f"Use this to {verb} a {words}."]),
        "parameters": {"type": "object", "properties": props, "required": required}},
        "_verb": verb, "_noun": noun, "_params": params, "_wide": wide}


def phrase_args(rng: random.Random, params: list[dict], values: dict, held: bool) -> str:
    phrases = HELD_OUT_ARG_PHRASES if held else ARG_PHRASES
    bools = HELD_OUT_BOOL_PHRASES if held else BOOL_PHRASES
    parts = []
    for p in params:
        if p["name"] not in values:
            continue
        words, v = p["name"].replace("_", " "), values[p["name"]]
        if p["type"] == "boolean":
            parts.append(rng.choice(bools[v]).format(p=words))
        else:
            parts.append(rng.choice(phrases).format(p=words, v=v))
    lead = "" if held else rng.choice(["with ", "for ", "using ", ""])
    if len(parts) == 1:
        return lead + parts[0]
    return lead + ", ".join(parts[:-1]) + rng.choice([" and ", ", "]) + parts[-1]


def call_args(rng: random.Random, tool: dict) -> dict:
    req = tool["function"]["parameters"]["required"]
    return {p["name"]: param_value(rng, p, tool["_wide"]) for p in tool["_params"]
            if p["name"] in req or rng.random() < 0.5}


def request_for(rng: random.Random, tool: dict, args: dict, held: bool) -> str:
    noun = tool["_noun"].replace("_", " ")
    verb = tool["_verb"]
    tpl = rng.choice(HELD_OUT_REQUESTS if held else REQUESTS)
    return tpl.format(verb=verb, Verb=verb.capitalize(), noun=noun, args=phrase_args(rng, tool["_params"], args, held))


def tool_result(rng: random.Random, tool: dict, args: dict) -> tuple[str, str]:
    """(the tool's JSON output, the phrase of it the final answer repeats)."""
    noun = tool["_noun"].replace("_", " ")
    kind = rng.randrange(3)
    if kind == 0:
        value = f"{rng.randint(1, 40)} {rng.choice(['items', 'results', 'entries'])}"
    elif kind == 1:
        value = rng.choice(["ok", "done", "queued", "confirmed", "not found", "failed: permission denied"])
    else:
        value = f"{rng.choice(WORDS)}-{rng.randint(100, 999)}"
    out = {"status": "ok" if not value.startswith(("failed", "not found")) else "error", "result": value}
    if rng.random() < 0.5:
        out["id"] = rng.randint(1000, 99999)
    return json.dumps(out), value


def final_answer(rng: random.Random, tool: dict, value: str) -> str:
    noun = tool["_noun"].replace("_", " ")
    past = {**VERBS, **HELD_OUT_VERBS}.get(tool["_verb"])
    if past is None:  # a wide-pool verb: no participle known
        return rng.choice([f"The tool returned {value}.", f"Here is the result for the {noun}: {value}."])
    return rng.choice([f"Done: the {noun} was {past}. The result is {value}.",
                       f"The tool returned {value}.",
                       f"Here is the result for the {noun}: {value}.",
                       f"I {past} the {noun}; the result is {value}."])


def call_of(tool: dict, args: dict) -> dict:
    return {"type": "function", "function": {"name": tool["function"]["name"], "arguments": args}}


def xml_call(tool: dict, args: dict) -> str:
    """The call exactly as the template renders it."""
    lines = ["<tool_call>", f"<function={tool['function']['name']}>"]
    for k, v in args.items():
        lines += [f"<parameter={k}>", v if isinstance(v, str) else json.dumps(v), "</parameter>"]
    return "\n".join(lines + ["</function>", "</tool_call>"])


def public(tool: dict) -> dict:
    return {k: v for k, v in tool.items() if not k.startswith("_")}


# ---- documents -------------------------------------------------------------------------------

# Between a document's prompt and its answer: the two are tokenized apart, as at inference (the
# server encodes the rendered prompt, then the model's tokens follow). Tokenized as one text,
# "</think>\n\n" + "```" would split "\n\n" into two tokens where a prompt ends in one "\n\n"
# token, and the model would learn that after that token only a tool call ever follows.
ANSWER_SEP = "\x1e"


class Renderer:
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def doc(self, messages: list[dict], answer: str, tools=None, thinking: bool = False, reasoning: str = "") -> str:
        prompt = self.tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None,
                                              enable_thinking=thinking)
        if thinking:
            answer = f"{reasoning}\n</think>\n\n{answer}"
        assert ANSWER_SEP not in prompt and ANSWER_SEP not in answer
        return prompt + ANSWER_SEP + answer + "<|im_end|>\n"


def eval_doc(R: Renderer, rec: dict) -> str:
    """An evaluation record with its reference answer, as a document (teacher-forced acceptance)."""
    return R.doc(rec["messages"], rec["reference"], rec["tools"], rec["enable_thinking"], "")


def system_msgs(rng: random.Random) -> list[dict]:
    s = rng.choice(SYSTEMS)
    return [{"role": "system", "content": s}] if s else []


def tool_episode(rng, R, verbs, nouns, held, plain_pool, wide: WidePools | None = None) -> tuple[list[str], dict]:
    """Training documents of one episode, and its evaluation record."""
    n_tools = rng.choice([1, 2, 2, 3])
    pairs = set()
    while len(pairs) < n_tools:
        if wide and rng.random() < wide.share:
            pairs.add(rng.choice(wide.pairs))
        else:
            pairs.add((rng.choice(verbs), rng.choice(nouns)))
    tools = [make_tool(rng, v, n, wide) for v, n in sorted(pairs)]
    rng.shuffle(tools)
    msgs = system_msgs(rng)
    mode = rng.choices(["one", "lead", "two", "none"], weights=[6, 2, 1.5, 1.5])[0]
    thinking = rng.random() < 0.15
    target = tools[0]
    args = call_args(rng, target)
    if mode == "none":
        user, answer = rng.choice(plain_pool)
        msgs.append({"role": "user", "content": user})
        reasoning = "No tool fits this question; I will answer it directly."
        return [R.doc(msgs, answer, [public(t) for t in tools], thinking, reasoning)], {
            "messages": msgs, "tools": [public(t) for t in tools], "enable_thinking": thinking,
            "expect": None, "reference": answer}
    calls = [(target, args)]
    request = request_for(rng, target, args, held)
    if mode == "two":
        other = tools[1] if len(tools) > 1 else target
        args2 = call_args(rng, other)
        calls.append((other, args2))
        second = request_for(rng, other, args2, held)
        request = request.rstrip(".?!") + rng.choice(["; then ", ", and also ", ". After that, "]) \
            + second[0].lower() + second[1:]
    msgs.append({"role": "user", "content": request})
    names = ", ".join(f"`{t['function']['name']}`" for t, _ in calls)
    reasoning = f"The user wants to {target['_verb']} a {target['_noun'].replace('_', ' ')}. {names} does that."
    lead = ""
    if mode == "lead":
        lead = rng.choice([f"I will {target['_verb']} the {target['_noun'].replace('_', ' ')}.",
                           "Let me call the tool.", f"Calling `{target['function']['name']}`."]) + "\n\n"
    body = lead + "\n".join(xml_call(t, a) for t, a in calls)
    pub = [public(t) for t in tools]
    docs = [R.doc(msgs, body, pub, thinking, reasoning)]
    record = {"messages": list(msgs), "tools": pub, "enable_thinking": thinking, "reference": body,
              "expect": [{"name": t["function"]["name"], "arguments": a,
                          "required": t["function"]["parameters"]["required"]} for t, a in calls]}
    if rng.random() < 0.6:  # the turn after the tool result
        msgs = msgs + [{"role": "assistant", "content": lead.strip(),
                        "tool_calls": [call_of(t, a) for t, a in calls]}]
        values = []
        for t, a in calls:
            out, value = tool_result(rng, t, a)
            msgs.append({"role": "tool", "content": out})
            values.append((t, value))
        answer = " ".join(final_answer(rng, t, v) for t, v in values)
        docs.append(R.doc(msgs, answer, pub, False))
    return docs, record


def long_doc(rng, R, sources: list[tuple[str, str]], fns, target_chars: int) -> str:
    """A long user turn (several stdlib files), then a question about one function in it."""
    picked, chars = [], 0
    while chars < target_chars:
        rel, text = sources[rng.randrange(len(sources))]
        picked.append((rel, text))
        chars += len(text)
    inside = [f for f in fns if any(f[0] == rel for rel, _ in picked)]
    context = "\n\n".join(f"# file: {rel}\n{text}" for rel, text in picked)
    if inside:
        user, answer = explain_exchange(rng, rng.choice(inside))
    else:
        user, answer = "How many files are above?", f"{len(picked)}."
    msgs = [{"role": "user", "content": f"Here is some code:\n\n```python\n{context}\n```\n\n{user}"}]
    return R.doc(msgs, answer)


def build(work: Path, n_tool: int, n_code: int, n_long: int, seed: int) -> dict:
    from corpus import iter_stdlib_files

    from mtplx.tokenizer import Tokenizer

    rng = random.Random(seed)
    R = Renderer(Tokenizer.from_dir(work / "tokenizer_v2"))
    fns = list(iter_functions(common.stdlib_dir()))
    train_fns = [f for f in fns if not common.is_held_out(f[0])]
    held_fns = [f for f in fns if common.is_held_out(f[0])]
    topics = pydoc_topics()
    plain = [code_exchange(rng, f) for f in rng.sample(train_fns, 400)] + \
        [explain_exchange(rng, f) for f in rng.sample(train_fns, 400)] + \
        [(f"Explain {k} in Python.", a) for k, a in topics] + SMALL_TALK

    docs: list[str] = []
    verbs, nouns = sorted(VERBS), NOUNS
    wide = wide_pools(common.stdlib_dir())
    for _ in range(n_tool):
        ep, _ = tool_episode(rng, R, verbs, nouns, False, plain, wide)
        docs.extend(ep)
    for i in range(n_code):
        fn = train_fns[rng.randrange(len(train_fns))]
        user, answer = (code_exchange if i % 2 == 0 else explain_exchange)(rng, fn)
        msgs = system_msgs(rng)
        if rng.random() < 0.15:  # multi-turn: an earlier exchange first
            u0, a0 = rng.choice(plain)
            msgs += [{"role": "user", "content": u0}, {"role": "assistant", "content": a0}]
        msgs.append({"role": "user", "content": user})
        thinking = rng.random() < 0.15
        docs.append(R.doc(msgs, answer, None, thinking, f"The user asks about `{fn[2]}`. I will answer briefly."))
    for key, answer in topics * 4 + SMALL_TALK * 20:
        user = rng.choice([f"Explain {key} in Python.", f"What is {key} in Python?", f"Tell me about {key}."])
        docs.append(R.doc(system_msgs(rng) + [{"role": "user", "content": user}], answer))
    rng.shuffle(docs)

    sources = [(rel, t) for rel, t in iter_stdlib_files(common.stdlib_dir())
               if not common.is_held_out(rel) and not rel.startswith("test/")]
    longs = [long_doc(rng, R, sources, train_fns, rng.choice([12_000, 25_000, 50_000]))
             for _ in range(n_long)]

    eos = common.EOS
    (work / "chat_train.txt").write_text(eos.join(docs) + eos, encoding="utf-8")
    (work / "chat_long.txt").write_text(eos.join(longs) + eos, encoding="utf-8")

    # evaluation: held-out functions for chat, held-out verbs / nouns / phrasings for tools
    erng = random.Random(seed + 1)
    evals = []
    for fn in erng.sample(held_fns, min(120, len(held_fns))):
        user, answer = (code_exchange if erng.random() < 0.5 else explain_exchange)(erng, fn)
        evals.append({"kind": "chat", "messages": [{"role": "user", "content": user}], "tools": None,
                      "enable_thinking": erng.random() < 0.15, "expect": None, "reference": answer})
    held_verbs = sorted(HELD_OUT_VERBS)
    held_nouns = HELD_OUT_NOUNS
    for i in range(150):
        v_pool = held_verbs if i % 3 != 2 else verbs
        n_pool = held_nouns if i % 3 != 1 else nouns
        _, rec = tool_episode(erng, R, v_pool, n_pool, True, plain)
        if rec["expect"] is not None:
            evals.append({"kind": "tool", **rec})
    with open(work / "chat_eval.jsonl", "w", encoding="utf-8") as f:
        for e in evals:
            f.write(json.dumps(e) + "\n")
    stats = {"seed": seed, "train_docs": len(docs), "long_docs": len(longs),
             "train_chars": sum(map(len, docs)), "long_chars": sum(map(len, longs)),
             "functions": {"train": len(train_fns), "held_out": len(held_fns)}, "topics": len(topics),
             "wide_pools": {"tool_names": len(wide.pairs), "params": len(wide.params), "values": len(wide.values)},
             "eval": {"chat": sum(e["kind"] == "chat" for e in evals), "tool": sum(e["kind"] == "tool" for e in evals)}}
    (work / "chats.json").write_text(json.dumps(stats, indent=2))
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--tool-episodes", type=int, default=12_000)
    ap.add_argument("--code", type=int, default=12_000)
    ap.add_argument("--long", type=int, default=160)
    ap.add_argument("--seed", type=int, default=common.SEED)
    args = ap.parse_args()
    print(json.dumps(build(args.work, args.tool_episodes, args.code, args.long, args.seed), indent=2))


if __name__ == "__main__":
    main()
