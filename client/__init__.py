"""The researcher's ``kgpu`` commands: the drive (ls, cp, sync, rm, mv, mount), rentals and runs.

``gateway/cli.py`` hands every command other than ``serve`` and ``admin`` to ``client.cli``.
Nothing here imports the server: the client talks to it over HTTP (and WebDAV, through the
bundled rclone) only.
"""
