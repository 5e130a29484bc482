"""Integration tests on the real bundled model, the Austen text and llama.cpp (slow)."""

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from compactor.models.load import load_model

    return load_model("smollm2-135m")


def test_bundled_model_loads_as_llama(smol):
    assert smol.adapter.family == "llama"
    assert sum(p.numel() for p in smol.model.parameters()) == 134_515_008
    assert smol.gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (smol.path / "model.safetensors").exists() or (smol.path / "model.safetensors.index.json").exists()


def test_gguf_conversion_equals_transformers(smol, tmp_path):
    """Our tensor-by-tensor conversion of the bundled GGUF gives transformers' conversion
    bit for bit (the reference every figure is measured against)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compactor.models.gguf_convert import convert_gguf

    convert_gguf(smol.gguf, tmp_path, smol.adapter)
    theirs = AutoModelForCausalLM.from_pretrained(str(smol.gguf.parent), gguf_file=smol.gguf.name,
                                                  dtype=torch.float32, local_files_only=True)
    from compactor.models.checkpoint import CheckpointIndex

    ours = CheckpointIndex(tmp_path)
    for name, p in theirs.named_parameters():
        assert torch.equal(ours.read([name])[name], p.detach()), name


def test_austen_splits_never_overlap():
    from compactor.data import austen
    from compactor.data.sources import load_text

    split_novels = [set(austen.SPLITS[s]) for s in ("calib", "train", "eval")]
    assert sum(map(len, split_novels)) == 6 == len(set().union(*split_novels))
    texts = {s: load_text(f"austen:{s}") for s in ("calib", "train", "eval")}
    assert texts["eval"].provenance["novels"] == ["Persuasion"]
    assert texts["eval"].provenance["package"] == "r-cran-janeaustenr"
    # No paragraph of the evaluation novel appears in the calibration or training text.
    probe = [p for p in texts["eval"].text.split("\n\n") if len(p) > 200][:50]
    assert probe and not any(p in texts["calib"].text or p in texts["train"].text for p in probe)


def test_reference_perplexity_on_pride_and_prejudice(smol):
    # Orientation figure: PPL ~25.5 on the first 20k tokens of Pride and Prejudice with
    # 512-token non-overlapping windows (lines joined by newlines, no BOS).
    from compactor.data.windows import windows_for
    from compactor.evaluate import evaluate

    w = windows_for(smol.tokenizer, "austen:prideprejudice", 512, max_tokens=20480)
    r = evaluate(smol, w, speed=False, progress=False)
    assert r.tokens == 40 * 511
    assert 25.0 < r.ppl < 26.0


def test_gguf_in_llama_cpp_matches_float_reference(smol):
    # The bundled file is the reference's own grid: llama.cpp differs only by its 8-bit
    # activation quantization, a KLD in the low thousandths.
    from compactor.data.windows import windows_for
    from compactor.evaluate import evaluate

    w = windows_for(smol.tokenizer, "austen:eval", 512, max_tokens=4096)
    r = evaluate(str(smol.gguf), w, reference=smol, speed=False, progress=False)
    assert r.runtime == "llama.cpp" and r.params == 134_515_008
    assert 0 < r.kld_mean < 0.01 and r.top1 > 0.93
    assert abs(r.ppl / r.ref_ppl - 1) < 0.02
    assert 5.5 < r.bpw < 6.0  # Q4_1 body + Q8_0 embedding


def test_cli_eval_gguf_exit_codes(tmp_path, capsys):
    from compactor.cli import main

    trunc = tmp_path / "t.gguf"
    from compactor.models.bundled import bundled_gguf

    trunc.write_bytes(bundled_gguf("smollm2-135m").read_bytes()[:5_000_000])
    assert main(["eval", str(trunc)]) == 2
    assert "t.gguf" in capsys.readouterr().err
