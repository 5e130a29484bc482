"""Task training: KD beats label-only training on held-out data (several seeds), the
auxiliary losses run, resume repeats the uninterrupted run exactly, batches cover each epoch."""

import pytest
import torch

from compactor.errors import CompactorError, ConfigError
from compactor.task.api import distill_task, eval_task
from compactor.task.train import TaskTrainConfig, bucketed_indices
from tests.task.tiny import examples, write_jsonl


def _cfg(**kw):
    base = dict(epochs=6, batch=16, lr=3e-3, head_lr=3e-3, max_length=16, checkpoint_every=0)
    return TaskTrainConfig(**{**base, **kw})


def test_teacher_learns_the_task(teacher_dir, task_files):
    res = eval_task(str(teacher_dir), task_files["test"], speed=False)
    assert res["accuracy"] > 0.9 and res["macro_f1"] > 0.9  # chance is ~0.33


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_beats_label_only_on_held_out_data(teacher_dir, task_files, tmp_path, seed):
    """The student's 200 training texts carry 40 % random labels; the teacher's soft targets on
    the same texts do not. Scored on the clean held-out split."""
    noisy = write_jsonl(tmp_path / "noisy.jsonl", examples(200, 100 + seed, noise=0.4))
    acc = {}
    for alpha in (0.0, 0.9):
        out = tmp_path / f"s{alpha}"
        distill_task(str(teacher_dir), "layers:1:lower", noisy, None, out, _cfg(alpha=alpha, seed=seed),
                     progress=False)
        acc[alpha] = eval_task(str(out), task_files["test"], speed=False)["accuracy"]
    assert acc[0.9] > acc[0.0] + 0.05, acc


def test_cosine_and_attention_terms_are_trained_and_logged(teacher_dir, task_files, tmp_path):
    import json

    out = tmp_path / "s"
    rec = distill_task(str(teacher_dir), "layers:1", task_files["dev"], None, out,
                       _cfg(epochs=1, alpha=0.5, cosine=1.0, attention=1.0), progress=False)
    log = [json.loads(line) for line in (tmp_path / ".s.work" / "log.jsonl").read_text().splitlines()]
    assert {"ce", "kd", "cos", "att"} <= set(log[0]) and rec["layers"] == [1]
    assert log[-1]["att"] < log[0]["att"] or log[-1]["cos"] < log[0]["cos"]


def test_resume_repeats_the_uninterrupted_run(teacher_dir, task_files, tmp_path):
    from compactor.task.batches import encode
    from compactor.task.model import load_task
    from compactor.task.students import layer_student
    from compactor.task.train import TaskTrainer
    from compactor.data.labeled import load_labeled

    teacher = load_task(str(teacher_dir))
    lab = load_labeled(task_files["dev"], names=teacher.model.labels)
    data = encode(teacher.tokenizer, lab.texts, lab.labels, 16)
    cfg = _cfg(epochs=2, alpha=0.5, checkpoint_every=5)

    def trainer(work):
        torch.manual_seed(0)  # dropout draws
        return TaskTrainer(layer_student(teacher, [1]), data, cfg, work, teacher=teacher.model, progress=False)

    full = trainer(tmp_path / "full")
    full.run()
    part = trainer(tmp_path / "part")
    step = part.train_step

    def interrupted():
        if part.step == 12:
            raise KeyboardInterrupt  # two steps after the step-10 checkpoint
        return step()

    part.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        part.run()
    again = trainer(tmp_path / "part")
    assert again.run(resume=True)["resumed_from"] == 10
    for (k, a), b in zip(full.student.state_dict().items(), again.student.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(CompactorError, match="earlier run"):
        trainer(tmp_path / "part").run()


def test_buckets_cover_every_example_once_per_epoch_with_little_padding():
    lengths = [(i * 7919) % 50 + 3 for i in range(640)]
    seen = torch.cat([bucketed_indices(lengths, 16, k, 3, 10) for k in range(40)])
    assert sorted(seen.tolist()) == list(range(640))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b)
              for b in (bucketed_indices(lengths, 16, k, 3, 10).tolist() for k in range(40))]
    assert sum(spread) / len(spread) < 8  # unbucketed batches span ~45


def test_bad_settings_and_inputs(teacher_dir, task_files, tmp_path):
    with pytest.raises(ConfigError, match="alpha"):
        TaskTrainConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="unknown key .temprature."):
        TaskTrainConfig.from_dict({"epochs": 1, "temprature": 2})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good1 word2", "label": "happy"}\n')
    with pytest.raises(CompactorError, match="label 'happy'"):
        distill_task(str(teacher_dir), "layers:1", str(bad), None, tmp_path / "o", _cfg(), progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(CompactorError, match="causal LM"):
        distill_task("smollm2-135m", "layers:1", task_files["dev"], None, tmp_path / "o", _cfg(), progress=False)
    with pytest.raises(CompactorError, match="no classification head"):
        distill_task(str(task_files["encoder"]), "layers:1", task_files["dev"], None, tmp_path / "o", _cfg(),
                     progress=False)


def test_encoder_head_mask_gradients_match_finite_differences(tmp_path):
    from compactor.prune.head_mask import mask_gradients
    from compactor.task.model import load_task
    from tests.task.tiny import make_encoder

    task = load_task(str(make_encoder(tmp_path / "e", layers=2, seed=7)), ("a", "b", "c"))
    model = task.model.double().eval()
    ids = torch.randint(5, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    y = torch.tensor([0, 2, 1])
    projs = [layer.attention.output.dense for layer in model.encoder.encoder.layer]

    def loss():
        return torch.nn.functional.cross_entropy(model(ids, mask).logits, y)

    grads = mask_gradients(projs, 4, 8, loss, model)
    eps = 1e-5
    for li, h in [(0, 0), (0, 3), (1, 2)]:
        vals = []
        for sign in (1, -1):
            m = [torch.ones(4, dtype=torch.float64) for _ in range(2)]
            m[li][h] += sign * eps
            hooks = [p.register_forward_pre_hook(lambda _m, a, x=x: (a[0] * x.repeat_interleave(8),))
                     for p, x in zip(projs, m)]
            with torch.no_grad():
                vals.append(loss().item())
            for hk in hooks:
                hk.remove()
        assert grads[li][h].item() == pytest.approx((vals[0] - vals[1]) / (2 * eps), rel=1e-4, abs=1e-8)
