"""The server's commands, ``kgpu serve`` and ``kgpu admin ...``. They join the client's ``kgpu``
(``client/cli.py``) through this project's ``kgpu.commands`` entry point, so they are there
wherever the server is installed; ``python -m gateway.cli`` runs them without the client."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

# The server's modules take about a second to import: only `serve` and `admin` load them, so that
# every `kgpu` command (this module is loaded to add these two) starts at once.


def _reporting_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A refusal of the server's rules is a message on stderr and exit code 1, not a traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from gateway.domain_errors import DomainError
        from gateway.errors import ApiError

        try:
            return handler(args)
        except (ApiError, DomainError) as exc:
            print(f"kgpu: {exc.message}", file=sys.stderr)
            return 1

    return run


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


@_reporting_errors
def _serve(args: argparse.Namespace) -> int:
    from gateway.data_dir import secure_data_dir
    from gateway.serving import serve
    from gateway.settings import Settings

    given = {"host": args.host, "port": args.port, "data_dir": args.data_dir, "workers": args.workers}
    settings = Settings(**{k: v for k, v in given.items() if v})
    secure_data_dir(settings.data_dir)  # 0711: others pass through (the pods' folders), read nothing
    return serve(settings)


def _sessions(args: argparse.Namespace):
    from gateway import db
    from gateway.settings import Settings

    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    url = settings.resolved_database_url
    db.migrate(url)
    return settings, db.make_sessionmaker(db.make_engine(url))


def _print(obj) -> None:
    print(json.dumps(obj, indent=2))


@_reporting_errors
def _user_create(args) -> int:
    from gateway import tokens, users

    settings, sessions = _sessions(args)
    new = users.NewUser(email=args.email, name=args.name, role=args.role, status=args.status, credits=args.credits)
    with sessions.begin() as session:
        user = users.create(session, new, settings.starting_credits)
        result = {"user": users.describe(user)}
        if not args.no_token:
            _, plaintext = tokens.issue(session, user.id, label="kgpu admin user create")
            result["token"] = plaintext
    _print(result)
    return 0


@_reporting_errors
def _user_list(args) -> int:
    from sqlalchemy import select

    from gateway import users
    from gateway.models import User

    _, sessions = _sessions(args)
    with sessions() as session:
        _print({"users": [users.describe(u) for u in session.scalars(select(User).order_by(User.id))]})
    return 0


@_reporting_errors
def _user_set(args) -> int:
    from gateway import users

    _, sessions = _sessions(args)
    with sessions.begin() as session:
        user = users.find(session, args.user)
        users.apply_patch(user, users.UserPatch(status=args.status, role=args.role))
        _print({"user": users.describe(user)})
    return 0


@_reporting_errors
def _token_issue(args) -> int:
    from gateway import tokens, users
    from gateway.models import utcnow

    _, sessions = _sessions(args)
    expires = utcnow() + timedelta(days=args.expires_days) if args.expires_days else None
    with sessions.begin() as session:
        user = users.find(session, args.user)
        if args.replace:
            tokens.revoke_all(session, user.id)
        row, plaintext = tokens.issue(session, user.id, label=args.label, expires_at=expires)
        _print({"token": plaintext, "token_info": tokens.describe(row)})
    return 0


@_reporting_errors
def _token_revoke(args) -> int:
    from gateway import tokens
    from gateway.errors import ApiError

    _, sessions = _sessions(args)
    with sessions.begin() as session:
        if not tokens.revoke(session, args.token_id):
            raise ApiError(404, "token_not_found", f"no live token with id {args.token_id}")
    _print({"revoked": args.token_id})
    return 0


@_reporting_errors
def _token_list(args) -> int:
    from sqlalchemy import select

    from gateway import tokens, users
    from gateway.models import ApiToken

    _, sessions = _sessions(args)
    with sessions() as session:
        query = select(ApiToken).order_by(ApiToken.id)
        if args.user:
            query = query.where(ApiToken.user_id == users.find(session, args.user).id)
        _print({"tokens": [tokens.describe(t) for t in session.scalars(query)]})
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``kgpu serve`` and ``kgpu admin``, added to the parser of ``kgpu`` (the ``kgpu.commands``
    entry point) or of ``python -m gateway.cli``."""
    serve = commands.add_parser("serve", help="run the service (embedded SQLite and object store by default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--workers", type=_positive, help="worker processes on the one port (default: KGPU_WORKERS, else the machine's cores)")
    serve.set_defaults(func=_serve)

    admin = commands.add_parser("admin", help="manage users and tokens directly in the database")
    admin.add_argument("--data-dir", type=Path, help="data directory (for the default SQLite database)")
    areas = admin.add_subparsers(dest="area", required=True)

    user = areas.add_parser("user").add_subparsers(dest="action", required=True)
    create = user.add_parser("create", help="create a user and print its first token")
    create.add_argument("--email", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--role", choices=["user", "admin"], default="user")
    create.add_argument("--status", choices=["approved", "pending", "suspended"], default="approved")
    create.add_argument("--credits", type=int)
    create.add_argument("--no-token", action="store_true")
    create.set_defaults(func=_user_create)
    user.add_parser("list").set_defaults(func=_user_list)
    setter = user.add_parser("set", help="change a user's status or role")
    setter.add_argument("user", help="id or email")
    setter.add_argument("--status", choices=["approved", "pending", "suspended"])
    setter.add_argument("--role", choices=["user", "admin"])
    setter.set_defaults(func=_user_set)

    token = areas.add_parser("token").add_subparsers(dest="action", required=True)
    issue = token.add_parser("issue", help="issue a token (printed once)")
    issue.add_argument("user", help="id or email")
    issue.add_argument("--expires-days", type=float)
    issue.add_argument("--label", default="kgpu admin token issue")
    issue.add_argument("--replace", action="store_true", help="revoke the user's other tokens")
    issue.set_defaults(func=_token_issue)
    revoke = token.add_parser("revoke")
    revoke.add_argument("token_id", type=int)
    revoke.set_defaults(func=_token_revoke)
    listing = token.add_parser("list")
    listing.add_argument("--user", help="id or email")
    listing.set_defaults(func=_token_list)


def main(argv: list[str] | None = None) -> int:
    """The server's commands alone (``python -m gateway.cli serve``), for an install without the client."""
    parser = argparse.ArgumentParser(prog="kgpu", description="the kgpu server's commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
