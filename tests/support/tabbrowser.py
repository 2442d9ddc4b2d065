"""Real headless Chromium driving the session userscript on a fake arena.ai, for tab mode.

- ``lmgateway fake-arena`` runs over TLS on loopback with a self-signed certificate;
  Chromium maps arena.ai to 127.0.0.1 (--host-resolver-rules) and accepts the certificate.
  Its page's CSP lets the page connect only to itself.
- The script is injected at document start, and ``GM_xmlhttpRequest`` is provided as a
  userscript manager provides it: a function whose request is made outside the page (here
  by the test, through a Playwright binding). Requests of a page that goes away are
  aborted, as a manager aborts them.
- Playwright's async API runs on its own event loop in a thread, so long polls in the
  binding never block the browser; tests call :meth:`Browser.run` from pytest's thread.
- A module gets its fake arena and its browser from :func:`arena_fixtures`.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client as httpclient
import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from support.processes import REQUIRE_ALL, bin_path, free_port, http, require_binary, wait_for

GM_WRAPPER = """(function () {
  var GM_xmlhttpRequest = function (details) {
    window.__lmgwGM(JSON.stringify({method: details.method, url: details.url,
                                    headers: details.headers || {}, data: details.data,
                                    timeout: details.timeout || 0}))
      .then(function (r) {
        if (r.timeout) { if (details.ontimeout) { details.ontimeout({}); } }
        else if (r.error) { if (details.onerror) { details.onerror({error: r.error}); } }
        else if (details.onload) { details.onload({status: r.status, responseText: r.text}); }
      });
  };
  var unsafeWindow = window;
%s
})();
"""


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for arena.ai and its subdomains."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "arena.ai")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("arena.ai"), x509.DNSName("*.arena.ai")]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "arena.key", directory / "arena.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class FakeArenaProcess:
    """``lmgateway fake-arena`` over TLS on a free loopback port."""

    def __init__(self, directory: Path, delay_ms: float = 20) -> None:
        key, cert = make_certificate(directory)
        self.port = free_port()
        self.log_path = directory / f"fake-arena-{self.port}.log"
        endpoint = f"ssl:{self.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [bin_path("lmgateway"), "fake-arena", "--listen", endpoint,
                 "--delay-ms", str(delay_ms)], stdout=log, stderr=subprocess.STDOUT)
        self.origin = f"https://arena.ai:{self.port}"
        wait_for(lambda: self.events() is not None, 15, what="the fake arena")

    def _get(self, path: str):
        import ssl

        connection = httpclient.HTTPSConnection("127.0.0.1", self.port, timeout=5,
                                                 context=ssl._create_unverified_context())
        try:
            connection.request("GET", path, headers={"Host": "arena.ai"})
            return json.loads(connection.getresponse().read())
        except OSError:
            return None
        finally:
            connection.close()

    def script(self, status: int, body: str, *, when: str, content_type: str = "application/json",
               headers: dict | None = None, delay: float = 0.0) -> None:
        """The next call whose message holds ``when`` answers this (once): see
        ``FakeArena.queue_refusal``."""
        import ssl

        connection = httpclient.HTTPSConnection("127.0.0.1", self.port, timeout=5,
                                                 context=ssl._create_unverified_context())
        try:
            connection.request("POST", "/_fake/refuse-next", json.dumps({
                "status": status, "body": body, "when": when, "content_type": content_type,
                "headers": headers or {}, "delay": delay}), headers={"Host": "arena.ai"})
            assert connection.getresponse().status == 200
        finally:
            connection.close()

    def events(self):
        seen = self._get("/_fake/events")
        return None if seen is None else seen["events"]

    def evaluations(self) -> dict:
        return self._get("/_fake/events")["evaluations"]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class Browser:
    """One Chromium, driven from its own thread; ``run(coro)`` waits for a result."""

    def __init__(self, executable: str, arena_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.arena_port = arena_port
        self.browser = self.run(self._launch(executable))

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _launch(self, executable: str):
        from playwright.async_api import async_playwright

        self.playwright = await async_playwright().start()
        return await self.playwright.chromium.launch(executable_path=executable, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--ignore-certificate-errors",
            "--host-resolver-rules=MAP arena.ai 127.0.0.1, MAP *.arena.ai 127.0.0.1, "
            "MAP lmarena.ai 127.0.0.1"])

    def close(self) -> None:
        async def stop():
            await self.browser.close()
            await self.playwright.stop()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.pool.shutdown(wait=False, cancel_futures=True)


class Tab:
    """A browser profile (its own cookies: one arena account) with the script installed."""

    def __init__(self, browser: Browser, script: str, account: str | None) -> None:
        self.browser = browser
        self.script = script
        self.account = account
        self.gm_calls: list[dict] = []
        self.console: list[str] = []
        self.open_calls: dict[int, set] = {}  # page id -> connections of its GM requests
        self.context = None
        self.page = None
        browser.run(self._open())

    async def _open(self):
        self.context = await self.browser.browser.new_context(ignore_https_errors=True)
        await self.context.expose_binding("__lmgwGM", self._gm)
        await self.context.add_init_script(GM_WRAPPER % self.script)
        self.page = await self.context.new_page()
        self.page.on("console", lambda message: self.console.append(message.text))
        self.page.on("framenavigated", lambda frame: self._page_left(frame))
        origin = f"https://arena.ai:{self.browser.arena_port}"
        if self.account:
            await self.page.goto(f"{origin}/_fake/login?account={self.account}")
        else:
            await self.page.goto(f"{origin}/")

    def _page_left(self, frame) -> None:
        """A manager aborts the GM requests of a page that went away."""
        if frame.parent_frame is not None:
            return
        for connection in self.open_calls.pop(id(frame.page), set()):
            try:
                connection.sock and connection.sock.close()
            except OSError:
                pass

    async def _gm(self, source, details_json: str) -> dict:
        details = json.loads(details_json)
        self.gm_calls.append(details)
        page = source["page"]
        timeout = (details.get("timeout") or 30000) / 1000.0
        parts = urlsplit(details["url"])
        connection = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.open_calls.setdefault(id(page), set()).add(connection)

        def send() -> dict:
            try:
                connection.request(details["method"], parts.path + (f"?{parts.query}" if parts.query else ""),
                                   body=(details.get("data") or "").encode(),
                                   headers=details.get("headers") or {})
                response = connection.getresponse()
                return {"status": response.status, "text": response.read().decode()}
            except TimeoutError:
                return {"timeout": True}
            except (OSError, httpclient.HTTPException) as e:
                return {"error": str(e)}
            finally:
                connection.close()
                self.open_calls.get(id(page), set()).discard(connection)

        return await asyncio.get_running_loop().run_in_executor(self.browser.pool, send)

    # --- what a test does with the tab ---

    def badge(self) -> tuple[str, str]:
        async def read():
            element = await self.page.query_selector("#lmarena-gateway-badge")
            if element is None:
                return ("", "")
            return (await element.get_attribute("data-state") or "",
                    await element.inner_text())

        return self.browser.run(read())

    def wait_badge(self, state: str, timeout: float = 20) -> str:
        return wait_for(lambda: self.badge()[1] if self.badge()[0] == state else None,
                        timeout, what=f"the badge to say {state}")

    def reload(self) -> None:
        self.browser.run(self.page.reload())

    def close(self) -> None:
        self.browser.run(self.context.close())


def tabs_of(gateway) -> dict:
    status, _, body = http("GET", gateway.url + "/health")
    assert status == 200
    return body["tabs"]


def arena_fixtures(delay_ms: float = 20):
    """A module's ``arena`` (a :class:`FakeArenaProcess` answering after ``delay_ms``) and
    ``browser`` (one Chromium for it) fixtures, module-scoped: bind them by those names,
    ``arena, browser = arena_fixtures(delay_ms=10)``, and pytest finds them there."""

    @pytest.fixture(scope="module", name="arena")
    def arena(tmp_path_factory):
        """The fake arena.ai over TLS on loopback, its answers' chunks ``delay_ms`` apart."""
        process = FakeArenaProcess(tmp_path_factory.mktemp("arena"), delay_ms=delay_ms)
        yield process
        process.stop()

    @pytest.fixture(scope="module", name="browser")
    def browser(arena):
        """One headless Chromium for the module's tabs, with arena.ai mapped to the fake."""
        try:
            import openai  # noqa: F401  (the tests drive the gateway with it)
            import playwright.async_api  # noqa: F401
        except ImportError:  # the `test` extra installs them
            message = "openai or playwright is not installed (pip install '.[test]')"
            pytest.fail(message) if REQUIRE_ALL else pytest.skip(message)
        chromium = Browser(require_binary("chromium"), arena.port)
        yield chromium
        chromium.close()

    return arena, browser


def script_for(gateway, name: str) -> str:
    """The userscript the gateway serves for session ``name``."""
    status, _, body = http("GET", f"{gateway.url}/userscript/{name}.user.js")
    assert status == 200, body
    return body.decode()
