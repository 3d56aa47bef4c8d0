"""The real model behind the server: `mtplx.load` + `mtplx.stream_generate`, seen as a ModelAdapter."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

from mtplx.decoding.params import SamplingParams
from mtplx.server.engine import GenStats, GenStep


class PromptError(ValueError):
    """The request's prompt cannot be built (no chat template, bad token ids...): a 400."""


def _stats(s) -> GenStats:  # mtplx.decoding.stats.GenerationStats -> GenStats
    return GenStats(prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens,
                    cache_write_tokens=s.cache_write_tokens, batch_size_sum=s.batch_size_sum,
                    generated_tokens=s.generation_tokens,
                    prompt_s=s.prompt_time_s, decode_s=s.generation_time_s, depth=s.depth,
                    cycles=s.verify_passes, drafted_by_depth=list(s.drafted), accepted_by_depth=list(s.accepted))


class MtplxModelAdapter:
    def __init__(self, model, max_context: int | None = None, model_id: str | None = None,
                 draft_cutoff: float = 0.0, chat_template: str | None = None, prefill_block: int | None = None):
        if model.tokenizer is None:
            raise ValueError(f"{model.path} has no tokenizer.json: the server needs a tokenizer to read text")
        self.model = model
        self.tokenizer = model.tokenizer
        if chat_template is not None:  # --chat-template replaces the checkpoint's
            self.tokenizer.chat_template, self.tokenizer._template = chat_template, None
        self.chat_template = self.tokenizer.chat_template
        self.model_id = model_id or (Path(model.path).name if model.path else "mtplx-model")
        self.max_context = min(model.max_context, max_context) if max_context else model.max_context
        self._cap_context = max_context is not None and max_context < model.max_context
        self.vocab_size = int(model.config.vocab_size)
        SamplingParams(draft_cutoff=draft_cutoff).validate()
        self.draft_cutoff = draft_cutoff  # the server's adaptive draft length, for every request
        self.prefix_cache = model.prefix_cache  # mtplx.prefix.PrefixCache or None (off)
        self.prefill_block = prefill_block  # with the cache off too: the output must not depend on it

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, **template_kwargs)
        except Exception as e:  # TokenizerError (no template, template raised), jinja errors
            raise PromptError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    def encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        try:
            return self.model.encode_prompt(text)
        except Exception as e:
            raise PromptError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    def new_generation(self, prompt_ids: list[int], params: SamplingParams, depth: int):
        """A Generation (mtplx/decoding/loop.py) on a fresh session, for the engine's batch runner."""
        from mtplx.decoding.loop import Generation

        if self.draft_cutoff and not params.draft_cutoff:
            params = replace(params, draft_cutoff=self.draft_cutoff)
        session = self.model.new_session(max_context=self.max_context if self._cap_context else None,
                                         prefill_block=self.prefill_block)
        detok = self.tokenizer.detokenizer()
        return Generation(session, list(prompt_ids), params, depth, eos_token_ids=self.model.eos_token_ids,
                          detokenizer=detok)

    def compile_json(self, schema: dict | None):
        """A JSON grammar (mtplx.decoding.grammar) for this model's tokenizer; GrammarError if invalid."""
        from mtplx.decoding.grammar import compile_json

        return compile_json(self.tokenizer, self.vocab_size, self.model.eos_token_ids, schema)

    def compile_lark(self, lark: str):
        from mtplx.decoding.grammar import compile_lark

        return compile_lark(self.tokenizer, self.vocab_size, self.model.eos_token_ids, lark)

    @staticmethod
    def gen_step(step) -> GenStep:  # mtplx.decoding.loop.GenerationStep -> GenStep
        lps = None if step.logprob is None else [(step.token_id, step.logprob, step.top_logprobs or [])]
        return GenStep(text=step.text, token_ids=[step.token_id], finish_reason=step.finish_reason,
                       stop_sequence=step.stop if isinstance(step.stop, str) else None, stats=_stats(step.stats),
                       logprobs=lps, prompt_logprobs=getattr(step, "prompt_logprobs", None))

    def generate(self, prompt_ids: list[int], params: SamplingParams, depth: int) -> Iterator[GenStep]:
        """The same generation alone (a generator of GenSteps), for callers without a batch runner."""
        g = self.new_generation(prompt_ids, params, depth)
        while not g.prefill_block():
            pass
        yield self.gen_step(g.start())
        while not g.finished:
            for st in g.finish_cycle(g.session.verify(g.draft())):
                yield self.gen_step(st)


def load_adapter(path: str | None, backend: str | None = None, dtype: str | None = None, depth: int | None = None,
                 max_context: int | None = None, model_id: str | None = None,
                 threads: int | None = None, draft_cutoff: float = 0.0, chat_template: str | None = None,
                 prefix_cache: dict | None = None, batch_threads: int | None = None,
                 **load_options) -> tuple[MtplxModelAdapter, int]:
    """Load a checkpoint (None: the embedded default) -> (adapter, MTP depth to serve with).
    prefix_cache: Model.enable_prefix_cache's arguments (gb 0: off; block applies either way)."""
    import mtplx.api as api

    model = api.load(path, backend=backend, dtype=dtype, **load_options)
    if model.backend == "torch" and threads is None:  # small CPU models: 1 thread (see loader)
        from mtplx.backends.torch.loader import apply_default_threads

        apply_default_threads(model.model)
    depth = api.resolve_depth(model, depth)
    tp = model.load_options.get("tp", 1)
    if model.backend == "torch" and tp == 1:  # batched verifies on more cores, when that keeps the bits (measured)
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # one core stays with the HTTP side: on 2 cores, 2 verify threads next to the event loop
        # measured 0.63x the aggregate of 1 (the OpenMP workers wait for a busy core)
        model.model.set_batch_threads(cores - 1 if batch_threads is None else batch_threads)
    opts = dict(prefix_cache or {})
    if opts.get("gb", 0) > 0:  # after the thread count is set: it is part of a disk cache's identity
        model.enable_prefix_cache(**opts)
    adapter = MtplxModelAdapter(model, max_context=max_context, model_id=model_id, draft_cutoff=draft_cutoff,
                                chat_template=chat_template, prefill_block=opts.get("block"))
    return adapter, depth


def real_engine_available() -> bool:
    try:
        import torch  # noqa: F401

        import mtplx.api as api

        return hasattr(api, "load") and hasattr(api, "stream_generate")
    except ImportError:
        return False


def write_test_checkpoint(out_dir, preset: str = "qwen3.5-35b-a3b") -> Path:
    """A tiny random MoE checkpoint with an MTP head and a tokenizer whose chat template is mtplx's
    Qwen3.5 one (tools; thinking off unless asked) - server tests."""
    import json

    from mtplx.chat.formats import builtin_template
    from mtplx.checkpoint.synthetic import write_synthetic_checkpoint

    ck = write_synthetic_checkpoint(Path(out_dir) / "tiny-moe", preset, tokenizer=True, seed=0)
    cfg_path = Path(ck.path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = builtin_template("qwen3.5", thinking_default=False)
    cfg_path.write_text(json.dumps(cfg))
    return Path(ck.path)
