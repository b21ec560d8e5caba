"""Helpers shared by the benchmark scripts: machine description, CSV output, data location."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPUs ({cpu}), torch threads {torch.get_num_threads()}, {gpu}, "
            f"torch {torch.__version__}")


def today() -> str:
    return _dt.date.today().isoformat()


def default_data_dir() -> str | None:
    """BPDL_DATA_DIR if set; else the project's shared data copy if present; else None (the
    user cache)."""
    if os.environ.get("BPDL_DATA_DIR"):
        return os.environ["BPDL_DATA_DIR"]
    return None


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
