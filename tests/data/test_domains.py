"""The domain splits and calib:mix: fixed, disjoint, deterministic, with provenance.

These read the real Debian packages (fetched once with apt-get download, as the Austen
corpus is) through the tiny byte-level tokenizer, so they stay fast."""

import pytest
import torch

from compactor.data.debian import check_not_reserved
from compactor.data.domains import MIX, faq_exchanges, render_chat
from compactor.data.sources import load_text
from compactor.data.windows import MIX_SPEC, domain_windows, split_specs, windows_for
from compactor.errors import CompactorError
from compactor.recipe.runner import calibration_domains


@pytest.mark.parametrize("pkg", ["python3.11-doc", "python3-doc", "python3.13-doc", "r-cran-tokenizers"])
def test_reserved_packages_refused(pkg):
    with pytest.raises(CompactorError, match="reserved for independent checks"):
        check_not_reserved(pkg)
    check_not_reserved("libpython3.11-stdlib")  # the code domain's package is not reserved


def test_faq_parser_pairs_questions_with_answers():
    text = ("Contents\n\n1.1. Listed only?\n\n1. Intro\n\n"
            "1.1. What is it, and why\nwould I care?\n\n    It is a thing. It\n    wraps.\n\n"
            "    Second paragraph.\n\n2.3. Next?\n\n    Yes.\n")
    ex = faq_exchanges(text)
    assert ex == [(1, "What is it, and why would I care?", "It is a thing. It wraps.\n\nSecond paragraph."),
                  (2, "Next?", "Yes.")]


def test_render_chat_uses_template_when_present(tok):
    docs, how = render_chat([("q?", "a.")], tok)
    assert docs == ["User: q?\nAssistant: a.\n"] and "plain" in how
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    docs, how = render_chat([("q?", "a.")], tok)
    assert docs == ["<user>q?<assistant>a."] and how == "tokenizer chat template"


def test_calib_and_eval_splits_are_disjoint():
    for domain in ("code", "chat"):
        cal = load_text(f"{domain}:calib", max_chars=200_000)
        ev = load_text(f"{domain}:eval", max_chars=200_000)
        assert cal.provenance["package"] == ev.provenance["package"]
        assert cal.provenance["deb_sha256"] and len(cal.provenance["deb_sha256"]) == 64
        assert not set(cal.provenance["first_files"]) & set(ev.provenance["first_files"])
        # No 400-character passage of the eval split appears in the calibration split.
        probe = ev.text[1000:1400]
        assert probe and probe not in load_text(f"{domain}:calib").text
    tech_cal, tech_ev = load_text("tech:calib"), load_text("tech:eval")
    assert tech_cal.provenance["package"] != tech_ev.provenance["package"]
    with pytest.raises(CompactorError, match="unknown split 'calib' of domain c"):
        load_text("c:calib")  # the C headers are never calibrated on


def test_mix_is_balanced_deterministic_and_recorded(tok):
    a = windows_for(tok, MIX_SPEC, 64, max_tokens=10 * 64)
    b = windows_for(tok, MIX_SPEC, 64, max_tokens=10 * 64)
    assert torch.equal(a.input_ids, b.input_ids) and a.provenance == b.provenance
    prov = a.provenance
    assert len(a) == 10 and list(prov["domains"]) == list(MIX)
    assert [prov["domains"][d]["windows"] for d in MIX] == [3, 3, 2, 2]
    for d in MIX:
        assert prov["domains"][d]["sha256"]
    # Round-robin: the first four windows are one from each domain.
    first = [windows_for(tok, f"{d}:calib", 64, max_tokens=3 * 64).input_ids[0] for d in MIX]
    assert all(torch.equal(a.input_ids[i], first[i]) for i in range(4))
    assert calibration_domains(prov) == list(MIX)
    assert calibration_domains({"source": "austen"}) == ["prose"]
    assert calibration_domains({"source": "user"}) == ["user text"]


def test_eval_specs_expand_and_score_separately(tok):
    assert split_specs("domains") == ["austen:eval", "code:eval", "tech:eval", "c:eval"]
    assert split_specs("code:eval, tech:eval") == ["code:eval", "tech:eval"]
    with pytest.raises(CompactorError, match="empty spec"):
        split_specs("code:eval,,tech:eval")
    by = domain_windows(tok, "code:eval,c:eval", 64, max_tokens=128)
    assert list(by) == ["code:eval", "c:eval"] and all(len(w) == 2 for w in by.values())
    assert not torch.equal(by["code:eval"].input_ids, by["c:eval"].input_ids)


def test_a_domain_that_runs_out_gives_all_it_has_and_the_others_share_the_rest(tok, monkeypatch):
    import compactor.data.windows as W

    real = W.windows_for

    def limited(tokenizer, spec, length, bos="auto", max_tokens=None, **kw):
        w = real(tokenizer, spec, length, bos=bos, max_tokens=max_tokens, **kw)
        if spec == "chat:calib":  # pretend the FAQ holds only 2 windows
            return W._first(w, min(2, len(w)))
        return w

    monkeypatch.setattr(W, "windows_for", limited)
    a = W.mix_windows(tok, 64, max_tokens=12 * 64)
    counts = {d: v["windows"] for d, v in a.provenance["domains"].items()}
    assert len(a) == 12 and counts["chat"] == 2 and sum(counts.values()) == 12
    assert max(counts.values()) - min(c for d, c in counts.items() if d != "chat") <= 1
    # the windows themselves are the domains' first ones, each used once
    assert len({tuple(r.tolist()) for r in a.input_ids}) == 12
