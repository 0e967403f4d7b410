"""client/retry.py: which failed requests the client sends again, and how often."""

from __future__ import annotations

import pytest

from client import retry


def test_a_server_that_never_answers_is_given_up_on_within_seconds_a_busy_one_is_waited_for(monkeypatch):
    """client/retry.py: a busy answer (429) is sent again as often as the caller allows; no answer at
    all (a wrong address, a network down) at most UNANSWERED_TRIES times, so `kgpu cp` to a server
    that is not there fails within seconds instead of waiting out its five minutes."""
    waits: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", waits.append)

    def failing(status: int):
        calls = []

        def action():
            calls.append(status)
            raise retry.Refusal(f"status {status}", status)

        return action, calls

    for status, expected in ((0, retry.UNANSWERED_TRIES), (429, 10), (503, 10), (404, 1)):
        action, calls = failing(status)
        with pytest.raises(retry.Refusal):
            retry.attempts(action, tries=10, most_waited_s=300)
        assert len(calls) == expected, status
    assert sum(waits) < 300
