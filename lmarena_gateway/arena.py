"""What LMArena itself speaks: ids, the create/follow-up bodies, the model list, the answer.

Everything about LMArena's wire format lives here, in Python, so tests reach all of it:
the tab only runs the fetch and hands back raw text (docs/tab-mode.rst).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import time
import uuid
from urllib.parse import urlsplit

from attrs import field, frozen

from .errors import ApiError

CREATE_PATH = "/nextjs-api/stream/create-evaluation"
FOLLOW_UP_PATH = "/nextjs-api/stream/post-to-evaluation/{id}"
# LMArena refuses prompts over about 113 000 characters; we say so before it does.
MAX_PROMPT = 113_000
TRANSCRIPT_HEADER = "Conversation transcript:"
ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant",
         "tool": "Tool"}


def uuid7(now: float | None = None) -> str:
    """A UUIDv7: 48 bits of Unix milliseconds, then random bits (RFC 9562)."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))


# --- the request ---


def text_of(content) -> str:
    """A message's text: a string, or the text parts of a content array."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise ApiError(400, "INVALID_REQUEST", "content parts must be objects")
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise ApiError(400, "ATTACHMENTS_NOT_SUPPORTED",
                               f"content parts of type {kind!r} are not supported in tab mode "
                               "yet; send text only")
        return "\n".join(texts)
    raise ApiError(400, "INVALID_REQUEST", "message content must be a string or a list of parts")


@frozen
class Turn:
    role: str
    text: str


def turns_of(messages) -> list[Turn]:
    """The conversation as (role, text) turns; 400 for anything we cannot send."""
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, "INVALID_REQUEST",
                           f"messages[{index}] needs a role of {', '.join(ROLES)}")
        turns.append(Turn(message["role"], text_of(message.get("content"))))
    if not any(t.role == "user" for t in turns):
        raise ApiError(400, "INVALID_REQUEST", "messages need at least one user message")
    return turns


def pack(turns: list[Turn]) -> str:
    """The one user message LMArena takes for a fresh conversation.

    A lone user turn is sent as it is. Anything more becomes a transcript: the header
    line, then one block per turn, ``Role: text``, separated by blank lines, in order.
    """
    if len(turns) == 1 and turns[0].role == "user":
        text = turns[0].text
    else:
        blocks = [f"{ROLES[t.role]}: {t.text}" for t in turns]
        text = "\n\n".join([TRANSCRIPT_HEADER, *blocks])
    if len(text) > MAX_PROMPT:
        raise ApiError(400, "PROMPT_TOO_LONG",
                       f"the conversation is {len(text)} characters; LMArena takes at most "
                       f"{MAX_PROMPT}. Shorten it or start a new one")
    return text


def split_history(turns: list[Turn]) -> tuple[list[Turn], list[Turn]]:
    """(history, the rest): the history is everything before the last user message."""
    last = max(i for i, t in enumerate(turns) if t.role == "user")
    return turns[:last], turns[last:]


def history_digest(turns: list[Turn]) -> str:
    """What identifies a conversation without keeping its text: a SHA-256 of every turn's
    role and text, in order. Any change of role, content or order changes it."""
    import hashlib

    canonical = json.dumps([[t.role, t.text] for t in turns], ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def request_body(*, model_id: str, content: str, modality: str,
                 evaluation_id: str | None = None) -> tuple[str, dict]:
    """(path, body) of one attempt, with fresh ids; a follow-up when given an evaluation id.

    ``recaptchaV3Token`` is left null: the tab mints it right before its fetch.
    """
    body = {
        "id": evaluation_id or uuid7(),
        "modelAId": model_id,
        "userMessageId": uuid7(),
        "modelAMessageId": uuid7(),
        "userMessage": {"content": content, "experimental_attachments": [], "metadata": {}},
        "modality": modality,
        "recaptchaV3Token": None,
    }
    if evaluation_id is None:
        return CREATE_PATH, {"id": body.pop("id"), "mode": "direct", **body}
    return FOLLOW_UP_PATH.format(id=evaluation_id), body


# --- the model list the page embeds ---


@frozen
class ArenaModel:
    id: str
    public_name: str
    output: tuple[str, ...] = ()  # the output capabilities' names: text, image, search

    @property
    def modality(self) -> str:
        if "image" in self.output:
            return "image"
        if "search" in self.output or "web" in self.output:
            return "search"
        return "chat"

    def listing(self, created: int) -> dict:
        return {"id": self.public_name, "object": "model", "created": created,
                "owned_by": "LMArena (tab)"}


_MODELS_KEY = re.compile(r'(\\*)"initialModels\1"\s*:\s*')


def _unescape_to(text: str, start: int, depth: int) -> str:
    """Undo ``depth`` levels of JSON string escaping of the text from ``start`` on."""
    for _ in range(depth):
        # Find where the enclosing string literal ends: the first quote not escaped.
        end = start
        while True:
            end = text.find('"', end)
            if end < 0:
                end = len(text)
                break
            backslashes = len(text[:end]) - len(text[:end].rstrip("\\"))
            if backslashes % 2 == 0:
                break
            end += 1
        text = json.loads('"' + text[start:end] + '"')
        start = 0
    return text[start:]


def parse_models(source: str) -> list[ArenaModel]:
    """The models of a page's HTML or script text (``initialModels``, escaped or not)."""
    if not isinstance(source, str):
        return []
    match = _MODELS_KEY.search(source)
    if match is None:
        return []
    slashes = len(match.group(1))
    depth = 0 if slashes == 0 else (slashes.bit_length())  # \" = 1 level, \\\" = 2 levels
    try:
        text = _unescape_to(source, match.end(), depth) if depth else source[match.end():]
        raw, _ = json.JSONDecoder().raw_decode(text)
    except (ValueError, IndexError):
        return []
    models = []
    for entry in raw if isinstance(raw, list) else []:
        if not isinstance(entry, dict):
            continue
        model_id, name = entry.get("id"), entry.get("publicName")
        if not isinstance(model_id, str) or not isinstance(name, str) or not name:
            continue
        output = ((entry.get("capabilities") or {}).get("outputCapabilities") or {})
        names = tuple(sorted(k for k, v in output.items() if v)) if isinstance(output, dict) else ()
        models.append(ArenaModel(model_id, name, names))
    return models


# --- the answer ---


@frozen
class ArenaEvent:
    """One meaningful line of an answer.

    ``kind``: text, reasoning, image, citation, error, finish, heartbeat.
    """

    kind: str
    side: str = "a"
    text: str = ""
    data: object = field(default=None, eq=False)


_LINE = re.compile(r"^([ab])([0-9a-z]):(.*)$", re.S)
ARENA_ERROR = "hasArenaError"


def parse_line(line: str) -> list[ArenaEvent]:
    """The events of one whole line; lines we do not know are ignored."""
    match = _LINE.match(line.rstrip("\r"))
    if match is None:
        return []
    side, code, payload = match.groups()
    try:
        value = json.loads(payload)
    except ValueError:
        return []
    if code == "0" and isinstance(value, str):
        if value == ARENA_ERROR:
            return [ArenaEvent("error", side, "the arena refused the request or the model "
                                              "is unavailable (hasArenaError)")]
        return [ArenaEvent("text", side, value)] if value else []
    if code == "g":
        if isinstance(value, dict):
            value = value.get("thinking") or value.get("text") or ""
        return [ArenaEvent("reasoning", side, value)] if isinstance(value, str) and value else []
    if code == "c":
        return [ArenaEvent("citation", side, data=value)]
    if code == "2" and isinstance(value, list):
        events = []
        for item in value:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "heartbeat":
                events.append(ArenaEvent("heartbeat", side))
            elif item.get("type") == "image" and isinstance(item.get("image"), str):
                events.append(ArenaEvent("image", side, item["image"]))
        return events
    if code == "3":
        return [ArenaEvent("error", side, value if isinstance(value, str) else json.dumps(value))]
    if code == "d" and isinstance(value, dict):
        reason = value.get("finishReason")
        usage = value.get("usage") if isinstance(value.get("usage"), dict) else None
        return [ArenaEvent("finish", side, reason if isinstance(reason, str) else "stop", usage)]
    return []


class LineParser:
    """Parses an answer fed in arbitrary pieces: a line (or a UTF-8 character) may be cut
    anywhere, and the part not yet ended is carried over to the next piece."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._carry = ""

    def feed(self, data: str | bytes) -> list[ArenaEvent]:
        text = self._decoder.decode(data) if isinstance(data, bytes) else data
        *lines, self._carry = (self._carry + text).split("\n")
        events: list[ArenaEvent] = []
        for line in lines:
            events += parse_line(line)
        return events

    def close(self) -> list[ArenaEvent]:
        """The last line, when the body ended without a newline."""
        rest, self._carry = self._carry + self._decoder.decode(b"", final=True), ""
        return parse_line(rest) if rest else []


def usage_of(arena_usage: dict | None) -> dict | None:
    """OpenAI's usage fields from the arena's (camelCase or snake_case) counts."""
    if not arena_usage:
        return None

    def number(*names):
        for name in names:
            value = arena_usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0

    prompt = number("promptTokens", "prompt_tokens", "inputTokens")
    completion = number("completionTokens", "completion_tokens", "outputTokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


FINISH_REASONS = {"stop": "stop", "length": "length", "content-filter": "content_filter",
                  "content_filter": "content_filter", "tool-calls": "tool_calls"}


# --- a search answer's sources ---

MAX_SOURCES = 50  # a list longer than this helps nobody at the end of an answer


class Sources:
    """The sources a search model cites in its ``ac`` lines, for the end of the answer.

    Each ``ac`` line is a tool-call delta: ``argsTextDelta`` is (a piece of) a JSON text
    holding ``source`` (one or a list) or ``sources``, each with a ``url`` and a ``title``.
    Pieces of one ``toolCallId`` are joined until they parse. Sources are kept in the order
    first cited, once per URL, with the first title given for it; only http(s) URLs.
    """

    def __init__(self) -> None:
        self.found: dict[str, str] = {}  # url -> title, in citation order
        self._partial: dict[str, str] = {}  # toolCallId -> args text not yet whole

    def add(self, data) -> None:
        if not isinstance(data, dict):
            return
        delta = data.get("argsTextDelta")
        if not isinstance(delta, str):
            self._take(data.get("args"), 0)
            return
        key = str(data.get("toolCallId") or "")
        text = self._partial.pop(key, "") + delta
        try:
            value = json.loads(text)
        except ValueError:
            if len(text) < 256 * 1024:
                self._partial[key] = text  # the rest comes in the next delta
            return
        self._take(value, 0)

    def _take(self, value, depth: int) -> None:
        if depth > 4 or len(self.found) >= MAX_SOURCES:
            return
        if isinstance(value, list):
            for item in value:
                self._take(item, depth + 1)
            return
        if not isinstance(value, dict):
            return
        url = value.get("url")
        if isinstance(url, str):
            url = url.strip()
            parts = urlsplit(url)
            if parts.scheme in ("http", "https") and parts.netloc:
                title = value.get("title") or value.get("name") or ""
                title = " ".join(title.split()) if isinstance(title, str) else ""
                if not self.found.get(url):
                    self.found[url] = title
            return
        for name in ("source", "sources", "results", "citations"):
            if name in value:
                self._take(value[name], depth + 1)

    def markdown(self) -> str:
        """``\n\nSources:\n1. [title](url)`` lines, or "" when nothing was cited."""
        if not self.found:
            return ""
        lines = [f"{n}. [{_link_text(title or url)}]({_link_target(url)})"
                 for n, (url, title) in enumerate(self.found.items(), 1)]
        return "\n\nSources:\n" + "\n".join(lines)


def _link_text(text: str) -> str:
    """Text that cannot end a markdown link early."""
    for char in ("\\", "[", "]"):
        text = text.replace(char, "\\" + char)
    return text


def _link_target(url: str) -> str:
    """A URL a markdown link takes as one destination (no space or bracket ends it)."""
    for char, code in ((" ", "%20"), ("(", "%28"), (")", "%29"), ("<", "%3C"), (">", "%3E")):
        url = url.replace(char, code)
    return url
