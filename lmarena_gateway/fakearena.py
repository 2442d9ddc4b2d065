"""``lmgateway fake-arena``: a stand-in for arena.ai, as fake-bridge is for the bridge.

It serves a page with a model list (embedded as the real page embeds ``initialModels``)
and a reCAPTCHA stub, under a CSP that lets the page connect only to itself, plus the two
streaming calls with the checks the real ones make: an account cookie, UUIDv7 ids used
once, fresh single-use reCAPTCHA tokens, and evaluations owned by their account.

Sign in with ``/_fake/login?account=NAME``. ``GET /_fake/events`` shows what it saw (tests
read it). Words in the user's message trigger LMArena's refusals: see ``TRIGGERS``.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()
COOKIE = b"arena-auth-prod-v1"
SITE_KEY = "6LfakeArenaSiteKeyForTheGatewayTests00"
TOKEN_LIFETIME = 120.0
MODELS = [
    {"id": "0199e8a0-0000-7000-8000-000000000001", "publicName": "fake-chat",
     "organization": "fake", "provider": "fake",
     "capabilities": {"inputCapabilities": {"text": True}, "outputCapabilities": {"text": True}}},
    {"id": "0199e8a0-0000-7000-8000-000000000002", "publicName": "fake-reasoner",
     "organization": "fake", "provider": "fake",
     "capabilities": {"inputCapabilities": {"text": True},
                      "outputCapabilities": {"text": True, "reasoning": True}}},
    {"id": "0199e8a0-0000-7000-8000-000000000003", "publicName": "fake-image",
     "organization": "fake", "provider": "fake",
     "capabilities": {"inputCapabilities": {"text": True}, "outputCapabilities": {"image": True}}},
    {"id": "0199e8a0-0000-7000-8000-000000000004", "publicName": "fake-search",
     "organization": "fake", "provider": "fake",
     "capabilities": {"inputCapabilities": {"text": True}, "outputCapabilities": {"search": True}}},
]
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
CSP = (b"default-src 'self'; script-src 'self' 'unsafe-inline'; connect-src 'self'; "
       b"img-src 'self' data:; style-src 'self' 'unsafe-inline'")
# Words in the message that make the fake arena refuse as the real one does.
TRIGGERS = {
    "[[challenge]]": (403, "text/html", "<!DOCTYPE html><html><head><title>Just a moment..."
                                        "</title></head><body>Checking your browser</body></html>"),
    "[[ratelimit]]": (429, "application/json", '{"error":"Too many requests"}'),
    "[[tos]]": (422, "application/json", '{"error":"Request rejected: Content violates our '
                                         'terms of use"}'),
    "[[schema]]": (400, "application/json", '{"success":false,"error":{"issues":[{"path":'
                                            '["userMessage","content"],"message":"Required"}]}}'),
}

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>LMArena (fake)</title>
<script src="/recaptcha/enterprise.js?render={site_key}"></script>
</head><body><main><h1>LMArena (fake)</h1><p>Signed in as <b id="account">{account}</b>.</p>
</main>
<script>self.__next_f=self.__next_f||[];self.__next_f.push([1,{payload}])</script>
</body></html>
"""

_RECAPTCHA = """(function () {
  function execute(key, options) {
    return fetch("/_fake/recaptcha", {method: "POST", credentials: "include",
      body: JSON.stringify({key: key, action: options && options.action})})
      .then(function (r) { return r.json(); }).then(function (d) { return d.token; });
  }
  window.grecaptcha = {enterprise: {ready: function (cb) { setTimeout(cb, 0); },
                                    execute: execute}};
})();
"""


def _line(code: str, value) -> bytes:
    return f"a{code}:{json.dumps(value)}\n".encode()


class FakeArena:
    app = Klein()

    def __init__(self, clock, *, delay: float = 0.02, chunks: int = 6) -> None:
        self.clock = clock
        self.delay = delay
        self.chunks = chunks
        self.tokens: dict[str, dict] = {}
        self.used_ids: set[str] = set()
        self.evaluations: dict[str, dict] = {}  # id -> {"account", "turns"}
        self.events: list[dict] = []
        self.refuse_next: list[dict] = []  # tests script answers here (see queue_refusal)

    def _event(self, **fields) -> dict:
        fields["at"] = self.clock.seconds()
        self.events.append(fields)
        return fields

    def _account(self, request) -> str | None:
        value = request.getCookie(COOKIE)
        return value.decode("latin-1") if value else None

    # --- the page ---

    @app.route("/", methods=["GET"])
    def page(self, request):
        account = self._account(request) or "(nobody)"
        payload = json.dumps('7:["$","main",null,' + json.dumps(
            {"initialModels": MODELS, "initialModelAId": MODELS[0]["id"]}) + "]")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", CSP)
        return _PAGE.format(site_key=SITE_KEY, account=account,
                            payload=payload.replace("<", "\\u003c")).encode()

    @app.route("/_fake/login", methods=["GET"])
    def login(self, request):
        account = request.args.get(b"account", [b"alice"])[0].decode("latin-1")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", account):
            request.setResponseCode(400)
            return b"account: 1-32 of A-Z a-z 0-9 _ -"
        request.addCookie(COOKIE, account.encode(), path=b"/", httpOnly=True, secure=True,
                          sameSite="lax")
        request.redirect(b"/")
        return b""

    @app.route("/recaptcha/enterprise.js", methods=["GET"])
    def recaptcha_script(self, request):
        request.setHeader(b"Content-Type", b"text/javascript")
        return _RECAPTCHA.encode()

    @app.route("/_fake/recaptcha", methods=["POST"])
    def mint(self, request):
        body = json.loads(request.content.read() or b"{}")
        token = secrets.token_urlsafe(24)
        self.tokens[token] = {"at": self.clock.seconds(), "action": body.get("action"),
                              "key": body.get("key"), "used": False}
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"token": token}).encode()

    @app.route("/_fake/events", methods=["GET"])
    def seen(self, request):
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"events": self.events,
                           "evaluations": {k: {"account": v["account"], "turns": v["turns"]}
                                           for k, v in self.evaluations.items()}}).encode()

    @app.route("/_fake/refuse-next", methods=["POST"])
    def queue_refusal(self, request):
        """Tests: the next acceptable streaming call answers this instead (once each).

        ``{"status", "body", "content_type"?, "headers"?: {name: value}, "delay"?: seconds,
        "when"?: text}``: with ``when``, only a call whose message holds that text takes
        it, so tests running at once, or one that failed half-way, never take another's.
        """
        body = json.loads(request.content.read())
        self.refuse_next.append({
            "status": int(body["status"]), "body": str(body["body"]),
            "content_type": str(body.get("content_type", "application/json")),
            "headers": {str(k): str(v) for k, v in (body.get("headers") or {}).items()},
            "delay": float(body.get("delay") or 0), "when": body.get("when")})
        return b"{}"

    def _scripted(self, content: str) -> dict | None:
        for entry in self.refuse_next:
            if entry["when"] is None or str(entry["when"]) in content:
                self.refuse_next.remove(entry)
                return entry
        return None

    # --- the two streaming calls ---

    @app.route("/nextjs-api/stream/create-evaluation", methods=["POST"])
    def create(self, request):
        return self._stream(request, None)

    @app.route("/nextjs-api/stream/post-to-evaluation/<evaluation_id>", methods=["POST"])
    def follow_up(self, request, evaluation_id):
        return self._stream(request, evaluation_id)

    def _refuse(self, request, status: int, body, content_type: str = "application/json",
                headers: dict | None = None, delay: float = 0.0, **why):
        self._event(event="refused", status=status, path=request.path.decode(), **why)
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content_type.encode())
        if status == 429 and not headers:
            request.setHeader(b"Retry-After", b"7")
        for name, value in (headers or {}).items():
            request.setHeader(name.encode(), value.encode())
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        if delay <= 0:
            return data
        # a slow refusal: the gateway has opened the client's stream by the time it comes
        later: Deferred = Deferred()
        call = self.clock.callLater(delay, later.callback, data)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return later

    def _check(self, request, evaluation_id: str | None):
        """(account, body) of an acceptable call, or the refusal's bytes."""
        account = self._account(request)
        if account is None:
            return self._refuse(request, 401, {"error": "Unauthorized"}, reason="no account")
        try:
            body = json.loads(request.content.read())
        except ValueError:
            return self._refuse(request, 400, {"error": "invalid JSON"}, reason="json")
        if not isinstance(body, dict):
            return self._refuse(request, 400, {"error": "invalid JSON"}, reason="json")
        fields = ["id", "modelAId", "userMessageId", "modelAMessageId", "userMessage", "modality"]
        if evaluation_id is None:
            fields.append("mode")
        issues = [{"path": [f], "message": "Required"} for f in fields if f not in body]
        if issues:
            return self._refuse(request, 400, {"success": False, "error": {"issues": issues}},
                                reason="schema")
        ids = [body["userMessageId"], body["modelAMessageId"]]
        if evaluation_id is None:
            ids.append(body["id"])
        elif body["id"] != evaluation_id:
            return self._refuse(request, 400, {"error": "id mismatch"}, reason="id mismatch")
        if not all(isinstance(i, str) and UUID7.match(i) for i in ids):
            return self._refuse(request, 400, {"error": "ids must be UUIDv7"}, reason="not v7")
        if any(i in self.used_ids for i in ids):
            return self._refuse(request, 400, {"error": "id already used"}, reason="reused id")
        # what tests compare between attempts: the ids and (a prefix of) the token
        attempt: dict[str, Any] = {"ids": ids,
                                   "token": str(body.get("recaptchaV3Token") or "")[:12]}
        token = self.tokens.get(body.get("recaptchaV3Token") or "")
        if (token is None or token["used"] or token["action"] != "chat_submit"
                or token["key"] != SITE_KEY
                or self.clock.seconds() - token["at"] > TOKEN_LIFETIME):
            return self._refuse(request, 403, {"error": "recaptcha validation failed"},
                                reason="recaptcha", account=account, **attempt)
        token["used"] = True
        self.used_ids.update(ids)
        if evaluation_id is not None:
            owned = self.evaluations.get(evaluation_id)
            if owned is None or owned["account"] != account:
                return self._refuse(request, 401, {"error": f"User {account} does not have "
                                                   f"access to evaluation session {evaluation_id}"},
                                    reason="not owner", account=account, **attempt)
        model = next((m for m in MODELS if m["id"] == body["modelAId"]), None)
        if model is None:
            return self._refuse(request, 400, {"error": "unknown model"}, reason="model")
        return account, body, model, attempt

    def _stream(self, request, evaluation_id: str | None):
        checked = self._check(request, evaluation_id)
        if isinstance(checked, bytes):
            return checked
        account, body, model, attempt = checked
        content = str(body["userMessage"].get("content", ""))
        scripted = self._scripted(content)
        if scripted is not None:
            return self._refuse(request, scripted["status"], scripted["body"],
                                scripted["content_type"], scripted["headers"], scripted["delay"],
                                reason="queued", account=account, content=content[-200:],
                                **attempt)
        for word, (status, content_type, text) in TRIGGERS.items():
            if word in content:
                return self._refuse(request, status, text, content_type, reason=word,
                                    account=account, content=content[-200:], **attempt)
        eid = evaluation_id or body["id"]
        evaluation = self.evaluations.setdefault(eid, {"account": account, "turns": 0})
        evaluation["turns"] += 1
        self._event(event="request", path=request.path.decode(), account=account,
                    evaluation=eid, turn=evaluation["turns"], model=model["publicName"],
                    followup=evaluation_id is not None, content=content[-200:], **attempt)
        request.setHeader(b"Content-Type", b"text/event-stream")
        return self._answer(request, account, eid, evaluation["turns"], model, content)

    def _lines(self, account: str, eid: str, turn: int, model: dict, content: str) -> list[bytes]:
        output = model["capabilities"]["outputCapabilities"]
        if "[[empty]]" in content:
            return [_line("d", {"finishReason": "stop"})]
        if "[[model-error]]" in content:
            return [_line("0", "hasArenaError")]
        lines = []
        if output.get("reasoning"):
            lines += [_line("g", "Thinking about "), _line("g", "the question.")]
        if output.get("image"):
            lines.append(_line("2", [{"type": "heartbeat"}]))
            lines.append(_line("2", [{"type": "image",
                                      "image": f"https://arena.ai/fake-images/{eid}.png"}]))
        else:
            said = content.strip().splitlines()[-1][-60:] if content.strip() else ""
            text = f"[{account}] turn {turn} of {eid}: you said {said}"
            size = max(1, -(-len(text) // self.chunks))
            lines += [_line("0", text[i:i + size]) for i in range(0, len(text), size)]
        if output.get("search"):
            # as LMArena cites: one source, then a list that cites the first one again
            lines.append(_line("c", {"toolCallId": "s1", "argsTextDelta": json.dumps(
                {"source": {"url": "https://example.org/a", "title": "Source A"}})}))
            lines.append(_line("c", {"toolCallId": "s2", "argsTextDelta": json.dumps(
                {"source": [{"url": "https://example.org/a", "title": "Source A"},
                            {"url": "https://example.org/b?q=1", "title": "Source B"}]})}))
        if "[[mid-error]]" in content:
            lines.append(_line("3", "the model stopped with an error"))
            return lines
        usage = {"promptTokens": len(content.split()), "completionTokens": len(lines)}
        lines.append(_line("d", {"finishReason": "stop", "usage": usage}))
        return lines

    def _answer(self, request, account, eid, turn, model, content) -> Deferred:
        lines = self._lines(account, eid, turn, model, content)
        delay = self.delay * (50 if "[[slow]]" in content else 1)
        state: dict = {"call": None, "gone": False}

        def gone(_=None):
            if not state["gone"]:
                state["gone"] = True
                self._event(event="aborted", evaluation=eid, account=account)
                if state["call"] is not None and state["call"].active():
                    state["call"].cancel()

        # Klein cancels the route's Deferred when the client goes away
        done: Deferred = Deferred(gone)
        request.notifyFinish().addErrback(gone)

        def step(index: int) -> None:
            if state["gone"]:
                return
            if index == len(lines):
                self._event(event="completed", evaluation=eid, account=account)
                done.callback(b"")
                return
            # a line may be cut anywhere between two writes, as the network cuts it
            line = lines[index]
            half = len(line) // 2
            request.write(line[:half])
            request.write(line[half:])
            state["call"] = self.clock.callLater(delay, step, index + 1)

        request.write(b"")
        state["call"] = self.clock.callLater(delay, step, 0)
        return done


def main(listen: str, delay_ms: float, chunks: int) -> int:
    from twisted.internet import reactor as _reactor
    reactor: Any = _reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.server import Site

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])  # type: ignore[list-item]
    arena = FakeArena(reactor, delay=delay_ms / 1000.0, chunks=chunks)

    def listening(port):
        host = port.getHost()
        print(f"fake arena listening on {host.host}:{host.port}", flush=True)

    def failed(failure):
        print(f"lmgateway fake-arena: cannot listen: {failure.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    serverFromString(reactor, listen).listen(Site(arena.app.resource())).addCallbacks(
        listening, failed)
    reactor.run()
    return 0

