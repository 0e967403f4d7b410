"""What every command gets: the login, the API, and whether to answer in JSON."""

from __future__ import annotations

from dataclasses import dataclass

from client.api import Api
from client.config import Login


@dataclass(frozen=True)
class Session:
    login: Login
    api: Api
    as_json: bool
