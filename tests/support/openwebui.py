"""Open WebUI (``open-webui serve``) from its own venv, offline, on a free loopback port.

Open WebUI brings torch and sentence-transformers, so it lives in ``.venv-openwebui``
(made by .ci/run from .ci/openwebui.txt), away from the test venv; ``LMGW_OPENWEBUI``
names another ``open-webui`` binary.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from support.processes import REQUIRE_ALL, free_port, http, wait_for

REPO = Path(__file__).resolve().parent.parent.parent
# Its first start migrates a fresh database and imports torch: tens of seconds, more on a
# loaded machine.
STARTUP_SECONDS = 240.0


def open_webui_binary() -> Path:
    path = Path(os.environ.get("LMGW_OPENWEBUI") or REPO / ".venv-openwebui" / "bin" / "open-webui")
    if not os.access(path, os.X_OK):
        message = f"open-webui is not installed at {path} (.ci/run installs it from .ci/openwebui.txt)"
        pytest.fail(message) if REQUIRE_ALL else pytest.skip(message)
    return path


def settings(data_dir: Path, base_url: str, headers: dict[str, str]) -> dict[str, str]:
    """The environment of an Open WebUI that talks only to the gateway and to nothing
    else: no login, no Ollama, no model downloads, none of its side turns."""
    return {
        "DATA_DIR": str(data_dir),
        "WEBUI_AUTH": "False",  # a single admin user, no login page
        "WEBUI_SECRET_KEY": "lmgw-test-secret",
        "ENABLE_PERSISTENT_CONFIG": "False",  # these variables win over its database
        "ENABLE_OLLAMA_API": "False",
        # OPENAI_API_BASE_URLS keeps a trailing slash (OPENAI_API_BASE_URL drops it), so
        # this connection sends /v1//chat/completions, as a user's pasted URL does.
        "OPENAI_API_BASE_URLS": base_url,
        "OPENAI_API_KEYS": "sk-open-webui",
        "OPENAI_API_CONFIGS": json.dumps({"0": {"headers": headers}}),
        # Each of these is one more LMArena turn per message in the same conversation.
        "ENABLE_TITLE_GENERATION": "False",
        "ENABLE_TAGS_GENERATION": "False",
        "ENABLE_FOLLOW_UP_GENERATION": "False",
        "ENABLE_AUTOCOMPLETE_GENERATION": "False",
        "ENABLE_RETRIEVAL_QUERY_GENERATION": "False",
        # Offline: no hub, no embedding model (it logs that it has none), no update check.
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
        "RAG_RERANKING_MODEL_AUTO_UPDATE": "False",
        "BYPASS_EMBEDDING_AND_RETRIEVAL": "True",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
        "ANONYMIZED_TELEMETRY": "False",
        "SCARF_NO_ANALYTICS": "true",
        "DO_NOT_TRACK": "true",
    }


class OpenWebUI:
    """One ``open-webui serve`` process; ``url`` once :meth:`wait_ready` returned."""

    def __init__(self, directory: Path, base_url: str, headers: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "open-webui.log"
        data_dir = directory / "open-webui-data"
        data_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_"))}
        env.update(settings(data_dir, base_url, headers))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(open_webui_binary()), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=directory)

    def wait_ready(self, timeout: float = STARTUP_SECONDS) -> None:
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"open-webui exited with {self.process.returncode}:\n"
                                     + self.log()[-4000:])
            try:
                return http("GET", self.url + "/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, interval=0.5, what="open-webui's /health")

    def sign_in(self, ui: dict) -> str:
        """Sign in as the admin user it makes without auth, save its interface settings
        (``ui``), and return the token, so the page opens as that user already set up."""
        status, _, answer = http("POST", self.url + "/api/v1/auths/signin",
                                 {"email": "", "password": ""})
        assert status == 200, answer
        token = answer["token"]
        status, _, saved = http("POST", self.url + "/api/v1/users/user/settings/update",
                                {"ui": ui}, {"Authorization": f"Bearer {token}"})
        assert status == 200, saved
        return token

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
