"""minilora.teaching.article (``minilora check-article``): every claim is computed by minilora's functions, the
verdicts follow from the computed values, drift is detected, and the table, the markdown and the
committed docs/article-check.md agree."""
import argparse
import re
from pathlib import Path

import numpy as np
import pytest

from minilora import memory, quant
from minilora.teaching import article
from minilora.lora import merge

REPO = Path(__file__).resolve().parent.parent

# The claims the article check must cover.
REQUIRED = {
    "ex-h-base", "ex-ba-shape", "ex-scaling", "ex-bax", "ex-scaled", "ex-h",          # the 4×4 example
    "rd-w0-params", "rd-ab-params", "rd-total", "rd-ratio", "rd-shapes",              # 8192², r=16
    "pc-per-head", "pc-total", "pc-per-module",                                       # q,k,v,o counts
    "mem-16bit", "mem-lora-total", "mem-qlora-base", "mem-qlora-total", "mem-14-a100",
    "qr-full-16", "qr-lora-trainable", "qr-lora-frozen", "qr-qlora-frozen", "qr-qlora-trainable",
    "adapter-100mb", "pct-0.1", "mem-70b-48gb", "mem-qlora-a100", "lora-consumer-gpus",
    "qlora-65b-48gb", "merge-262k",
}


@pytest.fixture(scope="module")
def claims():
    return article.check_article()


def _args(**kw):
    p = argparse.ArgumentParser()
    article.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def _md_rows(text):
    """The cells of each table row in the markdown (unescaping \\|)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| id |"):
            cells = re.split(r"(?<!\\) \| ", line[2:-2])
            rows.append(tuple(c.replace("\\|", "|") for c in cells))
    return rows


# ---------------------------------------------------------------- coverage and consistency
def test_every_required_claim_is_checked(claims):
    ids = [c.id for c in claims]
    assert REQUIRED <= set(ids)
    assert len(ids) == len(set(ids)) == len(article.EXPECTED)


def test_no_drift_on_the_real_code(claims):
    assert article.run_checks(claims) == []


def test_verdicts_follow_from_the_computed_values(claims):
    for c in claims:
        assert c.verdict in article.VERDICTS, c.id
        assert c.readings and c.explanation and len(c.explanation) < 450, c.id
        for r in c.readings:
            # 'matches' is exactly the reading's tolerance applied to minilora's value
            defined = not (isinstance(r.value, str) and r.value.startswith("undefined"))
            assert r.matches == (defined and r.tol.close(r.value, r.article)), (c.id, r.label)
        assert c.verdict == article.verdict_of(c.readings)
        assert c.minilora == c.readings[0].shown
    by_id = {c.id: c for c in claims}
    # spot checks of the rule itself, on the values computed
    assert all(r.matches for r in by_id["rd-ratio"].readings)
    assert not any(r.matches for r in by_id["ex-h-base"].readings)


def test_the_worked_example_is_recomputed_with_merge_trace(claims):
    by_id = {c.id: c for c in claims}
    W0, x = np.asarray(article.EX_W0), np.asarray(article.EX_X)
    np.testing.assert_allclose(by_id["ex-h-base"].readings[0].value, W0 @ x)  # h_base = W0·x, checked
    A, B = np.asarray(article.EX_A), np.asarray(article.EX_B)
    ab = by_id["ex-h"].readings[0].value   # A @ B reading
    np.testing.assert_allclose(ab, W0 @ x + 4.0 * (A @ (B @ x)))
    printed = by_id["ex-bax"].readings[2]  # B @ A with the printed shapes
    assert printed.stated and printed.value.startswith("undefined") and "PEFT's convention" in printed.value
    assert by_id["ex-ba-shape"].readings[0].value == (2, 2)


# ---------------------------------------------------------------- values come from minilora
def test_values_come_from_minilora_functions(monkeypatch):
    calls = {"merge_trace": 0, "lora_parameters": 0}
    real_trace, real_lora = merge.merge_trace, memory.lora_parameters

    def counting_trace(*a, **k):
        calls["merge_trace"] += 1
        return real_trace(*a, **k)

    def sentinel_lora(*a, **k):
        calls["lora_parameters"] += 1
        return 12_345 if a[0] == "llama-7b" else real_lora(*a, **k)
    monkeypatch.setattr(merge, "merge_trace", counting_trace)
    monkeypatch.setattr(memory, "lora_parameters", sentinel_lora)
    by_id = {c.id: c for c in article.check_article()}
    assert calls["merge_trace"] > 0 and calls["lora_parameters"] > 0
    assert by_id["pc-total"].readings[0].value == 12_345  # what the function said, not a typed number


@pytest.mark.parametrize("target, attr, fake, must_drift", [
    (merge, "scaling", lambda a, r, use_rslora=False: 1.5 * a / r, {"ex-scaling", "ex-additions"}),
    (memory, "lora_linear_parameters", lambda out, inn, r: 3 * r * (out + inn), {"rd-total", "rd-ratio"}),
    (quant, "nf4_bits_per_parameter", lambda bs, dq: 8.0, {"qr-qlora-frozen"}),
])
def test_drift_detection_fires(monkeypatch, target, attr, fake, must_drift):
    monkeypatch.setattr(target, attr, fake)
    drifted = {d.id for d in article.run_checks()}
    assert must_drift <= drifted


def test_drift_detection_fires_on_a_wrong_parameter_count(monkeypatch):
    real = memory.count_parameters
    monkeypatch.setattr(memory, "count_parameters", lambda c: {**real(c), "total": 2 * real(c)["total"]})
    assert {"mem-70b-params", "pct-0.1"} <= {d.id for d in article.run_checks()}


def test_a_crashing_function_is_reported_not_raised(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("broken")
    monkeypatch.setattr(memory, "memory_breakdown", boom)
    claims = article.check_article()
    by_id = {c.id: c for c in claims}
    assert by_id["mem-16bit"].verdict == "error: RuntimeError"
    assert "mem-16bit" in {d.id for d in article.run_checks(claims)}
    assert by_id["ex-scaling"].verdict == "holds"  # the others still run


# ---------------------------------------------------------------- the command and the markdown
def test_cli_table_and_markdown_have_the_same_rows(tmp_path, capsys, claims):
    out = tmp_path / "docs" / "check.md"
    assert article.run(_args(markdown=str(out))) == 0
    printed = capsys.readouterr().out
    table_rows = [tuple(c.strip() for c in line.split(" | ")) for line in printed.splitlines()
                  if " | " in line and not line.startswith("id ")]
    md = out.read_text(encoding="utf-8")
    md_rows = [row[:5] for row in _md_rows(md)]
    assert table_rows == md_rows == [c.cells for c in claims]
    assert f"({len(claims)} claims)" in printed and f"wrote {out}" in printed
    assert not list(out.parent.glob("*.tmp"))  # written atomically, no leftovers


def test_cli_exits_nonzero_on_drift(monkeypatch, capsys):
    monkeypatch.setattr(merge, "scaling", lambda a, r, use_rslora=False: 2 * a / r)
    assert article.run(_args()) == 1
    err = capsys.readouterr().err
    assert "drifted" in err and "ex-scaling: expected holds +, got wrong -" in err


def test_wired_into_the_minilora_command(tmp_path, capsys):
    cli = pytest.importorskip("minilora.cli")
    out = tmp_path / "a.md"
    assert cli.main(["check-article", "--markdown", str(out), "-v"]) == 0
    assert out.read_text(encoding="utf-8") == article.to_markdown(article.check_article())
    assert "### ex-h-base" in capsys.readouterr().out


def test_committed_report_is_up_to_date(claims):
    path = REPO / article.DEFAULT_MARKDOWN
    if not path.exists():
        pytest.skip(f"{article.DEFAULT_MARKDOWN} not generated yet (minilora check-article --markdown)")
    assert path.read_text(encoding="utf-8") == article.to_markdown(claims), (
        "docs/article-check.md is stale: regenerate it with `minilora check-article --markdown`")
