"""The database side of the listing cache (drive/store/caching.py): each drive's generation,
bumped after every change a gateway makes, and the presigned PUTs still out, shared by every
replica on the database. The tables are the gateway's (``drive_changes``, ``upload_urls``)."""

from __future__ import annotations

import time

from sqlalchemy import Table, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import sessionmaker


class DbChangeMarks:
    """:class:`drive.store.caching.ChangeMarks` in the database."""

    def __init__(self, sessions: sessionmaker, generations: Table, urls: Table):
        self._sessions = sessions
        self._generations = generations
        self._urls = urls

    def generation(self, drive: str) -> int:
        g = self._generations
        with self._sessions() as session:
            return session.scalar(select(g.c.generation).where(g.c.prefix == drive)) or 0

    def bump(self, drive: str) -> None:
        g = self._generations
        with self._sessions.begin() as session:
            module = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
            statement = module.insert(g).values(prefix=drive, generation=1)
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=[g.c.prefix], set_={"generation": g.c.generation + 1}
                )
            )

    def urls_out(self, drive: str, keys: list[str], expires_in: int) -> None:
        u = self._urls
        now = time.time()
        with self._sessions.begin() as session:
            session.execute(delete(u).where(u.c.prefix == drive, u.c.expires_at <= now))
            session.execute(insert(u), [{"prefix": drive, "key": key, "expires_at": now + expires_in} for key in keys])

    def look(self, drive: str, folder: str, limit: int) -> tuple[int, list[str]]:
        g, u = self._generations, self._urls
        # "0" follows "/": the keys under the folder, compared byte by byte.
        under = (u.c.key >= folder) & (u.c.key < folder[:-1] + "0")
        with self._sessions() as session:
            generation = session.scalar(select(g.c.generation).where(g.c.prefix == drive)) or 0
            keys = session.scalars(
                select(u.c.key).where(u.c.prefix == drive, under, u.c.expires_at > time.time()).distinct().limit(limit)
            ).all()
        return generation, list(keys)
