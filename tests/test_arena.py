"""LMArena's grammar, ids, bodies and model list, in memory."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from lmarena_gateway import arena
from lmarena_gateway.arena import ArenaEvent, LineParser, Sources
from lmarena_gateway.errors import ApiError

# An answer with every kind of line, multi-byte text, and a line that does not end.
ANSWER = "\n".join([
    'ag:"Let me think… "',
    'ag:{"thinking":"about ünïcode"}',
    'a0:"Hello, "',
    'a0:"wörld 👋\\n"',
    'a2:[{"type":"heartbeat"}]',
    'af:{"messageId":"x"}',
    'ac:{"toolCallId":"s1","argsTextDelta":"{}"}',
    'a2:[{"type":"image","image":"https://arena.ai/i.png"}]',
    'b0:"side b"',
    'not a line',
    'a3:"the model failed"',
    'a0:"hasArenaError"',
    'ad:{"finishReason":"stop","usage":{"promptTokens":3,"completionTokens":5}}',
])
EXPECTED = [
    ArenaEvent("reasoning", "a", "Let me think… "),
    ArenaEvent("reasoning", "a", "about ünïcode"),
    ArenaEvent("text", "a", "Hello, "),
    ArenaEvent("text", "a", "wörld 👋\n"),
    ArenaEvent("heartbeat", "a"),
    ArenaEvent("citation", "a"),
    ArenaEvent("image", "a", "https://arena.ai/i.png"),
    ArenaEvent("text", "b", "side b"),
    ArenaEvent("error", "a", "the model failed"),
    ArenaEvent("error", "a", "the arena refused the request or the model is unavailable "
                             "(hasArenaError)"),
    ArenaEvent("finish", "a", "stop"),
]


def parse_in_pieces(pieces) -> list[ArenaEvent]:
    parser = LineParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.close()


def test_the_whole_answer_at_once():
    events = parse_in_pieces([ANSWER])
    assert events == EXPECTED
    assert events[-1].data == {"promptTokens": 3, "completionTokens": 5}


def test_cut_at_every_byte_gives_the_same_events():
    raw = ANSWER.encode()
    for cut in range(len(raw) + 1):
        assert parse_in_pieces([raw[:cut], raw[cut:]]) == EXPECTED, cut


def test_cut_at_every_pair_of_characters_gives_the_same_events():
    for first in range(0, len(ANSWER) + 1, 7):
        for second in range(first, len(ANSWER) + 1, 5):
            pieces = [ANSWER[:first], ANSWER[first:second], ANSWER[second:]]
            assert parse_in_pieces(pieces) == EXPECTED, (first, second)


def test_byte_by_byte():
    assert parse_in_pieces([bytes([b]) for b in ANSWER.encode()]) == EXPECTED


def test_crlf_lines_and_a_final_newline():
    assert parse_in_pieces(['a0:"x"\r\n', 'ad:{"finishReason":"length"}\r\n']) == [
        ArenaEvent("text", "a", "x"), ArenaEvent("finish", "a", "length")]


@pytest.mark.parametrize("line", ['a0:"unterminated', "a0:", 'a0:123', "ad:[]", "zz:1", ""])
def test_lines_that_mean_nothing_are_ignored(line):
    assert arena.parse_line(line) == []


def test_uuid7_has_the_time_first_and_the_v7_marks():
    before = int(time.time() * 1000)
    value = uuid.UUID(arena.uuid7())
    after = int(time.time() * 1000)
    assert value.version == 7 and value.variant == uuid.RFC_4122
    assert before <= value.int >> 80 <= after
    assert len({arena.uuid7() for _ in range(1000)}) == 1000


def test_a_lone_user_message_is_sent_as_it_is():
    assert arena.pack(arena.turns_of([{"role": "user", "content": "hi"}])) == "hi"


def test_a_history_is_packed_as_a_transcript():
    turns = arena.turns_of([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ])
    assert arena.pack(turns) == ("Conversation transcript:\n\nSystem: Be brief.\n\n"
                                 "User: What is 2+2?\n\nAssistant: 4\n\nUser: And 3+3?")


@pytest.mark.parametrize("messages, code", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "ATTACHMENTS_NOT_SUPPORTED"),
    ([{"role": "wizard", "content": "x"}], "INVALID_REQUEST"),
    ([{"role": "system", "content": "x"}], "INVALID_REQUEST"),
    ([{"role": "user", "content": "x" * (arena.MAX_PROMPT + 1)}], "PROMPT_TOO_LONG"),
])
def test_what_cannot_be_sent_is_refused_with_a_code(messages, code):
    with pytest.raises(ApiError) as caught:
        arena.pack(arena.turns_of(messages))
    assert caught.value.code == code


def test_each_attempt_has_fresh_ids():
    path, first = arena.request_body(model_id="m", content="hi", modality="chat")
    _, second = arena.request_body(model_id="m", content="hi", modality="chat")
    assert path == arena.CREATE_PATH and first["mode"] == "direct"
    ids = lambda body: {body["id"], body["userMessageId"], body["modelAMessageId"]}  # noqa: E731
    assert len(ids(first) | ids(second)) == 6
    assert first["userMessage"] == {"content": "hi", "experimental_attachments": [],
                                    "metadata": {}}
    assert first["recaptchaV3Token"] is None  # the tab mints it


def test_a_follow_up_keeps_the_evaluation_id_and_has_no_mode():
    path, body = arena.request_body(model_id="m", content="more", modality="chat",
                                    evaluation_id="0199e8a0-0000-7000-8000-00000000000a")
    assert path == "/nextjs-api/stream/post-to-evaluation/0199e8a0-0000-7000-8000-00000000000a"
    assert body["id"] == "0199e8a0-0000-7000-8000-00000000000a" and "mode" not in body


MODELS = [{"id": "u1", "publicName": "chat-1", "capabilities": {
              "outputCapabilities": {"text": True}}},
          {"id": "u2", "publicName": "painter", "capabilities": {
              "outputCapabilities": {"image": {"aspectRatios": ["1:1"]}}}},
          {"id": "u3", "publicName": "finder", "capabilities": {
              "outputCapabilities": {"search": True}}},
          {"publicName": "no id"}]


@pytest.mark.parametrize("wrap", [
    lambda data: data,  # plain JSON in a script
    lambda data: json.dumps(data)[1:-1],  # inside a JS string, as Next.js pushes it
    lambda data: json.dumps(json.dumps(data))[1:-1],  # escaped twice
], ids=["plain", "escaped", "escaped-twice"])
def test_models_are_found_in_the_page(wrap):
    data = '{"initialModels":' + json.dumps(MODELS) + ',"initialModelAId":"u1"}'
    source = 'self.__next_f.push([1,"' + wrap(data) + '"])'
    models = arena.parse_models(source)
    assert [(m.id, m.public_name, m.modality) for m in models] == [
        ("u1", "chat-1", "chat"), ("u2", "painter", "image"), ("u3", "finder", "search")]


def test_a_page_without_models_has_none():
    assert arena.parse_models("<html></html>") == []
    assert arena.parse_models('"initialModels":[{"broken"') == []
    assert arena.parse_models(None) == []


HISTORY = [arena.Turn("system", "Be brief."), arena.Turn("user", "2+2?"),
           arena.Turn("assistant", "4")]


def test_the_same_history_gives_the_same_digest():
    again = [arena.Turn(t.role, t.text) for t in HISTORY]
    assert arena.history_digest(HISTORY) == arena.history_digest(again)
    assert len(arena.history_digest(HISTORY)) == 64


@pytest.mark.parametrize("changed", [
    [arena.Turn("developer", "Be brief."), *HISTORY[1:]],  # a role
    [HISTORY[0], arena.Turn("user", "2+3?"), HISTORY[2]],  # a content
    [HISTORY[1], HISTORY[0], HISTORY[2]],  # the order
    HISTORY[:2],  # a turn fewer
    [*HISTORY, arena.Turn("user", "")],  # a turn more, even an empty one
    [arena.Turn("system", "Be brief"), *HISTORY[1:]],  # one character
], ids=["role", "content", "order", "fewer", "more", "one-character"])
def test_any_change_gives_a_new_digest(changed):
    assert arena.history_digest(changed) != arena.history_digest(HISTORY)


def test_the_history_is_what_comes_before_the_last_user_message():
    turns = [*HISTORY, arena.Turn("user", "And 3+3?")]
    history, rest = arena.split_history(turns)
    assert history == HISTORY and rest == [arena.Turn("user", "And 3+3?")]


# --- a search answer's sources ---


def cite(tool: str, args_text: str) -> dict:
    return {"toolCallId": tool, "argsTextDelta": args_text}


def test_sources_are_listed_once_per_url_in_citation_order_with_their_titles():
    sources = Sources()
    sources.add(cite("s1", json.dumps({"source": {"url": "https://b.example/2", "title": "B"}})))
    sources.add(cite("s2", json.dumps({"source": [
        {"url": "https://a.example/1", "title": "  A\n title "},
        {"url": "https://b.example/2", "title": "B again"}]})))
    sources.add(cite("s3", json.dumps({"sources": [{"url": "https://c.example/3"}]})))
    assert sources.markdown() == (
        "\n\nSources:\n1. [B](https://b.example/2)\n2. [A title](https://a.example/1)\n"
        "3. [https://c.example/3](https://c.example/3)")


def test_a_later_title_fills_in_a_source_cited_without_one():
    sources = Sources()
    sources.add(cite("s1", '{"source":{"url":"https://a.example/"}}'))
    sources.add(cite("s2", '{"source":{"url":"https://a.example/","title":"A"}}'))
    assert sources.markdown() == "\n\nSources:\n1. [A](https://a.example/)"


def test_args_cut_across_deltas_are_joined_per_tool_call():
    whole = json.dumps({"source": [{"url": "https://a.example/x", "title": "X"}]})
    sources = Sources()
    sources.add(cite("s1", whole[:10]))
    sources.add(cite("other", '{"source":{"url":"https://o.example/","title":"O"}}'))
    sources.add(cite("s1", whole[10:]))
    assert list(sources.found) == ["https://o.example/", "https://a.example/x"]


def test_only_web_links_are_kept_and_none_can_break_the_markdown():
    sources = Sources()
    sources.add(cite("s1", json.dumps({"source": [
        {"url": "javascript:alert(1)", "title": "evil"}, {"url": "data:text/html,x"},
        {"url": "/relative"}, {"url": 42}, "not a source",
        {"url": "https://w.example/a b (c)", "title": "[x](https://phish.example) \\"}]})))
    sources.add({"toolCallId": "s2"})  # nothing to read
    sources.add("junk")
    assert sources.markdown() == ("\n\nSources:\n1. [\\[x\\](https://phish.example) \\\\]"
                                  "(https://w.example/a%20b%20%28c%29)")


def test_no_citation_no_sources():
    sources = Sources()
    sources.add(cite("s1", '{"source":[]}'))
    assert sources.markdown() == ""
