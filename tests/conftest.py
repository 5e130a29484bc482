import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

#: The extras the README promises (`make test` installs them): module -> distribution.
EXTRAS = {"llama_cpp": "llama-cpp-python", "compressed_tensors": "compressed-tensors",
          "onnxruntime": "onnxruntime", "peft": "peft"}
_VERSIONS = ("torch", "transformers", "gguf", "llama-cpp-python", "onnxruntime", "compressed-tensors",
             "peft", "safetensors", "numpy")


def pytest_sessionstart(session):
    """Print the versions this run tests, even under -q."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_versions())


def _versions() -> str:
    """The versions of the packages the results depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in _VERSIONS:
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} MISSING")
    return "versions: " + ", ".join(out)


def pytest_configure(config):
    """Under `make test` (COMPACTOR_REQUIRE_EXTRAS=1) a missing extra fails the run instead
    of silently skipping the tests that need it."""
    import importlib.util

    if os.environ.get("COMPACTOR_REQUIRE_EXTRAS") != "1":
        return
    missing = [dist for mod, dist in EXTRAS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        pytest.exit(f"extras missing: {', '.join(missing)} (make setup installs them)", returncode=3)


@pytest.fixture
def tiny():
    from compactor.models.tiny import tiny_model

    return tiny_model("llama")


@pytest.fixture
def tok():
    from compactor.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_dir(tmp_path, tiny, tok):
    """A tiny Llama saved as a transformers directory."""
    d = tmp_path / "tiny-llama"
    tiny.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path):
    """A small English text file (enough for a few 64-token windows of the byte tokenizer)."""
    p = tmp_path / "text.txt"
    body = "\n".join(
        f"Line {i}: It is a truth universally acknowledged, that a single man in possession "
        f"of a good fortune, must be in want of a wife." for i in range(40)
    )
    p.write_text(body)
    return p
