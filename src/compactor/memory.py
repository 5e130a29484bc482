"""Memory sizes as people write them ("8GB", "512MiB"), and the memory this process may use."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"8GB"`` -> 8e9 bytes, ``"6GiB"`` -> 6·2^30; a plain number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size (e.g. 8GB, 512MB, 6GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_bytes() -> int:
    """Memory available to a new allocation now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def anonymous_rss() -> int:
    """This process's resident memory that is not file-backed (RSS minus shared pages):
    what the kernel cannot drop under pressure — mapped checkpoint pages it can."""
    import psutil

    m = psutil.Process().memory_info()
    return int(m.rss - getattr(m, "shared", 0))


class MemoryGuard:
    """Enforce a memory cap while a block runs: a thread samples :func:`anonymous_rss`
    every ``interval`` seconds and, past ``cap``, interrupts the main thread, which leaves
    the block with :class:`~compactor.errors.MemoryCapExceeded` (exit 2) — a clean stop
    whose outputs are never half-written, rather than the kernel's OOM killer. ``where``
    names the cap in the message (``--max-memory 8GB``); ``planned``: the plan's estimate.
    Outside the main thread (nothing to interrupt) it only records the peak."""

    def __init__(self, cap: int, where: str, planned: int | None = None, interval: float = 0.1):
        self.cap, self.where, self.planned, self.interval = cap, where, planned, interval
        self.peak = 0
        self.tripped: int | None = None

    def __enter__(self) -> "MemoryGuard":
        import threading

        self._stop = threading.Event()
        self._interrupt = threading.current_thread() is threading.main_thread()
        self._thread = threading.Thread(target=self._watch, name="compactor-memory-guard", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        import _thread

        while not self._stop.wait(self.interval):
            now = anonymous_rss()
            self.peak = max(self.peak, now)
            if now > self.cap and self.tripped is None:
                self.tripped = now
                if self._interrupt:
                    _thread.interrupt_main()
                return

    def __exit__(self, exc_type, exc, tb) -> bool:
        from compactor.errors import MemoryCapExceeded

        try:
            self._stop.set()
            self._thread.join()
        except KeyboardInterrupt:  # our interrupt, arriving as the block ended
            exc_type = KeyboardInterrupt
        if self.tripped is not None and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
            plan = f"; the plan estimated {fmt_bytes(self.planned)}" if self.planned else ""
            raise MemoryCapExceeded(
                f"memory: the process reached {fmt_bytes(self.tripped)} (resident, not file-backed), over "
                f"the cap of {fmt_bytes(self.cap)} ({self.where}){plan}; stopped before the kernel would "
                "kill it, and nothing was written. Raise the cap, add --spill-activations, or lower "
                "the batch; --resume continues a run's checkpointed steps") from None
        return False
