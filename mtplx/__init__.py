"""mtplx: lossless multi-token-prediction speculative decoding for Qwen3.5 / Qwen3.6 / Qwen3-Next."""

__version__ = "0.1.0"
