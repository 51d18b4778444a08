"""The numbers that docs/math.md quotes, recomputed by minilora: a typed number that drifts from the
library's fails here, with the sentence it sits in. (The notebooks' figures: tests/test_notebook_numbers.py.)

Each check finds the quoted figure in the page's text (so deleting or rewording the sentence fails
too) and compares it with the value the library computes, rounded as the page rounds it.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from minilora import memory, quant, settings
from minilora.lora.config import REGEX_TIMEOUT_S

MATH = (Path(__file__).resolve().parents[1] / "docs" / "math.md").read_text(encoding="utf-8")


def quoted(fmt: str, value: float) -> str:
    """``value`` formatted as the page writes it, asserted to occur in docs/math.md."""
    text = fmt.format(value)
    assert text in MATH, f"docs/math.md should quote {text!r} (minilora computes {value!r})"
    return text


def test_double_quantization_bits_per_parameter():
    extra = quant.nf4_bits_per_parameter(64, double_quant=True) - 4
    quoted("{:.4f}$", extra)                                     # 8/64 + 32/(64·256) = 0.1270
    quoted("${:.3f}$ bits per parameter in all", 4 + extra)
    quoted("against ${:.1f}$ without", quant.nf4_bits_per_parameter(64, double_quant=False))


def test_nominal_70b_in_nf4():
    bits = quant.nf4_bits_per_parameter(64, double_quant=True)
    gb = memory.memory_breakdown(70e9, "qlora", r=16, lora_params=1, quantize_all=True).base / memory.GB
    assert gb == pytest.approx(70e9 * bits / 8 / memory.GB, rel=1e-3)
    quoted("4.127 / 8 = {:.1f}$ GB", gb)


def test_llama3_70b_stored_base():
    n = memory.count_parameters("llama3-70b")["total"]
    quoted("Llama 3 70B has {:,} parameters", n)
    base = memory.memory_breakdown("llama3-70b", "qlora", r=16).base / memory.GB
    quoted("its stored base is {:.1f} GB", base)


def test_qlora_frozen_bytes_per_parameter():
    bits = quant.nf4_bits_per_parameter(64, double_quant=True)
    quoted("4.127 / 8 = {:.3f}", bits / 8)


def test_nf4_code_book_offset():
    """delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, QLoRA's outer probability, and the plain 4.5 bits."""
    quoted("$\\delta = {:.7f}$", 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))))
    quoted("$4 + 32/64 = {:g}$ bits", quant.nf4_bits_per_parameter(64, double_quant=False))


def test_nf4_index_entropy_on_normal_weights():
    """The caveat to "information-theoretically optimal": NF4's indices of N(0, 1) weights carry
    about 3.88 bits, not 4. A 4096 x 4096 sample estimates the entropy to about 1e-4 bits (seeds
    0-3 give 3.88448 to 3.88472), far from the 3.875 and 3.885 where the 2-decimal figure would change."""
    w = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    use = np.bincount(quant.quantize_nf4(w, blocksize=64).indices().reshape(-1), minlength=16) / w.size
    entropy = float(-(use[use > 0] * np.log2(use[use > 0])).sum())
    assert 3.8 < entropy < 4
    quoted("they carry about {:.2f} bits of", entropy)


DOCS = Path(__file__).resolve().parents[1] / "docs"
ROOT = DOCS.parent
MEASURED = re.compile(r"\d+\.\d+|\d{1,3}(?:,\d{3})+")   # decimals and thousands: measured, not defined


def unrecorded(text: str, *records: Path) -> list[str]:
    """The measured-looking figures of ``text`` that none of ``records`` holds."""
    held = "".join(p.read_text(encoding="utf-8") for p in records)
    return sorted({f for f in MEASURED.findall(text) if f not in held})


def test_architecture_twin_figures_are_benchmarks():
    """What each fast twin buys (the table's rows) is a measurement recorded in docs/benchmarks.md."""
    rows = "\n".join(line for line in (DOCS / "architecture.md").read_text(encoding="utf-8").splitlines()
                     if line.startswith("| ") and "`" in line)
    assert "ms" in rows, "docs/architecture.md should hold the table of twins"
    missing = unrecorded(rows, DOCS / "benchmarks.md")
    assert not missing, (f"docs/architecture.md's twin table quotes {missing}, which docs/benchmarks.md "
                         "does not record: measure and record them there, or cite the recorded figure")


def test_backend_page_figures():
    """docs/backend.md: its thresholds are settings.py's, its measured figures recorded where measured."""
    page = (DOCS / "backend.md").read_text(encoding="utf-8")
    assert f"`settings.HOST_MMAP_THRESHOLD`, {settings.HOST_MMAP_THRESHOLD >> 20} MiB" in page
    assert f"`HOST_TRIM_THRESHOLD`, {settings.HOST_TRIM_THRESHOLD >> 30} GiB" in page
    assert f"default min({settings.DEFAULT_MAX_THREADS}, cores)" in page
    missing = unrecorded(page, DOCS / "benchmarks.md", ROOT / "minilora" / "backend.py")
    assert not missing, (f"docs/backend.md quotes {missing}, recorded neither in docs/benchmarks.md nor "
                         "in minilora/backend.py's notes: record the measurement or drop the figure")


def test_guarantees_regex_time_bound():
    page = " ".join((DOCS / "guarantees.md").read_text(encoding="utf-8").split())
    assert f"a time bound ({REGEX_TIMEOUT_S:g} s per module name" in page


def test_teachers_guide_verdicts_are_the_checkers():
    """The three verdicts docs/teachers-guide.md shows are what ``check`` prints for a right answer,
    alpha instead of alpha/r, and B @ A for (B A)ᵀ: the case numbers, values and counts included."""
    from minilora.teaching.exercises import check

    def right(x, W0, A, B, alpha, r):
        return x @ W0.T + alpha / r * (x @ A.T) @ B.T

    def alpha_not_over_r(x, W0, A, B, alpha, r):
        return x @ W0.T + alpha * (x @ A.T) @ B.T

    def wrong_product(x, W0, A, B, alpha, r):
        return x @ W0.T + alpha / r * x @ (B @ A)

    guide = (DOCS / "teachers-guide.md").read_text(encoding="utf-8")
    for fn, details in ((right, True), (alpha_not_over_r, True), (wrong_product, False)):
        first, *rest = str(check("lora_forward", fn)).splitlines()
        head, tail = first.split(": x (")[0], first.rsplit(", alpha=", 1)[-1]   # the guide elides the arrays
        assert head in guide, f"docs/teachers-guide.md should show {head!r}"
        if head != first:
            assert f"{head}: x (" in guide and f", alpha={tail}" in guide, first
        for line in rest if details else ():
            if "differ" in line or "expected (" in line or "got  " in line or "cases failed" in line:
                assert line in guide, f"docs/teachers-guide.md should show {line!r}"


def test_merge_drift_cycles_are_notebook_06s():
    source = (ROOT / "notebooks" / "06_merging.py").read_text(encoding="utf-8")
    cycles = int(re.search(r"n_cycles = \d+ if FAST else (\d+)", source)[1])
    quoted("notebook 06 measures it over {} cycles", cycles)
