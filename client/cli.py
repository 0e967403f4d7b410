"""The ``kgpu`` command: the researcher's subcommands, and the server's (``kgpu serve``,
``kgpu admin``) where the server is installed beside the client: it adds them through the
``kgpu.commands`` entry points (``gateway/cli.py``), so the client never imports it.

Exit codes: 0 ok; 1 the server refused (its message on stderr) or a transfer failed; 2 a
command line that cannot work; 3 not logged in; ``kgpu run`` exits with the run's own code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from client.config import NotLoggedIn, load
from client.errors import ApiError, TransferFailed, UsageError
from client.locations import pod_side
from client.output import error
from client.session import Session

EXIT_API, EXIT_USAGE, EXIT_NOT_LOGGED_IN = 1, 2, 3
DEFAULT_TRANSFERS = 8
# Each entry point of this group is a function that adds subcommands to kgpu's parser.
JOINED_COMMANDS = "kgpu.commands"
SERVER_COMMANDS = ("serve", "admin")
SERVER_MISSING = ("`kgpu {command}` is the server's: install the kgpu server beside this client "
                  "(`pip install .` in a kgpu checkout; docs/client.md#install)")


class _Later:
    """A command's module, imported when the command runs: ``kgpu cp`` does not wait for the
    imports of ``kgpu rent`` or ``kgpu login`` (docs/client.md: about 70 ms of imports, not 170)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(f"client.{self._name}"), attribute)


drive, gpus, login, mounts, pod_files, ssh = (_Later(n) for n in ("drive", "gpus", "login", "mounts", "pod_files", "ssh"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kgpu", description="your kgpu drive, GPU rentals and runs")
    commands = parser.add_subparsers(dest="command", required=True)
    add_commands(commands)
    if not argv[:1] or argv[0] not in commands.choices:  # help, or a command not the client's
        _join_installed_commands(commands)
    if argv[:1] and argv[0] in SERVER_COMMANDS and argv[0] not in commands.choices:
        error(SERVER_MISSING.format(command=argv[0]), as_json=False)
        return EXIT_USAGE
    args = parse_args(parser, argv)
    return args.func(args)


def _cp(session: Session, args: argparse.Namespace) -> int:
    if pod_side(args.source) or pod_side(args.destination):
        return pod_files.cp(session, args.source, args.destination, args.recursive)
    return drive.cp(session, args.source, args.destination, args.recursive, args.transfers)


def _join_installed_commands(commands: argparse._SubParsersAction) -> None:
    """Add the subcommands of the installed ``kgpu.commands`` entry points (the server's).
    Reading them costs the researcher's commands about 30 ms, so only help and other commands do."""
    from importlib.metadata import entry_points

    for joined in entry_points(group=JOINED_COMMANDS):
        joined.load()(commands)


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One place that turns the client's errors into exit codes and messages."""

    def run(args: argparse.Namespace) -> int:
        as_json = getattr(args, "json", False)
        try:
            return handler(args)
        except NotLoggedIn as exc:
            error(str(exc), as_json=as_json, error_code="not_logged_in")
            return EXIT_NOT_LOGGED_IN
        except UsageError as exc:
            error(str(exc), as_json=as_json, error_code="usage")
            return EXIT_USAGE
        except ApiError as exc:
            error(exc.message, as_json=as_json, error_code=exc.error_code)
            return EXIT_API
        except TransferFailed as exc:
            error(str(exc), as_json=as_json, error_code="failed")
            return EXIT_API
        except KeyboardInterrupt:
            return 130

    return run


def _session(args: argparse.Namespace) -> Session:
    logged_in = load()
    return Session(logged_in, args.json)


def _with_session(action: Callable[[Session, argparse.Namespace], int]):
    return _guarded(lambda args: action(_session(args), args))


def add_commands(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="answer in JSON (for scripts and agents)")
    parallel = argparse.ArgumentParser(add_help=False)
    parallel.add_argument("-j", "--transfers", type=int, default=DEFAULT_TRANSFERS,
                          help=f"files in flight at once (default {DEFAULT_TRANSFERS})")

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common, *parents])

    p = add("login", "keep the server's base URL and your token (from KGPU_API_TOKEN, stdin, or --browser)")
    p.add_argument("--base-url", help="the server's origin, e.g. https://api.kgpu.net")
    p.add_argument("--browser", action="store_true", help="sign in on the dashboard; it hands this command a one-time code for your token")
    p.add_argument("--no-open", action="store_true", help="with --browser: print the page's address, do not open it")
    p.set_defaults(func=_guarded(lambda a: login.login(a.base_url, a.json, a.browser, not a.no_open)))
    p = add("logout", "forget the stored token")
    p.set_defaults(func=_guarded(lambda a: login.logout(a.json)))

    p = add("ls", "list a folder of your drive (kgpu:PATH) or a shared drive (kgpu:shared/ORG/PATH)")
    p.add_argument("path", nargs="?", default="kgpu:")
    p.add_argument("-R", "--recursive", action="store_true", help="the whole tree below")
    p.set_defaults(func=_with_session(lambda s, a: drive.ls(s, a.path, a.recursive)))

    p = add("cp", "copy files between here and your drive (kgpu:PATH) or a rented GPU (gpu-…:PATH); "
                  "-r for a drive folder (its contents go into DEST)", parallel)
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("-r", "--recursive", action="store_true")
    p.set_defaults(func=_with_session(_cp))

    p = add("sync", "make DEST a copy of the folder SOURCE (deletes what SOURCE lacks)", parallel)
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=_with_session(lambda s, a: drive.sync(s, a.source, a.destination, a.transfers)))

    p = add("mv", "move or rename files and folders (server-side within your drive)", parallel)
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=_with_session(lambda s, a: drive.mv(s, a.source, a.destination, a.transfers)))

    p = add("rm", "delete a file of your drive (or of a shared drive you write to); -r for a folder")
    p.add_argument("path")
    p.add_argument("-r", "--recursive", action="store_true")
    p.set_defaults(func=_with_session(lambda s, a: drive.rm(s, a.path, a.recursive)))

    p = add("mount", "mount your drive (or kgpu:FOLDER) at LOCALDIR with rclone (FUSE)")
    p.add_argument("localdir")
    p.add_argument("remote", nargs="?", default="kgpu:")
    p.set_defaults(func=_with_session(lambda s, a: mounts.mount(s, a.localdir, a.remote)))
    p = add("unmount", "wait until every write is uploaded, then unmount LOCALDIR")
    p.add_argument("localdir")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for uploads (default 600)")
    p.add_argument("--force", action="store_true",
                   help="unmount without waiting for uploads (when rclone is gone); queued writes are lost")
    p.set_defaults(func=_guarded(lambda a: mounts.unmount(a.localdir, a.timeout, a.force, a.json)))

    p = add("gpus", "the cluster's GPUs, prices, your balance and rentals")
    p.set_defaults(func=_with_session(lambda s, a: gpus.gpus(s)))

    p = add("rent", "rent GPUs (대여) and wait until the rental is ready")
    p.add_argument("--name")
    p.add_argument("--gpus", type=int, dest="gpu_count", help="how many GPUs (0: a CPU-only pod)")
    p.add_argument("--model", dest="gpu_model", help="a gpu_model of `kgpu gpus`")
    p.add_argument("--image")
    p.add_argument("--hours", type=float, dest="duration_hours", help="hard ceiling, 1-168 (default 12)")
    p.add_argument("--cpu")
    p.add_argument("--memory", help="e.g. 16Gi")
    p.add_argument("--disk", type=int, dest="ephemeral_storage_gib", help="scratch disk, GiB")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="pod environment (repeatable)")
    p.add_argument("--queue", action="store_true", help="when no GPU is free, wait in the queue rather than fail")
    p.add_argument("--no-wait", action="store_true", help="answer at once, ready or not")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for ready (default 900)")
    p.set_defaults(func=_with_session(_rent))

    p = add("run", "run a command on a rental, streaming its output; exits with its exit code")
    p.add_argument("gpu_id")
    p.add_argument("command", nargs="*", help="-- COMMAND [ARGS…] (an argv, not a shell line)")
    p.add_argument("--name")
    p.add_argument("--env", action="append", metavar="NAME=VALUE")
    p.set_defaults(func=_with_session(_run))

    p = add("logs", "a run's output (all of it once it ended; --follow to stream it live)")
    p.add_argument("gpu_id")
    p.add_argument("run_id")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=_with_session(lambda s, a: gpus.logs(s, a.gpu_id, a.run_id, a.follow)))

    p = add("ssh", "SSH into a rental (docs/ssh.md): a shell, or -- COMMAND; finds or mints its key")
    p.add_argument("gpu_id")
    p.add_argument("command", nargs="*", help="-- COMMAND [ARGS…] (run by the pod's shell)")
    p.set_defaults(func=_with_session(lambda s, a: ssh.ssh(s, a.gpu_id, a.command)))
    p = add("ssh-config", "~/.ssh/config blocks for your live rentals (for ssh, scp, rsync, VS Code)")
    p.set_defaults(func=_with_session(lambda s, a: ssh.ssh_config(s)))

    p = add("return", "return a rental (반납): stops its runs and destroys the pod")
    p.add_argument("gpu_id")
    p.set_defaults(func=_with_session(lambda s, a: gpus.give_back(s, a.gpu_id)))


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that ``kgpu run GPU [OPTIONS] -- COMMAND…`` keeps COMMAND whole:
    argparse's subcommands mishandle ``--`` followed by options of their own (``bash -c``)."""
    if argv[:1] in (["run"], ["ssh"]) and "--" in argv:
        cut = argv.index("--")
        args = parser.parse_args(argv[:cut])
        args.command = argv[cut + 1:]
        return args
    return parser.parse_args(argv)


def _rent(session: Session, args: argparse.Namespace) -> int:
    fields = {name: getattr(args, name) for name in
              ("name", "gpu_count", "gpu_model", "image", "duration_hours", "cpu", "memory", "ephemeral_storage_gib")}
    fields["env"] = gpus.parse_env(args.env)
    fields["queue"] = True if args.queue else None
    if fields["duration_hours"] is not None and float(fields["duration_hours"]).is_integer():
        fields["duration_hours"] = int(fields["duration_hours"])
    return gpus.rent(session, fields, wait=not args.no_wait, timeout=args.timeout)


def _run(session: Session, args: argparse.Namespace) -> int:
    return gpus.run(session, args.gpu_id, args.command, args.name, gpus.parse_env(args.env))
