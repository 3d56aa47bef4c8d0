"""Bounded schema fuzzing (schemathesis) of a real server process (FakeModel, so every case is fast):
no input may produce a 5xx, every 4xx carries an API-shaped error body. The server requires an
API key, so the SDKs' own auth headers are checked here too (openai: Bearer, anthropic: x-api-key)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from mtplx.server.testing import ServerProcess

try:
    import schemathesis
    from schemathesis.checks import (
        content_type_conformance, negative_data_rejection, not_a_server_error, status_code_conformance,
    )
except ImportError:  # pip install schemathesis (the fuzz test is skipped without it)
    schemathesis = None

KEY = "test-key-123"
_srv = ServerProcess(["mtplx.server.fake", "--max-context", "128", "--max-body", str(256 * 1024), "--api-key", KEY])


@pytest.fixture(scope="module")
def server_url():
    with _srv:
        yield _srv.base_url


def _load():
    from mtplx.server.app import create_app
    from mtplx.server.fake import FakeModel

    return schemathesis.openapi.from_dict(create_app(FakeModel()).openapi())  # the served document


def api_shaped_errors(ctx, response, case):
    if response.status_code >= 400:
        body = response.json()
        if case.path.startswith("/v1/messages"):
            assert body["type"] == "error" and body["error"]["message"], body
        else:
            assert body["error"]["message"], body
        assert "Traceback" not in response.text


if schemathesis is not None:
    schema = _load()
    # bounded: hypothesis fuzzing (positive and negative data) only; the coverage phase's exhaustive
    # boundary cases are not bounded by max_examples
    schema.config.phases.coverage.enabled = False

    @schema.parametrize()
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def test_fuzz_openapi(case, server_url):
        if case.path == "/metrics":
            pytest.skip("text exposition, not JSON")
        case.call_and_validate(base_url=server_url, timeout=30, headers={"Authorization": f"Bearer {KEY}"},
                               checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                       negative_data_rejection, api_shaped_errors])
else:
    def test_fuzz_openapi():
        pytest.skip("schemathesis is not installed (pip install schemathesis)")


def test_sdk_auth_headers(server_url):
    import anthropic
    import httpx
    import openai

    ok = openai.OpenAI(base_url=server_url + "/v1", api_key=KEY, max_retries=0, _strict_response_validation=True)
    assert ok.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=server_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    a = anthropic.Anthropic(base_url=server_url, api_key=KEY, max_retries=0, _strict_response_validation=True)
    assert a.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}]).usage
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server_url, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(server_url + "/health").status_code == 200  # open for load balancers
    assert httpx.get(server_url + "/metrics").status_code == 401
