"""What a failed torchrun run said: the launcher's own report ends stderr, and the line that
names a worker's real failure (a Python traceback, or a C++ ``terminate called ... what():``
before a SIGABRT) lies further up, where a plain tail of stderr cuts it off."""

from __future__ import annotations

import re

_CAUSE = re.compile(r"Error|Exception|terminate called|what\(\)|Traceback|Aborted|\[rank\d+\]")


def failure(proc, tail: int = 1500) -> str:
    """A message for an assertion on ``proc`` (a ``subprocess.CompletedProcess``): the workers'
    failure lines (outside the launcher's own frames), then the tail of stderr."""
    lines = [ln for ln in proc.stderr.splitlines()
             if _CAUSE.search(ln) and "torch/distributed/elastic" not in ln and "ChildFailedError" not in ln]
    return "\n".join(["exit code %s; worker lines:" % proc.returncode, *lines[-30:], "--- stderr tail:",
                      proc.stderr[-tail:]])
