"""``--quiet`` and ``--json`` for every subcommand: output for scripts.

* ``--quiet``: nothing on the terminal but errors — no progress bars, no tables, no notes.
* ``--json``: the command's result as one JSON document on standard output, and everything
  a person would read (progress, tables, notes) on standard error; ``--json FILE`` writes
  the document to FILE instead and leaves the terminal output as it is. On stdout an error
  is a JSON document too (``{"error": ..., "exit_code": ...}``), so a script always gets one;
  a FILE is written only when the command measured something (a failed gate's exit 3 still
  carries its measurements).

Standard output is redirected at the file-descriptor level while a command runs, so text
printed by native code (llama.cpp, onnxruntime) cannot corrupt the JSON either.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator


def add_output_args(p: argparse.ArgumentParser) -> None:
    """Add ``--quiet`` and ``--json [FILE]`` to one subcommand's parser."""
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors (no progress bars, tables or notes)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="the result as JSON: on stdout (human output then goes to stderr), or to FILE")


def set_result(args: argparse.Namespace, **payload) -> None:
    """Record what a command produced; ``--json`` prints or writes it when the command ends."""
    result = getattr(args, "result", None) or {}
    result.update(payload)
    args.result = result


def stage_result(args: argparse.Namespace, ctx) -> None:
    """The result of a recipe run (``ctx``): where it wrote, each stage's metrics, the step reports."""
    set_result(args, out_dir=str(ctx.out_dir), results=[r.to_dict() for r in ctx.results],
               reports=list(ctx.reports))


def _json_safe(obj):
    """NaN / inf are not JSON: they become null, as a script can read them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@contextlib.contextmanager
def _fd_redirect(fd: int, target: int) -> Iterator[None]:
    """Point file descriptor ``fd`` at ``target`` (and back afterwards)."""
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    saved = os.dup(fd)
    try:
        os.dup2(target, fd)
        yield
    finally:
        stream.flush()
        os.dup2(saved, fd)
        os.close(saved)


@contextlib.contextmanager
def output_streams(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs: under ``--quiet`` its stdout and stderr go nowhere; under
    ``--json`` (to stdout) its stdout goes to stderr, keeping stdout for the document."""
    quiet = getattr(args, "quiet", False)
    to_stdout = getattr(args, "json", None) == "-"
    if not quiet and not to_stdout:
        yield
        return
    with contextlib.ExitStack() as stack:
        # Both levels: the descriptors for native code, sys.stdout / sys.stderr for Python
        # (which may not be the descriptors, e.g. under pytest's capture).
        if quiet:
            null = os.open(os.devnull, os.O_WRONLY)
            stack.callback(os.close, null)
            stack.enter_context(_fd_redirect(1, null))
            stack.enter_context(_fd_redirect(2, null))
            sink = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
        else:
            stack.enter_context(_fd_redirect(1, 2))
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        yield


def emit(args: argparse.Namespace, exit_code: int, error: str | None = None) -> None:
    """Write the ``--json`` document of a finished command (its result, or its error)."""
    dest = getattr(args, "json", None)
    result = getattr(args, "result", None)
    # A file is written only for a command that produced a result (a failed gate still has
    # its measurements); bad input leaves no file behind, only its error on stdout.
    if dest is None or (dest != "-" and result is None):
        return
    from compactor.distributed import dist_info

    if dist_info()[0] != 0:  # under torchrun, rank 0 reports (the others write nothing either)
        return
    doc = {"command": getattr(args, "command", None), "exit_code": exit_code}
    if error is not None:
        doc["error"] = error
    doc.update(result or {})
    text = json.dumps(_json_safe(doc), indent=2, default=str)
    if dest == "-":
        print(text, flush=True)
    else:
        tmp = Path(dest).with_name(Path(dest).name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(dest)
