"""Simon Willison's ``llm`` CLI as its users set it up: models in ``extra-openai-models.yaml``
(with the session in its ``headers:``), run as a command against a real gateway on
loopback whose two sessions are on two fake bridges, so the printed words tell which
session served it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from twisted.internet.threads import deferToThread

from lmarena_gateway.fakebridge import TEXT

from support.client import sessions_on_two_bridges
from support.processes import REQUIRE_ALL, bin_path

pytestmark = pytest.mark.process

ALPHA_TEXT = "Team alpha's bridge wrote this for llm, four chunks through the gateway."


def llm_binary() -> str:
    path = bin_path("llm")
    if not os.access(path, os.X_OK):
        message = "llm is not installed (pip install '.[test]')"
        pytest.fail(message) if REQUIRE_ALL else pytest.skip(message)
    return path


def configure(directory: Path, url: str) -> dict[str, str]:
    """``llm``'s user directory with the gateway's models, as docs/clients.rst says."""
    models = [
        {"model_id": "arena", "model_name": "gpt-4", "api_base": url + "/v1",
         "headers": {"X-Session-Name": "team-alpha"}},
        {"model_id": "arena-responses", "model_name": "gpt-4", "api_base": url + "/v1",
         "headers": {"X-Session-Name": "team-alpha"}, "responses": True},
        {"model_id": "arena-default", "model_name": "gpt-4", "api_base": url + "/v1"},
        {"model_id": "arena-down", "model_name": "fake-error-503", "api_base": url + "/v1",
         "headers": {"X-Session-Name": "team-alpha"}},
    ]
    (directory / "extra-openai-models.yaml").write_text(yaml.safe_dump(models))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return dict(env, LLM_USER_PATH=str(directory))


def run_llm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([llm_binary(), *args], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def llm_user_path(tmp_path) -> Path:
    llm_binary()
    directory = tmp_path / "llm"
    directory.mkdir()
    return directory


@pytest_twisted.ensureDeferred
async def test_llm_prompt_streamed_and_not(gateway_factory, listen, reactor, llm_user_path):
    gw, alpha = await sessions_on_two_bridges(gateway_factory, listen, reactor, "team-alpha",
                                              ALPHA_TEXT, {"gpt-4": "fake-model"})
    env = configure(llm_user_path, gw.url)
    for flags in ([], ["--no-stream"]):
        result = await deferToThread(run_llm, env, "-m", "arena", *flags, "Hello!")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == ALPHA_TEXT
    assert [(s["path"], s["body"].get("stream"), s["body"]["model"]) for s in alpha.seen] == [
        ("/v1/chat/completions", True, "fake-model"),
        ("/v1/chat/completions", False, "fake-model")]
    assert alpha.seen[0]["body"]["messages"][-1] == {"role": "user", "content": "Hello!"}
    assert gw.bridge.seen == []  # the headers: setting chose team-alpha's bridge
    # without headers: the session "default"
    result = await deferToThread(run_llm, env, "-m", "arena-default", "Hello!")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == TEXT
    assert [s["path"] for s in gw.bridge.seen] == ["/v1/chat/completions"]


@pytest_twisted.ensureDeferred
async def test_llm_over_the_responses_api(gateway_factory, listen, reactor, llm_user_path):
    gw, alpha = await sessions_on_two_bridges(gateway_factory, listen, reactor, "team-alpha",
                                              ALPHA_TEXT, {"gpt-4": "fake-model"})
    env = configure(llm_user_path, gw.url)
    for flags in ([], ["--no-stream"]):
        result = await deferToThread(run_llm, env, "-m", "arena-responses", *flags, "Hello!")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == ALPHA_TEXT
    # /v1/responses, translated onto the chat path of the session's bridge
    assert [s["path"] for s in alpha.seen] == ["/v1/chat/completions"] * 2
    assert gw.bridge.seen == []


@pytest_twisted.ensureDeferred
async def test_llm_shows_the_gateways_error(gateway_factory, listen, reactor, llm_user_path):
    gw, alpha = await sessions_on_two_bridges(gateway_factory, listen, reactor, "team-alpha",
                                              ALPHA_TEXT)
    env = configure(llm_user_path, gw.url)
    result = await deferToThread(run_llm, env, "-m", "arena-down", "Hello!")
    assert result.returncode != 0
    # llm prints the envelope's message (not its code), the one line a user sees
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Error code: 503 - bridge: Browser client not connected; "
        "open LMArena with the userscript running.")
    assert len(alpha.seen) == 1  # x-should-retry: false: the openai client did not retry
