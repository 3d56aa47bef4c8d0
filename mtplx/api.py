"""The Python API.

    import mtplx
    model = mtplx.load("path/to/checkpoint")            # None: the embedded default model
    for r in mtplx.stream_generate(model, "Hello", mtplx.SamplingParams(max_tokens=64), depth=3):
        print(r.text, end="", flush=True)                # r.token, r.from_draft, r.stats, ...
    result = mtplx.generate(model, [{"role": "user", "content": "Hi"}], depth=2)
    result.text, result.token_ids, result.finish_reason, result.stats
    results = mtplx.generate(model, ["def f(", "import os"])  # batched: a list of results

A prompt is a string (tokenized as is), a list of token ids, or a list of chat messages
(dicts with role/content: rendered with the checkpoint's chat template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mtplx.decoding.loop import GenerationStep, generate_steps
from mtplx.decoding.params import SamplingParams
from mtplx.decoding.stats import GenerationStats

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
BACKENDS = ("torch", "mlx")


def default_model_path() -> Path | None:
    """The embedded default model folder, or None when this install has none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def default_backend() -> str:
    """mlx on Apple Silicon when mlx + mlx-lm are installed, torch otherwise (mtplx.backends)."""
    from mtplx.backends import default_backend as _default

    return _default()


@dataclass
class Model:
    """A loaded checkpoint: backend model, config, tokenizer (None when the folder has none)."""

    backend: str
    model: Any
    config: Any  # mtplx.checkpoint.config.ModelConfig
    tokenizer: Any  # mtplx.tokenizer.Tokenizer | None
    path: Path | None
    dtype: str
    device: str
    prefix_cache: Any = None  # mtplx.prefix.PrefixCache shared by this model's sessions, or None
    load_options: dict = field(default_factory=dict)  # what `load` was given (part of the cache identity)

    @property
    def has_mtp(self) -> bool:
        return getattr(self.model, "mtp", None) is not None

    @property
    def eos_token_ids(self) -> list[int]:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return list(self.tokenizer.eos_token_ids)
        return list(getattr(self.config, "eos_token_id", []) or [])

    @property
    def max_context(self) -> int:
        return int(self.config.max_position_embeddings)

    def new_session(self, max_context: int | None = None, prefix_cache: Any = "model",
                    prefill_block: int | None = None):
        """A fresh Session (one sequence) on this model. prefix_cache: "model" (this model's,
        see enable_prefix_cache), None (none) or a PrefixCache; prefill_block: the prefill's
        block size without a cache (with one, the cache's)."""
        if isinstance(prefix_cache, str):
            prefix_cache = self.prefix_cache
        opts = dict(max_context=max_context, prefix_cache=prefix_cache, prefill_block=prefill_block)
        if self.backend == "torch":
            from mtplx.backends.torch.session import TorchSession

            return TorchSession(self.model, **opts)
        if self.backend == "mlx":
            from mtplx.backends.mlx.session import MlxSession

            return MlxSession(self.model, **opts)
        raise ValueError(f"backend {self.backend!r} has no session implementation yet; use --backend torch")

    def enable_prefix_cache(self, gb: float = 4.0, block: int | None = None, ttl_s: float | None = None,
                            cache_dir: str | Path | None = None, disk_gb: float | None = None):
        """Give this model's sessions a prefix cache of `gb` GB (mtplx.prefix): prompts that start
        like an earlier one restore its blocks instead of prefilling them, with the same output.
        cache_dir adds the disk tier (kept across restarts). Returns the PrefixCache."""
        from mtplx.prefix import make_prefix_cache

        self.prefix_cache = make_prefix_cache(self, gb=gb, block=block, ttl_s=ttl_s, cache_dir=cache_dir,
                                              disk_gb=disk_gb)
        return self.prefix_cache

    def encode_prompt(self, prompt: str | list, chat_kwargs: dict | None = None) -> list[int]:
        """str -> tokens; list[int] -> as is; list[dict] (chat messages) -> chat template."""
        if isinstance(prompt, str):
            return self._tok("a text prompt").encode(prompt)
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self._tok("chat messages").encode_chat(prompt, **(chat_kwargs or {}))
        if not all(isinstance(t, int) or hasattr(t, "__index__") for t in prompt):
            raise ValueError("prompt must be a string, a list of token ids, or a list of chat messages")
        ids = [int(t) for t in prompt]
        V = int(self.config.vocab_size)
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{V - 1})")
        return ids

    def _tok(self, what: str):
        if self.tokenizer is None:
            where = self.path or "this checkpoint"
            raise ValueError(f"{what} needs a tokenizer, and {where} has no tokenizer.json: pass token ids instead")
        return self.tokenizer


def load(path: str | Path | None = None, backend: str | None = None, dtype: str | None = None,
         device: str | None = None, **options) -> Model:
    """Load a checkpoint folder (None: the embedded default model) on a backend.

    `options` go to the backend's loader (torch: e.g. quantize="int8", kernel="auto",
    mtp_hidden="pre"; see mtplx.backends.torch.loader.load_torch_model). tp=N: tensor parallel
    over N processes, this one rank 0 (torch: the others spawned here or torchrun's; MLX: under
    mlx.launch; docs/tensor-parallel.md); `model.model.close()` stops the other ranks."""
    if path is None:
        path = default_model_path()
        if path is None:
            raise FileNotFoundError(
                f"no model given and the embedded default model is not installed ({DEFAULT_MODEL_DIR}): "
                f"pass a checkpoint folder (--model DIR / mtplx.load(path))"
            )
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder: give the checkpoint folder holding config.json")
    backend = backend or default_backend()
    from mtplx.backends import require_backend

    require_backend(backend)  # ValueError for an unknown name, BackendUnavailable (what to install)
    from mtplx.checkpoint.config import load_config

    cfg = load_config(path)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from mtplx.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
    tp = int(options.pop("tp", None) or 1)
    if backend == "torch":
        import torch

        from mtplx.backends.torch.loader import load_torch_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bfloat16" if device != "cpu" else "float32")
        if tp > 1:  # tensor parallel: this process is rank 0 (mtplx.backends.torch.tp)
            from mtplx.backends.torch.tp_launch import load_parallel

            m = load_parallel(path, tp, dtype, device, threads=options.pop("tp_threads", None), **options)
            return Model("torch", m, cfg, tokenizer, path, str(m.dtype).replace("torch.", ""), str(device),
                         load_options=dict(options, tp=tp))
        options.pop("tp_threads", None)
        m = load_torch_model(path, dtype=dtype, device=device, config=cfg, **options)
        return Model("torch", m, cfg, tokenizer, path, str(m.dtype).replace("torch.", ""), str(device),
                     load_options=dict(options))
    options.pop("tp_threads", None)
    from mtplx.backends.mlx import default_dtype, device_name, load_mlx_model

    torch_only = sorted(set(options) & {"quantize", "kernel", "draft_lm_head"})
    if torch_only:
        raise ValueError(f"{', '.join(torch_only)}: torch backend options; the MLX backend takes "
                         f"quantized checkpoints as they are (drop the option or use --backend torch)")

    if tp > 1:  # under mlx.launch: this process is rank 0 (mtplx.backends.mlx.tp)
        from mtplx.backends.mlx.tp import load_parallel as load_mlx_parallel

        m = load_mlx_parallel(path, tp, dtype=dtype or default_dtype(), config=cfg, **options)
        return Model("mlx", m, cfg, tokenizer, path, str(m.dtype).replace("mlx.core.", ""), device_name(),
                     load_options=dict(options, tp=tp))
    m = load_mlx_model(path, dtype=dtype or default_dtype(), config=cfg, **options)
    return Model("mlx", m, cfg, tokenizer, path, str(m.dtype).replace("mlx.core.", ""), device_name(),
                 load_options=dict(options))


@dataclass
class GenerationResponse:
    """One streamed token (mlx-lm's GenerationResponse, plus MTP fields)."""

    text: str  # text delta released with this token ("" while held back)
    token: int
    from_draft: bool  # accepted MTP draft (True) or sampled by the target (False)
    finish_reason: str | None  # None, "stop" or "length"
    stats: GenerationStats  # running
    stop: str | int | None = None  # the stop string or stop/EOS id that ended the generation

    @property
    def prompt_tokens(self) -> int:
        return self.stats.prompt_tokens

    @property
    def generation_tokens(self) -> int:
        return self.stats.generation_tokens

    @property
    def prompt_tps(self) -> float:
        return self.stats.prompt_tps

    @property
    def generation_tps(self) -> float:
        return self.stats.generation_tps

    @property
    def peak_memory(self) -> float:  # GB
        return self.stats.peak_memory_gb


@dataclass
class GenerationResult:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    stats: GenerationStats
    from_draft: list[bool] = field(default_factory=list)
    stop: str | int | None = None

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stop": self.stop,
            "stats": self.stats.to_dict(),
        }


def resolve_depth(model: Model, depth: int | None) -> int:
    """The depth to run: `depth` if given, else what `mtplx tune` kept for this model and machine,
    else 3 with an MTP head, else 0. A positive depth without a head is a user error."""
    if depth is None:
        try:
            from mtplx.tuning import tuned_depth

            depth = tuned_depth(model)
        except Exception:  # noqa: BLE001 - no tuning cache or an unreadable one: the default
            depth = None
        if depth is None or depth < 0 or (depth > 0 and not model.has_mtp):
            depth = 3 if model.has_mtp else 0
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if depth > 0 and not model.has_mtp:
        raise ValueError(
            f"depth {depth} needs an MTP head and {model.path or 'this model'} has none: "
            f"use depth 0, or graft a head (mtplx graft)"
        )
    return depth


def _resolve(model: Model, params: SamplingParams | None, depth: int | None) -> tuple[SamplingParams, int]:
    return params or SamplingParams(), resolve_depth(model, depth)


def stream_generate(model: Model, prompt: str | list, params: SamplingParams | None = None,
                    depth: int | None = None, *, session=None, chat_kwargs: dict | None = None
                    ) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per emitted token. depth None: the depth `mtplx tune` kept for
    this model, else 3 with an MTP head, else 0."""
    params, depth = _resolve(model, params, depth)
    ids = model.encode_prompt(prompt, chat_kwargs)
    session = session or model.new_session()
    detok = model.tokenizer.detokenizer() if model.tokenizer is not None else None
    step: GenerationStep
    for step in generate_steps(session, ids, params, depth, eos_token_ids=model.eos_token_ids, detokenizer=detok):
        yield GenerationResponse(step.text, step.token_id, step.from_draft, step.finish_reason, step.stats, step.stop)


def _is_batch(prompt) -> bool:
    """A list of prompts (strings, token-id lists or message lists), not one prompt."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], (str, list, tuple))


def generate_batch(model: Model, prompts: list, params: SamplingParams | list | None = None, depth: int | None = None,
                   *, chat_kwargs: dict | None = None, max_batch: int = 8) -> list[GenerationResult]:
    """Generate for several prompts at once (mtplx.decoding.batch: up to `max_batch` share every
    verify forward); each result is the one `generate` gives for its prompt alone. `params` is
    one SamplingParams for all or a list, one per prompt."""
    from mtplx.decoding.batch import BatchRunner
    from mtplx.decoding.loop import Generation

    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams: give one, or one per prompt")
    jobs = []
    for prompt, p in zip(prompts, plist):
        p, d = _resolve(model, p, depth)
        ids = model.encode_prompt(prompt, chat_kwargs)
        detok = model.tokenizer.detokenizer() if model.tokenizer is not None else None
        jobs.append((ids, p, d, detok))
    runner = BatchRunner(max_batch=max_batch)
    steps: dict[int, list] = {i: [] for i in range(len(jobs))}
    waiting = list(range(len(jobs)))
    while waiting or len(runner):
        while waiting and runner.free:
            i = waiting.pop(0)
            ids, p, d, detok = jobs[i]
            runner.add(i, Generation(model.new_session(), ids, p, d, eos_token_ids=model.eos_token_ids,
                                     detokenizer=detok))
        for i, st in runner.step():
            steps[i].append(st)
    out = []
    for i, (ids, *_rest) in enumerate(jobs):
        st = steps[i]
        out.append(GenerationResult("".join(x.text for x in st), ids, [x.token_id for x in st], st[-1].finish_reason,
                                    st[-1].stats, [x.from_draft for x in st], st[-1].stop))
    return out


def generate(model: Model, prompt: str | list, params: SamplingParams | None = None, depth: int | None = None,
             *, chat_kwargs: dict | None = None) -> GenerationResult | list[GenerationResult]:
    """Run a whole generation -> GenerationResult (text, ids, finish reason, stats). A list of
    prompts (strings, token-id lists or message lists) runs batched -> a list of results, each
    the same as its prompt alone (see generate_batch)."""
    if _is_batch(prompt):
        return generate_batch(model, list(prompt), params, depth, chat_kwargs=chat_kwargs)
    params, depth = _resolve(model, params, depth)
    ids = model.encode_prompt(prompt, chat_kwargs)
    texts, toks, drafts = [], [], []
    last = None
    for r in stream_generate(model, ids, params, depth):
        texts.append(r.text)
        toks.append(r.token)
        drafts.append(r.from_draft)
        last = r
    return GenerationResult("".join(texts), ids, toks, last.finish_reason, last.stats, drafts, last.stop)
