"""The search's speed axis: a candidate's decode and prefill speed in llama.cpp, against the
original's at F16, both measured in this process on the same prompt.

A candidate is exported to a scratch GGUF file as it would be deployed (its quantized
linears and embedding keep their codes, anything still float goes to F16), loaded in
llama.cpp and timed (:meth:`LlamaCppBackend.speed`: median of ``repeats``). The original's
F16 file is timed once, first, and every speed-up is candidate tok/s over it. Why F16: it
is the float deployment a user compares against (the original's own quantized file, if it
came as one, is not a fixed baseline across models).

Speeds on a shared machine move by tens of percent between runs; a limit close to a
candidate's measured speed-up can fall either way. The times are recorded with each
candidate, so a reader sees how close it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SpeedProbe:
    """Measures llama.cpp speed of built candidates; ``work_dir`` holds the scratch files."""

    original: object  # LoadedModel
    work_dir: Path
    threads: int = 2
    prompt_len: int = 256
    gen_tokens: int = 64
    repeats: int = 3
    _reference: dict | None = field(default=None, repr=False)
    _n: int = field(default=0, repr=False)

    def settings(self) -> dict:
        """What decides a measurement (kept with a resumable search's cache)."""
        return {"threads": self.threads, "prompt_len": self.prompt_len, "gen_tokens": self.gen_tokens,
                "repeats": self.repeats, "baseline": "original at F16 in llama.cpp"}

    def reference(self) -> dict:
        """The original's speed at F16 (measured once)."""
        if self._reference is None:
            self._reference = self._time(self.original, "f16", "f16")
        return self._reference

    def measure(self, loaded) -> dict:
        """``loaded``'s prefill / decode tok/s in llama.cpp and its decode speed-up."""
        ref = self.reference()
        got = self._time(loaded, "f16", "q8_0")
        return {**got, "decode_speedup": got["decode_tok_s"] / ref["decode_tok_s"],
                "reference_decode_tok_s": ref["decode_tok_s"]}

    def _time(self, loaded, body: str, embed: str) -> dict:
        from compactor.evaluate.backends import LlamaCppBackend
        from compactor.export.gguf import GGUFTypes, export_gguf

        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / f"speed-{self._n}.gguf"
        self._n += 1
        try:
            # a quantized embedding keeps its codes; ``embed`` is the type of a float one
            export_gguf(loaded.model, path, types=GGUFTypes(body, embed), tokenizer=loaded.tokenizer,
                        tokenizer_gguf=loaded.gguf, adapter=loaded.adapter, progress=False)
            backend = LlamaCppBackend(path, n_ctx=self.prompt_len + self.gen_tokens + 32, n_threads=self.threads)
            try:
                s = backend.speed(self.prompt_len, self.gen_tokens, self.repeats)
            finally:
                backend.close()
        finally:
            path.unlink(missing_ok=True)
        return {"prefill_tok_s": s["prefill_tok_s"], "decode_tok_s": s["decode_tok_s"]}
