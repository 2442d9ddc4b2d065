"""SIGHUP re-reads what can be re-read, says what it did, and never stops the daemon."""

import signal

from support.processes import http, wait_for

OLD = "admin-token-old-0123456789"
NEW = "admin-token-new-0123456789"


def test_sighup_without_client_keys_keeps_the_daemon_running(daemon_factory):
    daemon = daemon_factory()
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP" in daemon.log(), 10, what="the reload to be logged")
    assert daemon.process.poll() is None
    assert http("GET", daemon.url + "/health")[0] == 200
    daemon.process.send_signal(signal.SIGHUP)  # and again: the handler stays installed
    wait_for(lambda: daemon.log().count("SIGHUP") >= 2, 10, what="the second reload")
    assert daemon.process.poll() is None


def test_sighup_rereads_the_admin_token_file(daemon_factory, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(OLD + "\n")
    daemon = daemon_factory("--admin-token-file", str(token_file))

    def listing_with(token):
        return http("GET", daemon.url + "/session/list",
                    headers={"Authorization": f"Bearer {token}"})[0]

    assert (listing_with(OLD), listing_with(NEW)) == (200, 403)
    token_file.write_text(NEW + "\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: listing_with(NEW) == 200, 10, what="the new admin token to work")
    assert listing_with(OLD) == 403
    assert "admin token re-read" in daemon.log()


def test_a_bad_admin_token_file_on_sighup_keeps_the_old_token(daemon_factory, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(OLD + "\n")
    daemon = daemon_factory("--admin-token-file", str(token_file))
    token_file.write_text("short\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "admin token not re-read" in daemon.log(), 10, what="the refusal")
    assert daemon.process.poll() is None
    assert http("GET", daemon.url + "/session/list",
                headers={"Authorization": f"Bearer {OLD}"})[0] == 200
