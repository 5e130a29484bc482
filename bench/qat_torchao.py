"""The peer rows of bench/qat.py: torchao's QAT, shipped to llama.cpp the way its user would.

    # torchao is not in compactor's pinned set: its own venv (compactor's set + torchao)
    python3 -m venv ../ao-venv && ../ao-venv/bin/pip install -r requirements.lock torchao==0.18.0
    ../ao-venv/bin/pip install --no-deps -e .
    ../ao-venv/bin/python bench/qat.py --resume --rows "llama.cpp q4_0 + imatrix (no QAT)" \\
        "torchao qat 64k -> llama.cpp q4_0 + imatrix"

* ``torchao`` row: torchao's ``QATConfig`` prepare with ``IntxFakeQuantizeConfig(int4,
  group_size=32, symmetric)`` on every decoder linear (the embedding and tied head stay float,
  as Q8_0 in the file), trained by compactor's distill trainer on exactly the QAD rows' data,
  objective and optimizer (KL to the float original, ``calib:mix`` windows, the ``QAT``
  settings of bench/qat.py), so the one difference is the grid trained in; then torchao's
  convert step (back to plain linears holding the trained float weights), export to an F32
  GGUF, llama.cpp's importance matrix of the trained model on the 128 x 512 calib:mix
  windows, and ``llama_model_quantize`` to Q4_0. torchao's int4 grid (scale = absmax / 7.5,
  levels -8..7, fp32 scale) is not Q4_0's (scale = the signed max / -8, fp16), so what the
  training adapted to is re-rounded by llama.cpp: the grid-mismatch loss.
* ``llamacpp`` row: the same export and quantization of the untrained float model (the
  baseline torchao's QAT must beat), side by side in the same run.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from compactor.data.windows import domain_windows, windows_for
from compactor.distill.config import DistillConfig
from compactor.distill.student import Student
from compactor.distill.teacher import LiveTeacher
from compactor.distill.trainer import Distiller, use_bf16
from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.export.llamacpp import collect_imatrix, llamacpp_quantize
from compactor.models.adapters import decoder_layers

CALIB = ("calib:mix", 128, 512)  # the imatrix windows, as in bench/vs_llamacpp.py


def _prepare(model, adapter):
    """torchao's QAT prepare on the decoder linears; returns its settings."""
    import torchao
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    targets = {id(layer.get_submodule(n)) for layer in decoder_layers(model, adapter) for n in adapter.linears}
    wc = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    quantize_(model, QATConfig(weight_config=wc, step="prepare"), filter_fn=lambda m, fqn: id(m) in targets)
    desc = (f"IntxFakeQuantizeConfig: {wc.dtype}, group {wc.granularity.group_size}, {wc.mapping_type.name.lower()}, "
            f"scale {wc.scale_precision}, range_learning={wc.range_learning}")
    return {"torchao": torchao.__version__, "weight_config": desc, "modules": len(targets)}


def _train(work, ref, tokens: int, qat: dict, resume: bool):
    """torchao-prepared copy of the float model, trained like the QAD rows; (model, report)."""
    import copy

    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    model = copy.deepcopy(ref.model)
    setup = _prepare(model, ref.adapter)
    keys = {f.name for f in dataclasses.fields(DistillConfig)}
    cfg = DistillConfig(teacher="original", student="current", ce=0.0, kl=1.0, data="calib:mix", tokens=tokens,
                        **{k: v for k, v in qat.items() if k in keys})
    cap = max(cfg.tokens, cfg.batch * cfg.window)  # one epoch of the budget, as the qat step sizes it
    ids = windows_for(ref.tokenizer, cfg.data, cfg.window, max_tokens=cap).input_ids
    ev = domain_windows(ref.tokenizer, cfg.eval_data, cfg.window, max_tokens=cfg.eval_tokens)

    def groups(m):
        m.requires_grad_(False)  # embedding, norms, head: as the file has them (float / Q8_0)
        weights = [mod.weight for mod in m.modules() if isinstance(mod, FakeQuantizedLinear)]
        for w in weights:
            w.requires_grad_(True)
        return [{"params": weights}]

    teacher = ref.model.eval()
    trainer = Distiller(Student(model, list(range(model.config.num_hidden_layers)), ["torchao QAT"]),
                        LiveTeacher(teacher, use_bf16(cfg.precision)), cfg, ids, work / "train",
                        teacher_model=teacher, eval_windows=next(iter(ev.values())), progress=True,
                        identity={"teacher": "float original", "peer": json.dumps(setup)}, param_groups=groups)
    res = trainer.train(resume=resume)
    model = trainer.student.model.eval()
    quantize_(model, QATConfig(step="convert"))  # fake quantizers off: plain linears, trained weights
    first = res.evals[0] if res.evals and res.resumed_from is None else None
    report = {"tokens": res.tokens, "steps": res.steps, "train_seconds": round(res.seconds, 1),
              "train_tok_s": round(res.tokens_per_s, 1), "learned": "weights (torchao int4 g32 fake quant)",
              "before": first, "after": res.evals[-1] if res.evals else None,
              "precision": "bf16" if trainer.autocast else "fp32", "resumed_from": res.resumed_from, **setup}
    return model.requires_grad_(False), report


def peer_dir(work, ref, name: str, kind: str, tokens: int, qat: dict, resume: bool):
    """(directory holding model.gguf, training report or None) of a peer row of bench/qat.py."""
    out = work / name.split(" ->")[0].replace(" ", "-").replace("(", "").replace(")", "")
    report_path = out / "train.json"
    if (out / "model.gguf").exists():
        return out, json.loads(report_path.read_text()) if report_path.exists() else None
    out.mkdir(parents=True, exist_ok=True)
    model, report = (ref.model, None) if kind == "llamacpp" else _train(out, ref, tokens, qat, resume)
    loaded = dataclasses.replace(ref, model=model)
    f32 = out / "float-f32.gguf"
    export_gguf(model, f32, types=GGUFTypes("f32", "f32"), tokenizer_gguf=ref.gguf, tokenizer=ref.tokenizer,
                adapter=ref.adapter)
    spec, n, length = CALIB
    imatrix = collect_imatrix(loaded, windows_for(ref.tokenizer, spec, length, max_tokens=n * length))
    tmp = out / "model.gguf.tmp"
    llamacpp_quantize(f32, tmp, "q4_0", imatrix)
    f32.unlink()
    if report is not None:
        report_path.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "model.gguf")
    return out, report
