"""``kgpu:path`` (my drive), ``kgpu:shared/ORG/path`` (a shared drive), ``gpu-…:path`` (a rented
GPU) and local paths."""

from __future__ import annotations

import re
from dataclasses import dataclass

from client.errors import UsageError

PREFIX = "kgpu:"
_POD_SIDE = re.compile(r"^(gpu-[0-9a-f]{1,40}):(.*)$", re.S)


@dataclass(frozen=True)
class Remote:
    """A path in the drive as the WebDAV tree shows it: ``shared/ORG/…`` is a shared drive."""

    path: str  # no leading or trailing "/"; "" is the root
    folder_hint: bool = False  # written with a trailing "/"

    @property
    def org(self) -> str | None:
        parts = self.path.split("/")
        return parts[1] if parts[0] == "shared" and len(parts) > 1 and parts[1] else None

    @property
    def in_shared(self) -> bool:
        return self.path == "shared" or self.path.startswith("shared/")

    @property
    def is_root(self) -> bool:
        """My drive's root, ``shared`` (the orgs) or an org's root: folders that always exist."""
        return not self.path or self.path == "shared" or (self.in_shared and not self.shared_path)

    @property
    def shared_path(self) -> str:
        """The path inside the org's shared drive (``shared/ORG/a/b`` → ``a/b``)."""
        return "/".join(self.path.split("/")[2:])

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def child(self, name: str) -> "Remote":
        return Remote(f"{self.path}/{name}" if self.path else name)

    def __str__(self) -> str:
        return PREFIX + self.path


def is_remote(text: str) -> bool:
    return text.startswith(PREFIX)


def parse_remote(text: str) -> Remote:
    if not is_remote(text):
        raise UsageError(f"{text!r} is not in your drive: write kgpu:PATH (or kgpu:shared/ORG/PATH)")
    path = text[len(PREFIX):]
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise UsageError(f"{text!r}: '.' and '..' are not allowed in drive paths")
    return Remote("/".join(segments), folder_hint=path.endswith("/"))


@dataclass(frozen=True)
class PodSide:
    gpu_id: str
    path: str  # relative to /workspace, or absolute; "" is /workspace

    @property
    def route(self) -> str:
        return f"/v1/gpus/{self.gpu_id}/files/{self.path}"

    def __str__(self) -> str:
        return f"{self.gpu_id}:{self.path}"


def pod_side(text: str) -> PodSide | None:
    """``gpu-…:PATH`` as a PodSide; None for anything else (a local path, ``kgpu:…``)."""
    match = _POD_SIDE.match(text)
    return PodSide(match.group(1), match.group(2)) if match else None
