"""The memory cap enforced while running: a clean stop, not the kernel's OOM killer."""

import time

import pytest
import torch

from compactor.errors import MemoryCapExceeded
from compactor.memory import MemoryGuard, anonymous_rss


def test_passing_the_cap_stops_the_block_with_a_clear_error():
    import gc

    # Earlier tests' garbage freed during this one would lower the baseline under a single
    # allocation (a full-suite CI run once never reached the cap): collect it first, and keep
    # allocating until the guard trips, up to 2 GB.
    gc.collect()
    cap = anonymous_rss() + 100_000_000
    held = []
    deadline = time.time() + 10
    with pytest.raises(MemoryCapExceeded, match=r"over the cap of .* \(--max-memory test\); the plan estimated"):
        with MemoryGuard(cap, "--max-memory test", planned=cap - 1, interval=0.02):
            while time.time() < deadline:  # the guard interrupts this loop
                if len(held) < 40:
                    held.append(torch.ones(12_500_000))  # 50 MB more, touched
                time.sleep(0.01)
    del held
    assert time.time() < deadline  # stopped by the guard, not by the loop's end


def test_under_the_cap_the_block_runs_and_the_peak_is_recorded():
    with MemoryGuard(anonymous_rss() + 2_000_000_000, "--max-memory test", interval=0.01) as g:
        x = torch.ones(10_000_000)
        time.sleep(0.1)
        del x
    assert g.tripped is None and g.peak > 0


def test_a_recipe_over_its_cap_while_running_exits_2_and_writes_nothing(tiny_dir, text_file, tmp_path, capsys,
                                                                        monkeypatch):
    import compactor.recipe.runner as runner
    from compactor.cli import main

    # The plan fits (a generous cap); the run then allocates past it.
    real = runner._run

    def greedy(*a, **k):
        hog = torch.ones(80_000_000)  # 320 MB
        time.sleep(5)
        del hog
        return real(*a, **k)

    monkeypatch.setattr(runner, "_run", greedy)
    cap = (anonymous_rss() + 200_000_000) // 1_000_000
    r = tmp_path / "r.yaml"
    r.write_text(f"model: {tiny_dir}\nmax_memory: {cap}MB\neval: {{data: {text_file}, tokens: 128, window: 64, "
                 "speed: false}\nstages:\n  - name: q\n    steps:\n      - rtn: {grid: q4_0}\n")
    out = tmp_path / "out"
    assert main(["run", str(r), "--out", str(out)]) == 2
    assert "over the cap" in capsys.readouterr().err and not out.exists()
