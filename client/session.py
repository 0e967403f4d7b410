"""What every command gets: the login, the API, and whether to answer in JSON."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from client.config import Login


@dataclass(frozen=True)
class Session:
    login: Login
    as_json: bool

    @cached_property
    def api(self):  # -> client.api.Api
        """Made by the first request: a command that makes none (``kgpu cp`` from the drive into a new
        folder) starts without importing the HTTP stack."""
        from client.api import Api

        return Api(self.login)
