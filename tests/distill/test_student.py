"""Student construction from spec strings."""

import pytest
import torch

from compactor.data.windows import windows_for
from compactor.distill.student import build_student, uniform_layer_map
from compactor.errors import CompactorError
from compactor.models.tiny import tiny_model


@pytest.fixture
def teacher():
    return tiny_model(num_hidden_layers=6, intermediate_size=256)


@pytest.fixture
def calib(tok, text_file):
    return windows_for(tok, str(text_file), 32).head(4)


def test_every_other_keeps_even_layers_and_leaves_teacher_untouched(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s = build_student(teacher, "layers:every-other")
    assert s.model.config.num_hidden_layers == 3 and s.layer_map == [0, 2, 4]
    assert torch.equal(s.model.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert teacher.config.num_hidden_layers == 6


def test_importance_cuts_and_chains(teacher, calib):
    s = build_student(teacher, "layers:0.5:angular", calib, progress=False)
    assert s.model.config.num_hidden_layers == 3 and len(s.layer_map) == 3
    dropped = sorted(set(range(6)) - set(s.layer_map))
    assert dropped == list(range(dropped[0], dropped[0] + 3))  # angular removes a contiguous block
    s = build_student(teacher, "layers:2+channels:0.25+heads:0.5", calib, progress=False)
    cfg = s.model.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads) == (4, 192, 1)
    assert len(s.description) == 3
    out = s.model(input_ids=calib.input_ids[:1]).logits
    assert out.shape[-1] == teacher.config.vocab_size and torch.isfinite(out).all()


def test_config_and_random_students(teacher):
    s = build_student(teacher, "config:num_hidden_layers=2,intermediate_size=64")
    assert s.model.config.num_hidden_layers == 2 and s.layer_map == uniform_layer_map(2, 6) == [2, 5]
    r = build_student(teacher, "random")
    assert r.model.config.num_hidden_layers == 6
    assert not torch.equal(r.model.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("spec, msg", [
    ("layers:6", "leave none"), ("layers:1.5", "whole count"), ("channels:1.2", "fraction"),
    ("config:nonsense=3", "key=value"), ("config:hidden_size=128", "should be smaller"),
    ("wings:3", "not found"), ("layers:2", "calibration windows"), ("", "empty"),
])
def test_bad_specs(teacher, spec, msg):
    with pytest.raises(CompactorError, match=msg):
        build_student(teacher, spec)
