"""AutoRound's GGUF files on the setup of bench/vs_llamacpp.py, scored in llama.cpp beside ours.

    # auto-round pulls datasets / accelerate / py-cpuinfo, which compactor does not pin, so it
    # lives in its own venv (compactor's pinned set + auto-round; compactor itself --no-deps).
    # Its GGUF writer imports sentencepiece before it falls back to the BPE vocabulary
    # SmolLM2 has, and does not declare it:
    python3 -m venv ../ar-venv && ../ar-venv/bin/pip install -r requirements.lock auto-round==0.16.1 sentencepiece
    ../ar-venv/bin/pip install --no-deps -e .
    ../ar-venv/bin/python bench/autoround.py [--rows q4_0:0 q4_k_m:0 q4_0:200] [--resume]

A row is ``FORMAT:ITERS``: AutoRound's ``gguf:FORMAT`` scheme and export, with ``ITERS`` = 0 its
optimized RTN and 200 its default sign-round tuning (``ITERS:LR`` sets a learning rate, e.g.
``q4_0:50:5e-3``, its "light" recipe). Same float model (the dequantized bundled GGUF), the same
128 x 512 ``calib:mix`` windows compactor and llama.cpp's importance matrix calibrate on (given
to AutoRound as token tensors, not re-tokenized text), the same four evaluation domains and the
same cached float reference logits. Each file is scored in llama.cpp and appended to
bench/results/vs_llamacpp.json (tool "AutoRound"); vs_llamacpp.md is re-rendered with the
AutoRound comparison. Wall time and peak RSS (getrusage) of AutoRound's quantize-and-save.
Run it alone: it rewrites vs_llamacpp.json, as vs_llamacpp.py does.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time

import torch
from _common import provenance
from vs_llamacpp import JSON, _write

from compactor.data.windows import domain_windows, windows_for
from compactor.evaluate import evaluate
from compactor.evaluate.backends import CachedBackend, TorchBackend
from compactor.evaluate.memory import peak_rss_bytes, reset_peak_rss
from compactor.io import home
from compactor.models.load import load_model

CALIB = "calib:mix"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=["q4_0:0", "q4_k_m:0", "q4_0:200", "q4_k_m:200"])
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="per evaluation domain")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    import auto_round
    from auto_round import AutoRound

    prov = provenance()
    work = home() / "bench" / "vs_llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    ref = load_model("smollm2-135m")
    win = domain_windows(ref.tokenizer, "domains", 512, max_tokens=args.eval_tokens)
    calib = windows_for(ref.tokenizer, CALIB, 512, max_tokens=args.calib_samples * 512)
    cached_ref = CachedBackend(TorchBackend(ref.model, "reference"), half=True, directory=work / "reference-logits")
    setup = {"eval": {s: w.provenance for s, w in win.items()}, "calibration": {CALIB: calib.provenance}}
    ref_params = sum(p.numel() for p in ref.model.parameters())
    for row in args.rows:
        fmt, iters, *lr = row.split(":")
        name = f"AutoRound {auto_round.__version__} {fmt.upper()} iters {iters}" + (f" lr {lr[0]}" if lr else "")
        rows = json.loads(JSON.read_text()) if JSON.exists() else []
        if args.resume and any(r["name"] == name and r.get("calibration") == CALIB for r in rows):
            continue
        out = work / f"autoround-{fmt}-iters{iters}{'-lr' + lr[0] if lr else ''}"
        shutil.rmtree(out, ignore_errors=True)
        model = copy.deepcopy(ref.model)
        samples = [calib.input_ids[i:i + 1] for i in range(len(calib.input_ids))]
        reset_peak_rss()
        t0 = time.perf_counter()
        ar = AutoRound(model, ref.tokenizer, scheme=f"gguf:{fmt}", iters=int(iters), dataset=samples,
                       seqlen=calib.length, nsamples=len(samples), device_map="cpu",
                       **({"lr": float(lr[0])} if lr else {}))
        ar.quantize_and_save(output_dir=str(out), format=f"gguf:{fmt}")
        seconds = time.perf_counter() - t0
        rss = peak_rss_bytes()
        found = sorted(out.rglob("*.gguf"))
        if len(found) != 1:
            raise SystemExit(f"error: AutoRound wrote {len(found)} .gguf files under {out}: {found}")
        path = work / f"{out.name}-mix.gguf"
        found[0].replace(path)
        r = evaluate(str(path), win, reference=cached_ref, speed=False, name=name, progress=False)
        rec = dict(name=name, tool="AutoRound", file=str(path), size_bytes=path.stat().st_size,
                   calibration=CALIB, params=r.params, bpw=path.stat().st_size * 8 / ref_params, ppl=r.ppl,
                   ref_ppl=r.ref_ppl, kld_mean=r.kld_mean, kld_p99=r.kld_p99, top1=r.top1, domains=r.domains,
                   type=fmt, iters=int(iters), lr=float(lr[0]) if lr else None, seconds=round(seconds, 1),
                   peak_rss_bytes=rss, threads=torch.get_num_threads(), prov=prov)
        rows = [x for x in (json.loads(JSON.read_text()) if JSON.exists() else [])
                if not (x["name"] == name and x.get("calibration") == CALIB)] + [rec]
        _write(rows, setup)
        print(f"{name}: {rec['bpw']:.3f} bpw, mean KLD {r.kld_mean:.4f}, {seconds:.0f} s", flush=True)
        del model, ar


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
