"""compactor changes no process-wide state, and never unpickles anything."""

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "compactor"

_PROBE = r'''
import os, torch
env = dict(os.environ)
torch.manual_seed(123)
state = torch.random.get_rng_state()
import compactor, compactor.cli, compactor.steps, compactor.models.load, compactor.recipe.runner  # noqa
assert dict(os.environ) == env, sorted(set(os.environ.items()) ^ set(env.items()))
assert torch.equal(torch.random.get_rng_state(), state), "importing moved the global torch RNG"
from compactor.models.tiny import tiny_model
tiny_model("llama", seed=5)
# (Building a transformers model can import torch's inductor, which sets its own
# TORCHINDUCTOR_CACHE_DIR; that is torch's doing, not ours.)
changed = {k for k in set(os.environ) ^ set(env) if not k.startswith("TORCHINDUCTOR")}
assert not changed, changed
assert torch.equal(torch.random.get_rng_state(), state), "a seeded builder moved the global torch RNG"
print("ok")
'''


def test_import_and_seeded_builders_leave_env_and_rng_alone():
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_no_code_path_unpickles():
    bad = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{f.name}: torch.load without weights_only=True")
        for pat in (r"^\s*import pickle", r"^\s*from pickle", r"pickle\.loads?\(", r"allow_pickle\s*=\s*True",
                    r"import dill", r"import cloudpickle"):
            if re.search(pat, text, re.M):
                bad.append(f"{f.name}: {pat}")
    assert not bad, bad
