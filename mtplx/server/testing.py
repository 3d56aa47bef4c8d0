"""Helpers for tests that run a real server process on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess([...args after python -m]) as srv: srv.base_url` - waits for /health."""

    def __init__(self, module_args: list[str], port: int | None = None, startup_timeout: float = 60.0,
                 env: dict | None = None):
        self.port = port or free_port()
        self.args = [sys.executable, "-m", *module_args, "--port", str(self.port)]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                     text=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{out[-4000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server did not answer /health within {self.startup_timeout}s")

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc and self.proc.stdout else ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def sdk_clients(base_url: str, timeout: float = 60.0):
    """The openai and anthropic SDK clients of the tests, in strict response validation (every
    field of every response checked against the SDK's own types), no retries."""
    import anthropic
    import openai

    return (openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=timeout,
                          _strict_response_validation=True),
            anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout,
                                _strict_response_validation=True))
