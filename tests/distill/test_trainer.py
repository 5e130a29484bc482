"""The distillation trainer on tiny models: KD beats CE-only, accumulation and processes do
not change the loss curve, a SIGKILLed run resumes exactly, checkpoints are bound to a run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compactor.data.windows import make_windows
from compactor.distill.teacher import LiveTeacher, TopKCache
from compactor.distill.trainer import Distiller, lr_factor
from compactor.errors import CompactorError
from tests.torchrun import failure

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from tiny_run import pretrain, setup  # noqa: E402


def _run(tmp, name, teacher=None, **over):
    t0, student, cfg, ids = setup(**over)
    if teacher is not None:
        from compactor.distill.student import build_student

        student = build_student(teacher, "layers:every-other", progress=False)
    teacher = teacher or t0
    ev = make_windows(ids[-16:].flatten(), 32)
    tr = Distiller(student, LiveTeacher(teacher), cfg, ids[:-16], tmp / name, teacher_model=teacher,
                   eval_windows=ev, progress=False)
    losses = []
    res = tr.train(on_step=lambda d, r: losses.append(r))
    return tr, res, losses


def test_kd_student_beats_ce_only_student(tmp_path):
    # A teacher better than what the student reaches alone (held-out PPL 2.4 vs the CE-only
    # student's 2.6): against a 60-step teacher (PPL 7.2) CE-only reaches 6.1 and KD, which
    # follows the teacher, ends at 7.9 — KD can only be as good as its teacher.
    teacher, _, _, ids = setup()
    pretrain(teacher, ids[:-16], steps=300)
    common = dict(tokens=32 * 8 * 30, hidden_mse=0.0, checkpoint_every=0, eval_tokens=512, teacher=teacher)
    _, ce, _ = _run(tmp_path, "ce", ce=1.0, kl=0.0, **common)
    _, kd, _ = _run(tmp_path, "kd", ce=0.0, kl=1.0, **common)
    before = ce.evals[0]["kld"]
    assert kd.evals[0]["kld"] == pytest.approx(before)  # the same starting student
    assert kd.evals[-1]["kld"] < ce.evals[-1]["kld"] < before
    # KLD is what KD optimizes. On held-out perplexity (CE-only's own objective) both must
    # improve and KD must stay within 5 % of CE-only (measured: 2.61 vs 2.58 — on this toy KD
    # does not beat CE on perplexity, only on agreement with the teacher).
    assert kd.evals[-1]["ppl"] < kd.evals[0]["ppl"] and ce.evals[-1]["ppl"] < ce.evals[0]["ppl"]
    assert kd.evals[-1]["ppl"] <= ce.evals[-1]["ppl"] * 1.05
    assert kd.evals[-1]["teacher_ppl"] < ce.evals[-1]["ppl"]  # the premise: a better teacher
    assert kd.tokens == ce.tokens == 32 * 8 * 30


def test_gradient_accumulation_does_not_change_the_curve(tmp_path):
    _, _, a = _run(tmp_path, "a", micro_batch=8, checkpoint_every=0)
    _, _, b = _run(tmp_path, "b", micro_batch=2, checkpoint_every=0)
    assert len(a) == len(b) == 10
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "kl", "hidden_mse"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def _proc(args, env=None, check=True):
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
             OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run(args, env=e, capture_output=True, text=True, timeout=600)
    assert not check or r.returncode == 0, failure(r)
    return r


def test_sigkilled_run_resumes_to_identical_weights(tmp_path):
    script = str(HERE / "tiny_run.py")
    _proc([sys.executable, script, str(tmp_path / "full"), str(tmp_path / "full.st")])
    killed = _proc([sys.executable, script, str(tmp_path / "cut"), str(tmp_path / "cut.st"), "--kill-at", "5"],
                   check=False)
    assert killed.returncode == -9 and not (tmp_path / "cut.st").exists()
    # Without --resume the leftover checkpoints are not silently overwritten.
    again = _proc([sys.executable, script, str(tmp_path / "cut"), str(tmp_path / "cut.st")], check=False)
    assert again.returncode != 0 and "--resume" in again.stderr
    _proc([sys.executable, script, str(tmp_path / "cut"), str(tmp_path / "cut.st"), "--resume"])
    full, cut = load_file(str(tmp_path / "full.st")), load_file(str(tmp_path / "cut.st"))
    assert json.loads((tmp_path / "cut.st.json").read_text())["resumed_from"] == 4
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    # The log holds each step once, as if never interrupted.
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
             if "loss" in ln]
    assert steps == list(range(1, 11))


@pytest.mark.parametrize("strategy, port", [("ddp", "29517"), ("fsdp", "29518")])
def test_torchrun_two_processes_match_one(tmp_path, strategy, port):
    script = str(HERE / "tiny_run.py")
    _proc([sys.executable, script, str(tmp_path / "one"), str(tmp_path / "one.st"), "--micro-batch", "2"])
    _proc([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           script, str(tmp_path / "two"), str(tmp_path / "two.st"), "--micro-batch", "2", "--strategy", strategy])
    # Checkpoints were written (collectively under FSDP) with whole tensors.
    ck = sorted((tmp_path / "two" / "checkpoints").glob("step_*"))
    assert ck and load_file(str(ck[-1] / "student.safetensors"))["model.model.embed_tokens.weight"].shape == (258, 64)
    one = json.loads((tmp_path / "one.st.json").read_text())["losses"]
    two = json.loads((tmp_path / "two.st.json").read_text())["losses"]
    assert len(one) == len(two) == 10
    assert one == pytest.approx(two, rel=1e-4)
    a, b = load_file(str(tmp_path / "one.st")), load_file(str(tmp_path / "two.st"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_checkpoint_of_another_run_is_refused(tmp_path):
    teacher, student, cfg, ids = setup(tokens=32 * 8 * 2)
    Distiller(student, LiveTeacher(teacher), cfg, ids, tmp_path, teacher_model=teacher, progress=False).train()
    # Same workdir, a different learning rate: another run.
    teacher, student, cfg2, ids = setup(tokens=32 * 8 * 2, lr=1e-3)
    tr = Distiller(student, LiveTeacher(teacher), cfg2, ids, tmp_path, teacher_model=teacher, progress=False)
    with pytest.raises(CompactorError, match="another run"):
        tr.train(resume=True)


def test_topk_cache_is_resumable_and_bound_to_its_windows(tmp_path):
    teacher, student, cfg, ids = setup()
    TopKCache.SHARD, saved = 16, TopKCache.SHARD
    try:
        c = TopKCache(tmp_path / "c", ids, 4, "t")
        c.build(teacher, progress=False)
        shard0 = (tmp_path / "c" / "shard_00000.npz")
        mtime = shard0.stat().st_mtime_ns
        (tmp_path / "c" / "shard_00001.npz").unlink()
        TopKCache(tmp_path / "c", ids, 4, "t").build(teacher, progress=False)  # only the missing shard
        assert shard0.stat().st_mtime_ns == mtime and (tmp_path / "c" / "shard_00001.npz").exists()
        out = c.targets(ids[:3], torch.tensor([0, 17, 40]))
        lp = torch.log_softmax(teacher(input_ids=ids[[0, 17, 40]]).logits, -1)
        v, i = lp.topk(4, -1)
        assert torch.equal(out.top_idx, i) and torch.allclose(out.top_logp, v, atol=2e-3)
        with pytest.raises(CompactorError, match="windows"):
            TopKCache(tmp_path / "c", ids[1:], 4, "t")
        with pytest.raises(CompactorError, match="live"):
            c.targets(ids[:1], torch.tensor([0]), hidden=True)
    finally:
        TopKCache.SHARD = saved


def test_bad_budgets_and_batches(tmp_path):
    from compactor.distill.config import DistillConfig
    from compactor.errors import ConfigError

    with pytest.raises(ConfigError, match="tokens"):
        DistillConfig(tokens=0)
    with pytest.raises(ConfigError, match="multiple of micro_batch"):
        DistillConfig(batch=6, micro_batch=4)
    with pytest.raises(ConfigError, match="live"):
        DistillConfig(signal="cache", hidden_mse=1.0)
    with pytest.raises(ConfigError, match="nothing to train"):
        DistillConfig(ce=0, kl=0)
    teacher, student, cfg, ids = setup(tokens=10)
    with pytest.raises(CompactorError, match="less than half of one step"):
        Distiller(student, LiveTeacher(teacher), cfg, ids, tmp_path, teacher_model=teacher)


def test_lora_student_trains_adapters_and_merges_to_a_plain_model(tmp_path):
    pytest.importorskip("peft")
    teacher, student, cfg, ids = setup(lora_rank=4, hidden_mse=0.0, ce=0.0, kl=1.0, checkpoint_every=0)
    base = {k: v.clone() for k, v in student.model.state_dict().items()}
    ev = make_windows(ids[-16:].flatten(), 32)
    tr = Distiller(student, LiveTeacher(teacher), cfg, ids[:-16], tmp_path, teacher_model=teacher,
                   eval_windows=ev, progress=False)
    trainable = [n for n, p in tr.net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    res = tr.train()
    assert type(student.model).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in student.model.state_dict())
    assert student.model.state_dict().keys() == base.keys()
    assert any(not torch.equal(v, base[k]) for k, v in student.model.state_dict().items())
    assert res.evals[-1]["kld"] < res.evals[0]["kld"]
    assert tr.evaluate()["kld"] == pytest.approx(res.evals[-1]["kld"], rel=1e-4)  # merged == adapted
