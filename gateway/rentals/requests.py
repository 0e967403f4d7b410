"""What a rental request may ask for: its fields' checks, and the checks a run's command and
environment share with a pod's (what exec(2) can carry)."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from gateway.bounds import PlainText, dns_label

RentalName = dns_label(30, "name must be DNS-safe: lowercase letters, digits and inner '-', at most 30")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMAGE = re.compile(r"^[\x21-\x7e]+$")  # a docker reference: printable ASCII, no spaces
# What exec(2) can carry: Linux refuses one argument or NAME=value over 128 KiB, and all of
# argv and the environment together over about 2 MiB (E2BIG). A pod's env, and a run's
# command and env, each stay well inside that, with room for the image's own environment.
MAX_EXEC_STRING_BYTES = 64 << 10
MAX_EXEC_TOTAL_BYTES = 256 << 10
MAX_MEMORY_BYTES = 128 << 30
# ASCII digits only: Python's \d, int() and float() also take other scripts' digits, and float()
# takes "1_0" and "1e1", none of which a backend is given.
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?", re.ASCII)
_CORES = re.compile(r"(\d+(?:\.\d+)?)(m?)", re.ASCII)
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def parse_memory(value: str) -> int:
    match = _QUANTITY.fullmatch(value.strip())
    if not match:
        raise ValueError("memory must be a quantity such as 16Gi or 512Mi")
    amount = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(amount) or amount > MAX_MEMORY_BYTES:
        raise ValueError("memory must be more than 0 and at most 128Gi")
    return int(amount)


def parse_cpu(value: str | float) -> float:
    match = _CORES.fullmatch(str(value).strip())
    if not match:
        raise ValueError("cpu must be a number of cores such as 2 or 500m")
    cores = float(match.group(1))
    return cores / 1000 if match.group(2) else cores


def _exec_bytes(what: str, text: str) -> int:
    """Bytes one string takes in exec(2)'s argv or environment; what exec cannot carry is refused."""
    if "\x00" in text:
        raise ValueError(f"{what} holds a NUL character, which no process can be given")
    try:
        size = len(text.encode("utf-8")) + 1
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None
    if size > MAX_EXEC_STRING_BYTES:
        raise ValueError(f"{what} is {size} bytes; one argument or variable is at most {MAX_EXEC_STRING_BYTES}")
    return size


def _check_total(what: str, total: int) -> None:
    if total > MAX_EXEC_TOTAL_BYTES:
        raise ValueError(f"{what} is {total} bytes in all; at most {MAX_EXEC_TOTAL_BYTES}")


def check_env(value: dict[str, str] | None) -> dict[str, str] | None:
    """Extra environment of a pod or a run: valid names, none of the variables kgpu sets, and
    values exec can carry (no NUL, bounded sizes)."""
    total = 0
    for name, text in (value or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"env name {name[:100]!r} is not a valid variable name")
        if name.startswith("KGPU_") or name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
            raise ValueError(f"env {name} is set by kgpu and cannot be overridden")
        total += _exec_bytes(f"env {name}", f"{name}={text}")
    _check_total("env", total)
    return value


def check_command(value: list[str]) -> list[str]:
    """A run's argv: strings exec can carry (no NUL, bounded sizes)."""
    _check_total("command", sum(_exec_bytes(f"command[{n}]", arg) for n, arg in enumerate(value)))
    return value


class RentRequest(BaseModel):
    name: RentalName = Field(default="rent", max_length=30)
    image: str | None = Field(default=None, max_length=300, pattern=_IMAGE.pattern)
    gpu_model: PlainText | None = Field(default=None, max_length=100)
    gpu_count: int | None = Field(default=None, ge=0, le=4)
    cpu: Annotated[str, Field(max_length=20)] | float = "2"
    memory: str = Field(default="16Gi", max_length=20)
    ephemeral_storage_gib: int = Field(default=100, ge=1, le=100)
    duration_hours: int = Field(default=12, ge=1, le=168)
    env: dict[str, str] | None = None
    ssh_pubkey: str | None = Field(
        default=None, max_length=16384,
        description="your OpenSSH public key (ed25519, ecdsa, RSA >= 2048) for SSH into the pod; omitted: one is minted "
                    "and its private half returned once (docs/ssh.md)",
    )
    queue: bool = Field(default=False, description="when no GPU is free, wait in the queue (phase Queued) rather than 409")

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value):
        try:
            cores = parse_cpu(value)
        except ValueError:
            raise ValueError("cpu must be a number of cores such as 2 or 500m") from None
        if not 0 < cores <= 16:
            raise ValueError("cpu must be more than 0 and at most 16 cores")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not 0 < parse_memory(value) <= 128 << 30:
            raise ValueError("memory must be more than 0 and at most 128Gi")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value):
        return check_env(value)
