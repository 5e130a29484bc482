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
            f"Rendered at commit {rev}, {time.strftime('%Y-%m-%d')} (where rows list their runs, those "
            f"say which code measured them)\n\n{body}\n")
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path


_PROVENANCE: dict | None = None


def provenance() -> dict:
    """Where a result row comes from: commit (with a dirty marker), command, date, machine —
    taken once, when the benchmark first asks (call it at start-up, before any work), so a
    commit made while a long benchmark runs is not credited with its rows."""
    global _PROVENANCE
    if _PROVENANCE is None:
        _PROVENANCE = _provenance_now()
    return dict(_PROVENANCE)


def _provenance_now() -> dict:
    root = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=root).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, cwd=root).stdout.strip())
    except OSError:
        rev, dirty = "?", True
    return {"commit": rev + ("-dirty" if dirty else ""),
            "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}


def provenance_lines(records: list[dict]) -> str:
    """One line per distinct provenance among ``records`` (rows carry ``prov``), numbered so
    that table rows can point at theirs."""
    seen: list[dict] = []
    for r in records:
        if r.get("prov") and r["prov"] not in seen:
            seen.append(r["prov"])
    return "\n".join(f"- [{i + 1}] commit {p['commit']}, {p['date']}, `{p['command']}`; {p['machine']}"
                     for i, p in enumerate(seen))


def prov_ref(records: list[dict], rec: dict) -> str:
    """The number :func:`provenance_lines` gives ``rec``'s provenance."""
    seen: list[dict] = []
    for r in records:
        if r.get("prov") and r["prov"] not in seen:
            seen.append(r["prov"])
    return f"[{seen.index(rec['prov']) + 1}]" if rec.get("prov") in seen else ""


def stored_rows(path: Path, keep: bool) -> list[dict]:
    """The rows a benchmark stored earlier when ``keep`` (``--resume`` / ``--table-only``),
    else none (a fresh run starts its file over)."""
    import json

    return json.loads(path.read_text()) if keep and path.exists() else []
