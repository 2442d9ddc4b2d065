"""Every validator matches the whole value: a trailing newline is not a valid anything.

A ``$`` in a pattern also matches before a final "\\n", which let through session names
the API could not delete and bridge keys that broke the userscript.
"""

import pytest

from lmarena_gateway.errors import ApiError
from lmarena_gateway.sessions import check_domain, check_session_name, validate_registration
from lmarena_gateway.site import request_id
from lmarena_gateway.userscript import check_gateway_url, check_host, render_script

from support.client import SESSION

DOMAINS = ("lmarena.ai",)


def test_a_session_name_with_a_trailing_newline_is_refused():
    assert check_session_name("team-alpha") == "team-alpha"
    with pytest.raises(ApiError) as e:
        check_session_name("team-alpha\n")
    assert e.value.code == "INVALID_SESSION_NAME"


@pytest.mark.parametrize("field", ["session_name", "session_id", "message_id", "bridge_api_key"])
def test_a_registration_never_keeps_a_trailing_newline(field):
    # Registration trims blanks (as the PHP gateway did); what it keeps matches whole.
    body = dict(SESSION, bridge_api_key="sk-bridge")
    registration = validate_registration(dict(body, **{field: body[field] + "\n"}), DOMAINS)
    assert getattr(registration, field) == body[field]


def test_a_domain_with_a_trailing_newline_is_not_a_configured_domain():
    with pytest.raises(ApiError) as e:
        check_domain("lmarena.ai\n", DOMAINS)
    assert e.value.code == "INVALID_DOMAIN"
    # (--domains splits on whitespace, so its entries cannot end in one)


def test_a_request_id_with_a_trailing_newline_is_replaced():
    class Asked:
        def __init__(self, value):
            self.value = value

        def getHeader(self, name):
            return self.value

    assert request_id(Asked(b"abc-123")) == "abc-123"
    assert request_id(Asked(b"abc-123\n")) != "abc-123\n"


def test_userscript_values_with_a_trailing_newline_are_refused():
    assert check_gateway_url("http://127.0.0.1:5104") == "http://127.0.0.1:5104"
    with pytest.raises(ValueError):
        check_gateway_url("http://127.0.0.1:5104\n")
    with pytest.raises(ApiError):
        check_host("gateway.example:5104\n", "Host")
    with pytest.raises(ValueError):
        render_script(session_name="alpha\n", gateway_url="http://127.0.0.1:5104",
                      domains=DOMAINS)
    with pytest.raises(ValueError):
        render_script(session_name="alpha", gateway_url="http://127.0.0.1:5104",
                      domains=("lmarena.ai\n",))

