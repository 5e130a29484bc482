"""Students: which layers they keep, that a layer student computes the teacher's kept layers,
and that a trimmed vocabulary changes nothing for text it covers and spells out the rest."""

import pytest
import torch

from compactor.errors import CompactorError
from compactor.task.model import load_task
from compactor.task.students import (choose_layers, every_other, kept_tokens, layer_student, parse_layers,
                                     trim_vocabulary)
from tests.task.tiny import make_encoder


def test_every_other_and_the_spec_grammar():
    assert every_other(3, 6) == [1, 3, 5] and every_other(6, 12) == [1, 3, 5, 7, 9, 11] and every_other(2, 2) == [0, 1]
    assert parse_layers("layers:0.5", 6) == ([3], "every")
    assert parse_layers("layers:2:lower", 6) == ([2], "lower")
    assert parse_layers("layers:4,0,", 6) == ([0, 4], "explicit")
    for bad, msg in [("layers:0.05", "keeps 0 layers"), ("layers:7", "has 6"), ("layers:9,1", "0..5"),
                     ("layers:0.5:top", "must be one of"), ("drop:1", "expected layers")]:
        with pytest.raises(CompactorError, match=msg):
            parse_layers(bad, 6)


def test_layer_student_equals_the_teacher_run_on_its_kept_layers(tmp_path):
    task = load_task(str(make_encoder(tmp_path / "e", layers=4, seed=3)), ("a", "b", "c"))
    student = layer_student(task, [0, 2])
    assert len(task.model.encoder.encoder.layer) == 4 and student.config.num_hidden_layers == 2
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    with torch.no_grad():
        # Reference: the teacher with layers 1 and 3 turned into identities.
        layers = task.model.encoder.encoder.layer
        saved = list(layers)
        layers[1] = layers[3] = _Identity()
        want = task.model(ids, mask).logits
        for i, m in enumerate(saved):
            layers[i] = m
        got = student(ids, mask).logits
    assert torch.allclose(got, want, atol=1e-5)


class _Identity(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_trimmed_vocabulary_is_exact_on_covered_text_and_spells_out_the_rest(tmp_path):
    task = load_task(str(make_encoder(tmp_path / "e", layers=2, seed=4)), ("a", "b", "c"))
    keep = kept_tokens(task.tokenizer, ["good1 word3 bad2", "word7 word7"])
    assert task.tokenizer.convert_tokens_to_ids("word5") not in keep  # unused words go
    model, tok = trim_vocabulary(task.model, task.tokenizer, keep, task.adapter)
    assert model.config.vocab_size == len(keep) and model.encoder.embeddings.word_embeddings.num_embeddings == len(keep)
    for text in ["word3 good1", "bad2 word7 good1 word3"]:
        a, b = task.tokenizer([text], return_tensors="pt"), tok([text], return_tensors="pt")
        assert [keep[i] for i in b["input_ids"][0]] == a["input_ids"][0].tolist()
        with torch.no_grad():
            assert torch.allclose(model(b["input_ids"], b["attention_mask"]).logits,
                                  task.model(a["input_ids"], a["attention_mask"]).logits, atol=1e-6)
    pieces = tok.convert_ids_to_tokens(tok("word5")["input_ids"])
    assert "[UNK]" not in pieces and len(pieces) > 3  # spelled out from single characters


def test_importance_keeps_the_layers_that_change_the_state(tmp_path):
    task = load_task(str(make_encoder(tmp_path / "e", layers=4, seed=5)), ("a", "b", "c"))
    with torch.no_grad():  # layers 0 and 2 write nothing: their output is their input
        for i in (0, 2):
            layer = task.model.encoder.encoder.layer[i]
            layer.attention.output.dense.weight.zero_()
            layer.attention.output.dense.bias.zero_()
            layer.output.dense.weight.zero_()
            layer.output.dense.bias.zero_()
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                norm.weight.fill_(1.0)
                norm.bias.zero_()
    ids = torch.randint(5, 100, (4, 12))
    batches = [(ids, torch.ones_like(ids))]
    assert choose_layers(task, "layers:2:importance", batches) == [1, 3]
    with pytest.raises(CompactorError, match="need data"):
        choose_layers(task, "layers:2:importance")


def test_head_pruning_by_mask_gradients_saves_loads_and_exports(teacher_dir, task_files, tmp_path):
    """Michel importance on a task model, per-layer head counts through save / load, and the
    pruned model's ONNX graph verified in onnxruntime."""
    from compactor.prune.head_mask import mask_gradients  # noqa: F401  (the shared core)
    from compactor.task.api import distill_task, eval_task, export_task
    from compactor.task.heads import head_counts
    from compactor.task.train import TaskTrainConfig

    out = tmp_path / "s"
    rec = distill_task(str(teacher_dir), "layers:1+heads:0.5", task_files["train"], None, out,
                       TaskTrainConfig(epochs=1, batch=16, lr=3e-3, alpha=0.5, max_length=16, checkpoint_every=0),
                       progress=False)
    assert rec["layers"] == [1] and len(rec["heads"]) == 1 and len(rec["heads"][0]) == 2
    loaded = load_task(str(out))
    assert head_counts(loaded.model, loaded.adapter) == [2]
    assert eval_task(str(out), task_files["test"], speed=False)["accuracy"] > 0.5
    x = export_task(str(out), tmp_path / "x", "static", task_files["train"], task_files["test"], max_length=16)
    assert all(c["passed"] for c in x["verify"]) and "Attention" not in x["fused_ops"]
    assert x["verify"][1]["agreement"] >= 0.95  # unfused attention: its activation products stay float
