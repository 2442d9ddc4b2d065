"""The one set of grammars: each refuses a trailing newline, and every caller agrees."""

from __future__ import annotations

import pytest

from lmarena_gateway.errors import ApiError
from lmarena_gateway.sessions import check_bridge_url
from lmarena_gateway.setting_values import parse_http_url
from lmarena_gateway.userscript import check_gateway_url
from lmarena_gateway.validation import HTTP_TOKEN, http_url, is_host_name, is_printable

GOOD_URLS = ["http://127.0.0.1:5102", "https://bridge.example/prefix/", "http://[::1]:8080",
             "http://lan_host.local"]
BAD_URLS = ["ftp://h", "http://", "http://h:0", "http://h:70000", "http://u:p@h", "http://h/?q",
            "http://h/#f", "http://h/a b", "http://h/'", "http://h\n", "http://h/\u00e9", "h:80",
            "http://bad..host", "http://-h-/"]


@pytest.mark.parametrize("url", GOOD_URLS)
def test_every_caller_accepts_the_same_plain_urls(url):
    expected = url.rstrip("/")
    assert http_url(url) == parse_http_url(url) == check_bridge_url(url) == expected
    assert check_gateway_url(url) == expected


@pytest.mark.parametrize("url", BAD_URLS)
def test_every_caller_refuses_the_same_urls(url):
    for check in (http_url, parse_http_url, check_gateway_url):
        with pytest.raises(ValueError):
            check(url)
    with pytest.raises(ApiError) as e:
        check_bridge_url(url)
    assert e.value.code == "INVALID_URL"


@pytest.mark.parametrize("value, low, high, ok", [
    ("sk-abc", 1, 512, True), ("sk-abc\n", 1, 512, False), ("a b", 1, 512, False),
    ("", 1, 512, False), ("x" * 16, 16, 512, True), ("x" * 15, 16, 512, False),
    ("x" * 513, 1, 512, False), ("caf\u00e9", 1, 512, False), (None, 1, 512, False),
])
def test_printable_tokens(value, low, high, ok):
    assert is_printable(value, low, high) is ok


@pytest.mark.parametrize("name, ok", [
    ("lmarena.ai", True), ("canary.lmarena.ai", True), ("lan_host", True),
    ("lmarena.ai\n", False), ("-x.ai", False), ("a..b", False), ("a" * 64, False),
    (".".join(["a" * 60] * 5), False), ("", False),
])
def test_host_names(name, ok):
    assert is_host_name(name) is ok


def test_header_names_are_http_tokens_in_full():
    assert HTTP_TOKEN.fullmatch(b"x-stainless-os")
    assert not HTTP_TOKEN.fullmatch(b"x-stainless-os\n")
    assert not HTTP_TOKEN.fullmatch(b"bad header")
