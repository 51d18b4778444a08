"""Code books for 4-bit and 8-bit blockwise quantization, built step by step.

A *code book* is the short list of values a quantized number can take; a 4-bit index picks one of
16 entries, and each block of weights is stored as indices plus one scale (its absmax). This file
builds, without SciPy, the code books bitsandbytes uses, equal to its tables bit for bit:

- ``NF4_CODE``: NormalFloat4, the QLoRA code book (Dettmers et al., 2023, "QLoRA: Efficient
  Finetuning of Quantized LLMs", section 3): quantiles of the standard normal, so that a normal
  weight is equally likely to fall into each bin. ``create_normal_map`` shows each step.
- ``FP4_CODE``: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit), in bit-pattern order.
- ``INT4_CODE``: plain symmetric integers k/7, the baseline that wastes one pattern on a second zero.
- ``DYNAMIC_MAP``: the signed 8-bit "dynamic" map (Dettmers, 2016, "8-Bit Approximations for
  Parallelism in Deep Learning") that double quantization uses for the absmax constants.

All are float32 NumPy arrays, read-only so that no caller can change a format constant by accident.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

__all__ = [
    "float32_linspace", "create_normal_map", "create_int4_map", "create_dynamic_map",
    "NF4_CODE", "FP4_CODE", "INT4_CODE", "DYNAMIC_MAP", "get_code",
]

# QLoRA's outermost quantile: Phi^-1(1) is infinite, so the top bin edge must stay below 1. The
# paper takes the mean of the two natural choices for 15 and 16 bins,
# ((1 - 1/(2*15)) + (1 - 1/(2*16))) / 2 = 0.96770833..., rounded to 7 digits as bitsandbytes does.
NF4_OFFSET = 0.9677083


def float32_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, reproduced bit for bit.

    The step is rounded to float32 once; each point is then ONE rounding of ``start + i*step`` for
    the first half and of ``end - (steps-1-i)*step`` for the second (PyTorch counts back from the end
    so that the last point is exactly ``end``). For the code books' ranges the products and sums are
    exact in float64 (a 24-bit step times a small integer plus a float32 of similar magnitude), so
    rounding the float64 result to float32 is that one rounding. ``np.linspace(..., dtype=np.float32)`` rounds differently in the last bit for a few
    points, and the NF4 and dynamic code books inherit those bits.
    """
    if steps < 2:
        raise ValueError(f"float32_linspace needs steps >= 2, got {steps}")
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)            # float32 step, as PyTorch computes it
    i = np.arange(steps, dtype=np.float64)
    from_start = np.float64(start32) + np.float64(step) * i     # exact in float64
    from_end = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, from_start, from_end).astype(np.float32)


def create_normal_map(offset: float = NF4_OFFSET, use_extra_value: bool = True) -> np.ndarray:
    """The NF4 code book: 16 float32 values in [-1, 1], ascending, with an exact zero.

    Steps (QLoRA's ``create_normal_map``):

    1. Positive half: 9 evenly spaced probabilities from ``offset`` down to 0.5 (float32, see
       ``float32_linspace``); drop the last (0.5, whose quantile is 0) and take the standard normal
       quantile Phi^-1(p) of the other 8.
    2. Negative half: 8 evenly spaced probabilities from ``offset`` to 0.5; drop 0.5; negate the 7
       quantiles.
    3. Add one exact 0, round to float32, sort, and divide by the largest value Phi^-1(offset), so the
       ends are exactly -1 and +1.

    Why it is asymmetric: 4 bits give 16 patterns. A symmetric code book with an exact zero has an
    odd number of values (7 + 1 + 7 = 15), wasting one pattern (``INT4_CODE`` shows the waste: two
    zeros). QLoRA wants the exact zero (zero weights and padding stay exactly zero) AND all 16
    patterns, so one side gets one more value: 8 positive, 7 negative. Both halves start at the same
    outer quantile, so after normalisation -1 and +1 are both codes; the positive side is simply
    sampled more finely.

    ``use_extra_value=False`` gives the symmetric 7 + 1 + 7 variant, padded with a second zero.
    Phi^-1 is ``statistics.NormalDist().inv_cdf``; no SciPy needed.
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must lie in (0.5, 1), got {offset}; QLoRA uses {NF4_OFFSET}")
    phi_inv = NormalDist().inv_cdf
    n_positive = 8 if use_extra_value else 7
    p_positive = float32_linspace(offset, 0.5, n_positive + 1)[:-1]   # n_positive probabilities
    p_negative = float32_linspace(offset, 0.5, 8)[:-1]                # 7 probabilities
    # Fifteen scalar quantiles: this loop builds a constant once, it is not a hot path.
    positive = [phi_inv(float(p)) for p in p_positive]
    negative = [-phi_inv(float(p)) for p in p_negative]
    zeros = [0.0] * (16 - len(positive) - len(negative))              # 1 (asymmetric) or 2 zeros
    values = np.array(positive + zeros + negative, dtype=np.float32)  # one rounding to float32
    values.sort()
    return values / values.max()                                      # float32 division: ends at +-1


def create_int4_map() -> np.ndarray:
    """Symmetric absmax int4: k/7 for k = -7..7, with -0 and +0 filling the 16th pattern (the same
    15 levels as bitsandbytes' "int4" table). Evenly spaced, so it ignores where weights are dense."""
    k = np.array([-7, -6, -5, -4, -3, -2, -1, -0.0, 0.0, 1, 2, 3, 4, 5, 6, 7], dtype=np.float32)
    return k / np.float32(7)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic map: 256 float32 values, ascending, in [-0.993, 1].

    Each "decade" 10^-6, 10^-5, ..., 10^0 is split into linear steps: decade i (i = 0..6) holds the
    midpoints of 2^i + 1 evenly spaced edges in [0.1, 1], times 10^(i-6), with both signs. The small
    decades get few values and the large ones many, so relative precision stays roughly constant
    over six orders of magnitude, like a float with a variable-length exponent. Add 0 and 1: 256.
    """
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    values = []
    for i in range(max_exponent_bits):                    # one decade per exponent value
        n_edges = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                   else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        edges = float32_linspace(0.1, 1.0, n_edges)
        means = (edges[:-1] + edges[1:]) / np.float32(2)  # float32, as PyTorch computes it
        decade = np.float32(10.0 ** (i - (max_exponent_bits - 1)))
        values.append(decade * means)
        if signed:
            values.append(-decade * means)
    if additional_items > 0:                              # only when exponent bits < non-sign bits
        edges = float32_linspace(0.1, 1.0, additional_items + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2)
        values.append(means)                              # in the top decade, 10^0
        if signed:
            values.append(-means)
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    data = np.concatenate(values).astype(np.float32)
    if data.size != 2 ** total_bits:
        raise ValueError(f"dynamic map with {max_exponent_bits} exponent bits has {data.size} values, "
                         f"not {2 ** total_bits}; use the default max_exponent_bits=7")
    data = np.concatenate([data, np.zeros(256 - data.size, np.float32)])  # pad to 256 (8-bit index)
    data.sort()
    return data


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.setflags(write=False)
    return a


NF4_CODE = _frozen(create_normal_map())
# bitsandbytes' FP4 in bit-pattern order (index = sign bit, then 3 bits), so packed bytes match it:
# 0b000=0, 0b001=0.0625 (subnormal), 0b010=8, 0b011=12, 0b100=4, 0b101=6, 0b110=2, 0b111=3; the
# sign bit (0b1000) negates. Divided by the largest magnitude, 12.
FP4_CODE = _frozen(np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                            dtype=np.float32) / np.float32(12))
INT4_CODE = _frozen(create_int4_map())
DYNAMIC_MAP = _frozen(create_dynamic_map(signed=True))

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


def get_code(quant_type: str) -> np.ndarray:
    """The 16-entry code book for ``"nf4"``, ``"fp4"`` or ``"int4"``."""
    try:
        return _CODES[quant_type]
    except KeyError:
        raise ValueError(f"unknown 4-bit type {quant_type!r}; use one of {sorted(_CODES)}") from None
