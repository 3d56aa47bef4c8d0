"""A deterministic stand-in model for server tests (no weights, no backend).

Byte-level "tokenizer"; greedy output is a pure function of the prompt; sampled output a pure
function of (prompt, seed); emits MTP-like cycles of up to depth+1 tokens with fake stats.
Chat prompts are rendered with mtplx's Qwen3.5 template (tools, thinking).

Scripted replies: when the prompt contains `[[reply:TEXT]]` (the last one counts), the model
"generates" exactly TEXT (then EOS), byte by byte in cycles, so tests can make it emit tool
calls, reasoning and malformed markup split at varied token boundaries.
"""

from __future__ import annotations

import codecs
import hashlib
import random
import time
from typing import Iterator

from mtplx.chat.formats import builtin_template
from mtplx.decoding.params import SamplingParams
from mtplx.decoding.stops import StopStrings
from mtplx.server.engine import GenStats, GenStep
from mtplx.tokenizer import Tokenizer

EOS = 256
ALPHABET = "abcdefghijklmnopqrstuvwxyz "


class FakeModel:
    def __init__(self, max_context: int = 512, step_delay_s: float = 0.0, eos_after: int | None = None,
                 model_id: str = "fake-model", fail_on: str | None = None):
        self.model_id = model_id
        self.max_context = max_context
        self.vocab_size = 257
        self.step_delay_s = step_delay_s
        self.eos_after = eos_after
        self.fail_on = fail_on
        self.open_generations = 0  # generations started and not yet closed (cancellation tests)
        self.chat_template = builtin_template("qwen3.5", thinking_default=False)
        self._renderer = Tokenizer(None, chat_template=self.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chat(self, text: str) -> list[int]:
        return self.encode(text)

    def render_chat(self, messages: list[dict], tools=None, **template_kwargs) -> str:
        return self._renderer.apply_chat_template(messages, tools=tools, **template_kwargs)

    def generate(self, prompt_ids: list[int], params: SamplingParams, depth: int) -> Iterator[GenStep]:
        self.open_generations += 1
        try:
            yield from self._generate(prompt_ids, params, depth)
        finally:
            self.open_generations -= 1

    def _generate(self, prompt_ids, params, depth):
        t0 = time.perf_counter()
        if self.fail_on is not None and self.fail_on.encode() in bytes(x for x in prompt_ids if x < 256):
            raise RuntimeError("fake failure /secret/path/model.py line 42")
        h = int.from_bytes(hashlib.sha256(bytes(x % 256 for x in prompt_ids)).digest()[:8], "little")
        prompt = bytes(x for x in prompt_ids if x < 256).decode("utf-8", errors="replace")
        if "[[reply:" in prompt:
            reply = prompt[prompt.rindex("[[reply:") + 8:]
            yield from self._scripted(reply[: reply.index("]]")] if "]]" in reply else reply, h, params, depth, t0,
                                      len(prompt_ids))
            return
        rng = random.Random(params.seed if params.seed is not None else random.random()) if not params.greedy else None
        stats = GenStats(prompt_tokens=len(prompt_ids), depth=depth, drafted_by_depth=[0] * depth,
                         accepted_by_depth=[0] * depth)
        emitted, t_first, stops = 0, None, StopStrings(params.stop)
        while True:
            n = 1 if emitted == 0 else 1 + (h + emitted) % (depth + 1)
            ids = []
            for _ in range(n):
                if self.eos_after is not None and emitted + len(ids) >= self.eos_after and not params.ignore_eos:
                    ids.append(EOS)
                    break
                k = (h + 7 * (emitted + len(ids))) % len(ALPHABET) if rng is None else rng.randrange(len(ALPHABET))
                ids.append(ord(ALPHABET[k]))
            if emitted > 0:
                stats.cycles += 1
                for j in range(depth):
                    stats.drafted_by_depth[j] += 1
                    if j < n - 1:
                        stats.accepted_by_depth[j] += 1
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            finish = None
            if ids and ids[-1] == EOS:
                ids = ids[:-1]
                finish = "stop"
            room = params.max_tokens - emitted
            if len(ids) >= room and finish is None:
                ids = ids[:room]
                finish = "length"
            emitted += len(ids) + (1 if finish == "stop" and self.eos_after is not None else 0)
            delta, finish, stop_seq = _stop_filter(stops, bytes(ids).decode(), finish)
            t_first = _clock(stats, t0, t_first, emitted)
            yield GenStep(text=delta, token_ids=ids, finish_reason=finish, stop_sequence=stop_seq, stats=stats)
            if finish is not None:
                return


    def _scripted(self, reply: str, h: int, params: SamplingParams, depth: int, t0: float,
                  prompt_len: int) -> Iterator[GenStep]:
        data = list(reply.encode("utf-8")) + [EOS]
        decoder = codecs.getincrementaldecoder("utf-8")()
        stats = GenStats(prompt_tokens=prompt_len, depth=depth, drafted_by_depth=[0] * depth, accepted_by_depth=[0] * depth)
        emitted, t_first, stops = 0, None, StopStrings(params.stop)
        while True:
            n = 1 if emitted == 0 else 1 + (h + emitted) % (depth + 1)
            ids = data[emitted: emitted + min(n, params.max_tokens - emitted)]
            finish = "length" if emitted + len(ids) >= params.max_tokens and ids[-1:] != [EOS] else None
            if ids[-1:] == [EOS]:
                ids, finish = ids[:-1], "stop"
            emitted += len(ids) + (finish == "stop")
            stats.cycles += emitted > 0 and stats.generated_tokens > 0
            delta, finish, stop_seq = _stop_filter(stops, decoder.decode(bytes(ids), final=finish is not None), finish)
            t_first = _clock(stats, t0, t_first, emitted)
            yield GenStep(text=delta, token_ids=ids, finish_reason=finish, stop_sequence=stop_seq, stats=stats)
            if finish is not None:
                return


def _stop_filter(stops: StopStrings, text: str, finish: str | None) -> tuple[str, str | None, str | None]:
    """The real stop-string filter on the fake's text -> (text to send, finish reason, stop string)."""
    out, stopped = stops.feed(text)
    if stopped:
        return out, "stop", stops.matched
    return (out + stops.flush() if finish is not None else out), finish, None


def _clock(stats: GenStats, t0: float, t_first: float | None, emitted: int) -> float:
    if t_first is None:
        t_first = time.perf_counter()
        stats.prompt_s = t_first - t0
    stats.decode_s = time.perf_counter() - t_first
    stats.generated_tokens = emitted
    return t_first


def main(argv=None) -> int:
    """`python -m mtplx.server.fake --port N`: a real uvicorn server around FakeModel (tests)."""
    import argparse
    import logging

    import uvicorn

    from mtplx.server.app import create_app

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--max-body", type=int, default=1 << 20)
    p.add_argument("--api-key", default=None)
    p.add_argument("--log-level", default="warning", help="info: one line per request")
    p.add_argument("--eos-after", type=int, default=None, help="end every unscripted reply after N tokens")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(FakeModel(max_context=a.max_context, step_delay_s=a.step_delay, fail_on="FAILNOW",
                               eos_after=a.eos_after),
                     depth=a.depth, max_queue=a.max_queue, parallel=a.parallel, max_body=a.max_body,
                     api_key=a.api_key)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", server_header=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
