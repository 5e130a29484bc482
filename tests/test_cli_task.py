"""The task path on the command line: finetune, distill --task classify, eval and export of
a task model (found automatically), and its bad input (exit 2, nothing written)."""

import json

import torch

from compactor.cli import main
from tests.task.tiny import examples, make_encoder, write_jsonl

torch.set_num_threads(1)


def test_finetune_distill_eval_export(tmp_path, capsys):
    enc = make_encoder(tmp_path / "enc", layers=2)
    train = write_jsonl(tmp_path / "train.jsonl", examples(600, 1))
    test = write_jsonl(tmp_path / "test.jsonl", examples(200, 2))
    common = ["--train-data", train, "--eval-data", test, "--train-window", "16", "--lr", "3e-3", "--epochs", "3"]
    assert main(["finetune", str(enc), *common, "--out", str(tmp_path / "t")]) == 0
    assert "dev accuracy" in capsys.readouterr().out
    assert main(["distill", "--task", "classify", "--teacher", str(tmp_path / "t"), "--student", "layers:1",
                 "--kl", "0.7", *common, "--trim-vocab", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "teacher layers [1]" in out and "vocabulary" in out
    run = json.loads((tmp_path / "s" / "task_run.json").read_text())
    assert run["config"]["alpha"] == 0.7 and run["layers"] == [1]
    assert main(["eval", str(tmp_path / "s"), "--eval-data", test, "--no-speed", "--json", str(tmp_path / "e.json")]) == 0
    assert "macro-F1" in capsys.readouterr().out
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["runtime"] == "torch" and res["examples"] == 200 and len(res["confusion"]) == 3
    gate = ["eval", str(tmp_path / "s"), "--eval-data", test, "--no-speed", "--reference", str(tmp_path / "t")]
    assert main([*gate, "--min-accuracy-retention", "2.0"]) == 3  # the student cannot double the teacher
    assert "min_accuracy_retention: measured" in capsys.readouterr().err
    assert main([*gate, "--min-accuracy-retention", "0.3", "--max-size-mb", "100"]) == 0
    assert "gate passed: min_accuracy_retention" in capsys.readouterr().out
    assert main([*gate, "--max-kld", "0.1"]) == 2  # a language-model limit, refused by name
    assert "language-model limit" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "s"), "--format", "onnx", "--int8", "static", "--calib-data", train,
                 "--eval-data", test, "--out", str(tmp_path / "x")]) == 0
    assert "agreement with torch" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "x" / "model.int8.onnx"), "--eval-data", test, "--no-speed"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    enc = make_encoder(tmp_path / "enc", layers=2)
    nolabel = tmp_path / "n.jsonl"
    nolabel.write_text('{"text": "good1"}\n')
    assert main(["finetune", str(enc), "--train-data", str(nolabel), "--out", str(tmp_path / "o")]) == 2
    assert "no 'label' column" in capsys.readouterr().err and not (tmp_path / "o").exists()
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert main(["finetune", str(enc), "--train-data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no labeled rows" in capsys.readouterr().err
    train = write_jsonl(tmp_path / "train.jsonl", examples(50, 1))
    assert main(["finetune", "smollm2-135m", "--train-data", train, "--out", str(tmp_path / "o")]) == 2
    assert "causal LM" in capsys.readouterr().err  # an LM given to the encoder path
    assert main(["quantize", str(enc), "--method", "rtn", "--out", str(tmp_path / "o")]) == 2
    assert "is an encoder, given to a causal-LM step" in capsys.readouterr().err  # and the reverse
    assert main(["distill", "--task", "classify", "--teacher", str(enc), "--kl", "0.5", "--ce", "0.9",
                 "--out", str(tmp_path / "o")]) == 2
    assert "sum to 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fetch_names_the_bundled_encoder(capsys, monkeypatch):
    import compactor.data.labeled as labeled
    import compactor.models.bundled as bundled

    monkeypatch.setattr(bundled, "bundled_encoder_dir", lambda alias: f"/cache/{alias}")
    monkeypatch.setattr(labeled, "tweets_dir", lambda: "/cache/tweets")
    assert main(["fetch", "minilm-l6"]) == 0
    out = capsys.readouterr().out
    assert "minilm-l6: encoder /cache/minilm-l6" in out and "tweets: /cache/tweets" in out
