"""Shared helpers for benchmarks: machine description and writing result tables."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def write_result(name: str, title: str, body: str) -> Path:
    """Write ``bench/results/<name>.md`` with the regenerating command and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = "?"
    text = (f"# {title}\n\nRegenerate: `{cmd}`  \nMachine: {machine()}  \n"
            f"Commit: {rev}, {time.strftime('%Y-%m-%d')}\n\n{body}\n")
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path
