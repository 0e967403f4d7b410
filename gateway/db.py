"""Database engine, sessions and migrations (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from gateway.data_dir import PRIVATE_FILE_MODE, create_private_file, make_private_dir, set_mode

MIGRATIONS = Path(__file__).parent / "migrations"


class Base(DeclarativeBase):
    pass


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # As many connections as the server's worker threads (40) may want at once: a burst of
        # writes waiting on SQLite's one writer held the pool's default 15, and the rest of the
        # burst got a 500 after 30 s without a connection (20 mints at once, on a loaded machine).
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=10, max_overflow=40)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL never corrupts the database; a power cut may lose the last commits.
            # FULL costs a disk flush per commit (3-4 ms here), on every redirected PUT.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def add_new(session: Session, row: Base, taken: Exception) -> None:
    """``row`` added and flushed (its id given); where a unique column already holds its value,
    the transaction is rolled back and ``taken`` raised instead."""
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise taken from None


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None: another database, or one in memory)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def prepare_sqlite(path: Path) -> None:
    """The database file readable by the server alone (gateway/data_dir.py): made ``0600`` before
    SQLite first opens it (SQLite gives its -wal and -shm the file's mode), an older server's
    ``0644`` one closed; a folder made for it is ``0700``."""
    if not path.parent.exists():
        make_private_dir(path.parent)
    create_private_file(path)
    for suffix in ("", "-wal", "-shm", "-journal"):
        set_mode(path.with_name(path.name + suffix), PRIVATE_FILE_MODE)


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    path = sqlite_path(url)
    if path is not None:
        prepare_sqlite(path)
    command.upgrade(alembic_config(url), "head")
