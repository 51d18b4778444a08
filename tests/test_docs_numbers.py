"""The numbers that docs/math.md quotes, recomputed by minilora: a typed number that drifts from the
library's fails here, with the sentence it sits in.

Each check finds the quoted figure in the page's text (so deleting or rewording the sentence fails
too) and compares it with the value the library computes, rounded as the page rounds it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from minilora import memory, quant

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
