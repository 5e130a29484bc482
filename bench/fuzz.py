"""Fuzz compactor's inputs with many more cases than `make test` runs.

    python bench/fuzz.py [--cases 200] [--seed 0] [--targets gguf safetensors recipe text topk-cache]

Targets and mutations: ``tests/fuzz/targets.py``. Every case must end in a one-line
CompactorError (exit 2 at the CLI) or a correct result, within its time bound, leaving no
temporary output behind. Outcomes go to ``bench/results/fuzz.json``; the table renders from
it, with the bugs earlier runs found (``bench/results/fuzz_findings.json``, a hand-kept
record of what was fixed, each with its commit).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from _common import RESULTS, provenance, write_result  # noqa: E402

from tests.fuzz.targets import TARGETS, run_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200, help="cases per target")
    ap.add_argument("--gguf-cases", type=int, default=40,
                    help="cases for the GGUF target (each converts a model, ~10 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "fuzz.json"
    if not args.table_only:
        prov = provenance()
        t0 = time.perf_counter()
        report = None
        for t in args.targets:
            with tempfile.TemporaryDirectory() as tmp:
                part = run_all(Path(tmp), args.gguf_cases if t == "gguf" else args.cases, args.seed, [t])
            report = part if report is None else report
            if part is not report:
                report.outcomes += part.outcomes
        path.write_text(json.dumps({"prov": prov, "cases": args.cases, "gguf_cases": args.gguf_cases,
                                    "seed": args.seed,
                                    "seconds": round(time.perf_counter() - t0, 1),
                                    "outcomes": [o.__dict__ for o in report.outcomes]}, indent=1))
    rec = json.loads(path.read_text())
    findings = json.loads((RESULTS / "fuzz_findings.json").read_text())
    counts = Counter((o["target"], o["result"].split(":")[0]) for o in rec["outcomes"])
    targets = sorted({o["target"] for o in rec["outcomes"]})
    rows = "\n".join(f"| {t} | {sum(v for (tt, _), v in counts.items() if tt == t)} | {counts[(t, 'ok')]} | "
                     f"{counts[(t, 'refused')]} | {counts[(t, 'FAIL')]} |" for t in targets)
    fails = [o for o in rec["outcomes"] if o["result"].startswith("FAIL")]
    p = rec["prov"]
    body = (f"{rec['cases']} cases per target ({rec.get('gguf_cases', rec['cases'])} for gguf), seed {rec['seed']}, {rec['seconds']:.0f} s; commit "
            f"{p['commit']}, {p['date']}, `{p['command']}`.\n\n"
            "| target | cases | ok (a correct result) | refused (one-line error, exit 2) | failures |\n"
            "|---|---|---|---|---|\n" + rows + "\n\n"
            + ("Failures:\n\n" + "\n".join(f"- {o['target']} #{o['case']} ({o['mutation']}): {o['result']} "
                                           f"{o['message'][:200]}" for o in fails[:30]) + "\n\n"
               if fails else "No failures.\n\n")
            + "Found and fixed by earlier runs:\n\n"
            + "\n".join(f"- {f['target']}: {f['found']} — fixed: {f['fix']} ({f['commit']})" for f in findings))
    write_result("fuzz", "Fuzzing compactor's inputs", body)


if __name__ == "__main__":
    main()
