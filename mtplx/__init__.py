"""mtplx: lossless multi-token-prediction speculative decoding for Qwen3.5 / Qwen3.6 / Qwen3-Next."""

__version__ = "0.1.0"

from mtplx.api import GenerationResponse, GenerationResult, Model, generate, generate_batch, load, stream_generate  # noqa: E402
from mtplx.chat_api import ChatReply, chat  # noqa: E402
from mtplx.decoding.params import SamplingParams  # noqa: E402
from mtplx.decoding.stats import GenerationStats  # noqa: E402

__all__ = [
    "__version__",
    "ChatReply",
    "GenerationResponse",
    "GenerationResult",
    "GenerationStats",
    "Model",
    "SamplingParams",
    "chat",
    "generate",
    "generate_batch",
    "load",
    "stream_generate",
]
