"""What can be rented: GPU classes per node, their prices, and which indices are free."""

from __future__ import annotations

import json
import shutil
import subprocess

from pydantic import BaseModel, Field, TypeAdapter

from gateway.settings import Settings

CREDITS_PER_DOLLAR = 1500


class GpuClass(BaseModel):
    node: str = "local"
    gpu_model: str
    count: int = Field(ge=0)
    price_per_hour_credits: int = Field(ge=0)
    # False: the engine says the node cannot take work now (down, drained); nothing is placed there.
    ready: bool = True


def detect_gpus() -> list[str]:
    """GPU names from nvidia-smi, or [] where there is none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


GPU_BUSY_PERCENT = 5  # the load probe (seed 001): a GPU this busy is working


def gpus_busy(indices: list[int]) -> bool:
    """Whether one of this host's GPUs ``indices`` is more than 5 % busy, as nvidia-smi says
    (False where there is none). The host's nvidia-smi: never a pod's own binary."""
    if not indices or not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i",
             ",".join(str(i) for i in indices)],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(busy_line(line) for line in out.stdout.splitlines())


def busy_line(line: str) -> bool:
    """One line of ``nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits``."""
    try:
        return float(line.strip()) > GPU_BUSY_PERCENT
    except ValueError:
        return False  # "[N/A]" and the like


def model_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    words = [w for w in name.lower().replace("nvidia", "").split() if w]
    return words[0] if words else "gpu"


def load_inventory(settings: Settings) -> list[GpuClass]:
    if settings.gpu_inventory:
        return TypeAdapter(list[GpuClass]).validate_python(json.loads(settings.gpu_inventory))
    names = detect_gpus()
    if names:
        return [
            GpuClass(
                node="local",
                gpu_model=model_slug(names[0]),
                count=len(names),
                price_per_hour_credits=settings.gpu_price_per_hour_credits,
            )
        ]
    return [GpuClass(node="local", gpu_model="cpu", count=0, price_per_hour_credits=settings.cpu_price_per_hour_credits)]


def free_indices(gpu_class: GpuClass, busy: set[int]) -> list[int]:
    if not gpu_class.ready:
        return []
    return [i for i in range(gpu_class.count) if i not in busy]
