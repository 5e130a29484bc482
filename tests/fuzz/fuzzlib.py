"""A seeded mutator and a case runner for fuzzing compactor's inputs (used by the bounded
fuzz tests in ``make test`` and by ``bench/fuzz.py``, which runs many more cases).

Every case must end in a :class:`CompactorError` (the CLI's one-line ``error:``, exit 2) or
a correct result — never another exception, never a hang past the time bound, and never an
output left behind.
"""

from __future__ import annotations

import json
import random
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class CaseTimeout(Exception):
    pass


@dataclass
class Outcome:
    target: str
    case: int
    mutation: str
    result: str  # "ok", "refused" (CompactorError) or "FAIL: ..."
    message: str = ""


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One of: truncate, flip bits, overwrite a little-endian integer with an extreme value,
    duplicate a slice, zero a slice."""
    b = bytearray(data)
    kind = rng.choice(["truncate", "flip", "int", "dup", "zero"])
    n = len(b)
    if kind == "truncate" or n < 16:
        cut = rng.randrange(0, max(n, 1))
        return bytes(b[:cut]), f"truncate at {cut}"
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), "flip bits"
    if kind == "int":
        i = rng.randrange(0, max(1, min(n - 8, 4096)))
        v = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 10**12])
        b[i:i + 8] = struct.pack("<Q", v)
        return bytes(b), f"u64 {v} at {i}"
    if kind == "dup":
        i = rng.randrange(n)
        j = min(n, i + rng.randint(1, 256))
        return bytes(b[:j] + b[i:j] + b[j:]), f"duplicate {i}..{j}"
    i = rng.randrange(n)
    j = min(n, i + rng.randint(1, 256))
    b[i:j] = bytes(j - i)
    return bytes(b), f"zero {i}..{j}"


def run_case(fn: Callable[[], object], seconds: float = 30.0) -> tuple[str, str]:
    """("ok" | "refused" | "FAIL: <type>", message) of calling ``fn`` within ``seconds``."""
    from compactor.errors import CompactorError

    def alarm(*_):
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
        return "ok", ""
    except CompactorError as exc:
        msg = str(exc)
        if "\n" in msg.strip():
            return "FAIL: multi-line error", msg[:300]
        return "refused", msg[:300]
    except CaseTimeout:
        return "FAIL: timeout", f"over {seconds} s"
    except Exception as exc:  # anything else is a bug: a traceback for the user
        return f"FAIL: {type(exc).__name__}", str(exc)[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def leftovers(directory: Path, before: set[str]) -> list[str]:
    """Files or directories that appeared in ``directory`` (temporary or half-written)."""
    return sorted(p.name for p in directory.iterdir() if p.name not in before)


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, target, case, mutation, result, message=""):
        self.outcomes.append(Outcome(target, case, mutation, result, message))

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result.startswith("FAIL")]

    def to_json(self) -> str:
        return json.dumps([o.__dict__ for o in self.outcomes], indent=1)
