"""Fuzz targets: a valid seed input per target, and the calls a user's command would make
on a mutated copy of it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import yaml

from tests.fuzz.fuzzlib import Report, leftovers, mutate_bytes, run_case

RECIPE = {
    "model": "MODEL", "reference": "original",
    "eval": {"data": "TEXT", "tokens": 128, "window": 64, "speed": False},
    "calibration": {"data": "TEXT", "samples": 2, "window": 64},
    "stages": [{"name": "q", "steps": [{"gptq": {"grid": "q4_0", "dampening": 0.01}}]},
               {"name": "e", "steps": [{"evaluate": {"label": "x"}}]}],
}
JUNK = [None, -1, 0, 10**30, 1e308, float("nan"), "x" * 5000, "", [], {}, True, [1, [2, [3]]],
        {"a": {"b": None}}, "../../etc/passwd", "\x00", "q9_9"]


def _tiny_dir(tmp: Path) -> Path:
    from compactor.models.tiny import tiny_model, tiny_tokenizer

    d = tmp / "seed-model"
    if not d.exists():
        tiny_model("llama").save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
    return d


def _text(tmp: Path) -> Path:
    p = tmp / "seed.txt"
    p.write_text("\n".join(f"Line {i}: a truth universally acknowledged." for i in range(60)))
    return p


def fuzz_gguf(tmp: Path, cases: int, rng: random.Random, report: Report) -> None:
    """Mutated GGUF files, read as a model source (header check, then conversion)."""
    import os

    from compactor.export.gguf import GGUFTypes, export_gguf
    from compactor.models.load import load_model, read_gguf_header
    from compactor.models.tiny import tiny_model

    from compactor.models.bundled import bundled_gguf

    # A tiny model with the bundled model's vocabulary, so its GGUF carries a real tokenizer
    # that transformers can rebuild and a mutated file gets past the tokenizer to the tensors.
    seed = tmp / "seed.gguf"
    export_gguf(tiny_model("llama", vocab_size=49152), seed, types=GGUFTypes("f32", "q8_0"),
                tokenizer_gguf=bundled_gguf("smollm2-135m"), progress=False)
    raw = seed.read_bytes()
    home = tmp / "home"
    os.environ["COMPACTOR_HOME"] = str(home)
    try:
        for i in range(cases):
            data, how = mutate_bytes(raw, rng)
            p = tmp / f"case{i}.gguf"
            p.write_bytes(data)
            # Rebuilding a 49k-token tokenizer from GGUF metadata takes transformers ~10 s here.
            result, msg = run_case(lambda: (read_gguf_header(p), load_model(p)), seconds=120)
            half = [d.name for d in (home / "converted").glob(".*")] if (home / "converted").exists() else []
            if half:
                result, msg = "FAIL: half-written cache", ", ".join(half)
            report.add("gguf", i, how, result, msg)
            p.unlink()
            shutil.rmtree(home / "converted", ignore_errors=True)
    finally:
        os.environ.pop("COMPACTOR_HOME", None)


def fuzz_safetensors(tmp: Path, cases: int, rng: random.Random, report: Report) -> None:
    """Lying safetensors headers (offsets, dtypes, shapes, lengths) and damaged data, loaded
    in memory and streamed."""
    from compactor.models.load import load_model

    src = _tiny_dir(tmp)
    raw = (src / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for i in range(cases):
        d = tmp / f"st{i}"
        shutil.copytree(src, d)
        if rng.random() < 0.5:  # structured lie in the header
            h = json.loads(json.dumps(header))
            name = rng.choice([k for k in h if k != "__metadata__"])
            field = rng.choice(["data_offsets", "dtype", "shape"])
            h[name][field] = rng.choice({"data_offsets": [[0, 10**12], [5, 1], [-4, 8], "x"],
                                         "dtype": ["F99", "I8", "BF16", 7],
                                         "shape": [[10**9, 10**9], [-1], [], "64"]}[field])
            body = json.dumps(h).encode()
            how = f"header {name}.{field} = {h[name][field]!r}"
            data = len(body).to_bytes(8, "little") + body + raw[8 + n:]
        else:
            data, how = mutate_bytes(raw, rng)
        (d / "model.safetensors").write_bytes(data)

        def both(d=d):
            load_model(d)
            lm = load_model(d, stream=True)
            lm.store.layer(lm.model, 0, lm.adapter)

        result, msg = run_case(both)
        report.add("safetensors", i, how, result, msg)
        shutil.rmtree(d)


def _set(tree, path, value):
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def fuzz_recipe(tmp: Path, cases: int, rng: random.Random, report: Report) -> None:
    """Recipes with wrong types, unknown keys, huge numbers, anchors/aliases, broken YAML."""
    from compactor.recipe.schema import load_recipe

    model, text = _tiny_dir(tmp), _text(tmp)
    base = json.loads(json.dumps(RECIPE).replace("MODEL", str(model)).replace("TEXT", str(text)))
    for i in range(cases):
        tree = json.loads(json.dumps(base))
        kind = rng.choice(["value", "key", "text", "alias"])
        if kind == "value":
            path = rng.choice(list(_paths(tree)))
            value = rng.choice(JUNK)
            _set(tree, path, value)
            body, how = yaml.safe_dump(tree), f"{'.'.join(map(str, path))} = {str(value)[:40]!r}"
        elif kind == "key":
            path = rng.choice([p for p in _paths(tree) if isinstance(p[-1], str)] or [("model",)])
            node = tree
            for k in path[:-1]:
                node = node[k]
            node["unknown_" + str(rng.randrange(100))] = 1
            body, how = yaml.safe_dump(tree), f"unknown key beside {'.'.join(map(str, path))}"
        elif kind == "alias":  # a "billion laughs" tree of aliases
            body = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
                f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                for p, c in zip("abcdefgh", "bcdefghi")) + yaml.safe_dump(tree)
            how = "nested aliases"
        else:
            data, how = mutate_bytes(yaml.safe_dump(tree).encode(), rng)
            body = data.decode("utf-8", errors="replace")
        p = tmp / f"r{i}.yaml"
        p.write_text(body)
        result, msg = run_case(lambda: load_recipe(p), seconds=10)
        report.add("recipe", i, how, result, msg)


def fuzz_text(tmp: Path, cases: int, rng: random.Random, report: Report) -> None:
    """User data files: JSONL/parquet/CSV/TXT with wrong columns, types and encodings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from compactor.data.sources import load_text

    for i in range(cases):
        kind = rng.choice(["jsonl", "parquet", "csv", "txt", "dir"])
        p = tmp / f"d{i}.{kind if kind != 'dir' else 'd'}"
        if kind == "jsonl":
            rows = [rng.choice([{"text": "ok"}, {"body": "x"}, {"text": 5}, [1, 2], "str", None,
                                {"text": None}]) for _ in range(rng.randint(0, 4))]
            data = "\n".join(json.dumps(r) for r in rows).encode()
            if rng.random() < 0.3:
                data, _ = mutate_bytes(data + b"\xff\xfe", rng)
            p.write_bytes(data)
            how = f"jsonl {rows!r}"[:80]
        elif kind == "parquet":
            col = rng.choice(["text", "body", "TEXT"])
            vals = rng.choice([["a", "b"], [1, 2], [None, None], ["", ""]])
            pq.write_table(pa.table({col: vals}), p)
            if rng.random() < 0.4:
                data, how = mutate_bytes(p.read_bytes(), rng)
                p.write_bytes(data)
            how = f"parquet {col}={vals}"
        elif kind == "csv":
            p.write_text("text,label\nhello,1\n")
            how = "csv (unsupported type)"
        elif kind == "txt":
            data = rng.choice([b"", b"\xff\xfe\x00bad utf-8", b"   \n", "ok text".encode("utf-16")])
            p.write_bytes(data)
            how = f"txt {data[:20]!r}"
        else:
            p.mkdir()
            (p / "x.bin").write_bytes(b"123")
            how = "directory without text files"
        result, msg = run_case(lambda: load_text(p), seconds=10)
        report.add("text", i, how, result, msg)


def fuzz_topk_cache(tmp: Path, cases: int, rng: random.Random, report: Report) -> None:
    """A distillation teacher cache with damaged shards or metadata."""
    from compactor.distill.teacher import TopKCache
    from compactor.models.tiny import tiny_model

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    seed_dir = tmp / "cache-seed"
    TopKCache(seed_dir, ids, 4, "tiny").build(tiny_model("llama"), progress=False)
    files = sorted(p.name for p in seed_dir.iterdir())
    for i in range(cases):
        d = tmp / f"cache{i}"
        shutil.copytree(seed_dir, d)
        name = rng.choice(files)
        data, how = mutate_bytes((d / name).read_bytes(), rng)
        (d / name).write_bytes(data)

        def read(d=d):
            c = TopKCache(d, ids, 4, "tiny")
            c.targets(ids, torch.arange(4))

        result, msg = run_case(read, seconds=10)
        report.add("topk-cache", i, f"{name}: {how}", result, msg)
        shutil.rmtree(d)


TARGETS = {"gguf": fuzz_gguf, "safetensors": fuzz_safetensors, "recipe": fuzz_recipe,
           "text": fuzz_text, "topk-cache": fuzz_topk_cache}


def run_all(tmp: Path, cases: int, seed: int = 0, targets=None) -> Report:
    report = Report()
    for name in targets or TARGETS:
        before = set(p.name for p in tmp.iterdir())
        TARGETS[name](tmp, cases, random.Random(f"{seed}-{name}"), report)
        extra = [x for x in leftovers(tmp, before) if x.startswith(".")]
        if extra:
            report.add(name, -1, "after all cases", "FAIL: left behind", ", ".join(extra))
    return report
