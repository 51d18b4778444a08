"""Every number in the article "What is LoRA?", recomputed by minilora: ``minilora check-article``.

The article (shared/article/what-is-lora.txt) teaches LoRA with a worked 4×4 example, parameter
counts and memory figures. This module turns each numeric or shape claim into a ``Claim``: the
article's value, what minilora's own functions compute (``lora.merge`` for the formula,
``memory`` for parameter and byte counts, ``quant`` for NF4 storage), a verdict and a short
explanation of the right reading. Nothing here re-types a formula or a computed answer: the values
in this file are the article's.

How a verdict is reached. A claim is evaluated under one or more *readings*, the plausible ways to
interpret it (which model, which layers, which shapes, whether the quantization constants count).
Each reading compares minilora's value with the article's under a tolerance taken from the
article's wording (exact; half a unit of the last printed digit; ±1% for abbreviations like "16.7M";
±10% for "~" and "≈"; ±50% for order-of-magnitude figures like "~100MB"). Then:

- "holds": every reading agrees;
- "depends on an assumption": some readings agree and some do not;
- "wrong": no reading agrees;
- "inconsistent": the reading the article itself states disagrees, yet another reading agrees (the
  number belongs to a different setting than the one the article names).

``EXPECTED`` stores, per claim, the verdict and which readings agree; ``run_checks`` reports any
difference as drift (a changed formula in minilora shows up here), and the command exits non-zero.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import numpy as np

from minilora import memory
from minilora import quant
from minilora.lora import merge

VERDICTS = ("holds", "wrong", "inconsistent", "depends on an assumption")
DEFAULT_MARKDOWN = "docs/article-check.md"

# ---------------------------------------------------------------- the article's own numbers
# "A Concrete Numeric Example", copied from the article.
EX_W0 = [[2.0, 0.5, 1.2, 0.8],
         [0.3, 1.8, 0.4, 2.1],
         [1.1, 0.6, 1.9, 0.7],
         [0.4, 1.3, 0.8, 1.6]]
EX_X = [1.0, 0.5, 0.8, 0.2]
EX_A = [[0.5, 0.2],  # "shape (4 × 2)"
        [0.1, 0.8],
        [0.3, 0.4],
        [0.6, 0.1]]
EX_B = [[0.3, 0.0, 0.5, 0.2],  # "shape (2 × 4)"
        [0.1, 0.4, 0.2, 0.7]]
EX_ALPHA, EX_R = 8, 2
EX_H_BASE = [3.61, 2.37, 3.56, 2.36]
EX_BAX = [1.42, 1.08, 1.24, 1.56]
EX_SCALED = [5.68, 4.32, 4.96, 6.24]
EX_H = [9.29, 6.69, 8.52, 8.60]

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")  # the article's LoraConfig
QV = ("q_proj", "v_proj")                        # PEFT's default for Llama, the article's Alpaca example
LLAMA3_70B = "llama3-70b"                        # "Llama 3 70B", the article's running example


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class Tol:
    """How close counts as agreeing with the article's value."""
    rel: float = 0.0
    abs: float = 0.0
    why: str = "exact"

    def close(self, value, article) -> bool:
        if isinstance(article, bool) or isinstance(value, (bool, str)):
            return value == article
        if isinstance(article, tuple):  # a shape
            return tuple(value) == article
        v, a = np.asarray(value, dtype=np.float64), np.asarray(article, dtype=np.float64)
        if v.shape != a.shape:
            return False
        return bool(np.all(np.abs(v - a) <= self.abs + self.rel * np.abs(a) + 1e-12 * np.abs(a)))


EXACT = Tol()
PRINTED_2DP = Tol(abs=0.005, why="±0.005 (printed to 2 decimals)")
ABBREV = Tol(rel=0.01, why="±1% (an abbreviated number)")
APPROX = Tol(rel=0.10, why="±10% (a '~' or '≈' figure)")
ORDER = Tol(rel=0.50, why="±50% (an order-of-magnitude figure)")
ONE_GPU = Tol(abs=1, why="±1 GPU")


@dataclass(frozen=True)
class Reading:
    """One interpretation of a claim: minilora's value under it, and whether it agrees."""
    label: str
    value: object          # what minilora computed (a number, a shape, an array, a bool or a reason)
    shown: str             # ``value`` formatted for people
    article: object        # the article's value under this reading
    matches: bool
    stated: bool = False   # the reading the article's own words name
    tol: Tol = EXACT       # how ``matches`` was decided


@dataclass(frozen=True)
class Claim:
    id: str
    section: str
    claim: str
    article: str           # the article's value, as it writes it
    minilora: str          # minilora's value under the first reading
    verdict: str
    explanation: str
    tolerance: str = "exact"
    readings: tuple = field(default=())

    @property
    def cells(self) -> tuple[str, ...]:
        """The row shown by the command and in the markdown table."""
        return (self.id, self.claim, self.article, self.minilora, self.verdict)


@dataclass(frozen=True)
class Drift:
    """A claim whose computed outcome differs from what this module expects."""
    id: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.id}: expected {self.expected}, got {self.got}"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if isinstance(v, tuple):
        return "(" + "×".join(str(n) for n in v) + ")"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    a = np.asarray(v, dtype=np.float64)
    if a.ndim:
        return "[" + ", ".join(f"{x:.4g}" for x in a.ravel()) + "]"
    return f"{float(a):.4g}"


def _reading(label, compute, article, tol: Tol, stated=False, show=_fmt) -> Reading:
    """Evaluate ``compute()``; a ValueError (e.g. shapes that cannot multiply) is a non-agreeing
    reading whose value is the reason."""
    try:
        value = compute()
    except ValueError as e:
        return Reading(label, f"undefined: {e}", "undefined", article, False, stated, tol)
    return Reading(label, value, show(value), article, tol.close(value, article), stated, tol)


def verdict_of(readings) -> str:
    """The verdict rule of the module docstring."""
    stated = [r for r in readings if r.stated]
    if stated and not any(r.matches for r in stated):
        return "inconsistent" if any(r.matches for r in readings) else "wrong"
    if all(r.matches for r in readings):
        return "holds"
    return "depends on an assumption" if any(r.matches for r in readings) else "wrong"


def pattern_of(readings) -> str:
    """'+' for each agreeing reading, '-' for each disagreeing one, in order."""
    return "".join("+" if r.matches else "-" for r in readings)


_CLAIMS = []


def _claim(id, section, claim, article, tol=EXACT):
    """Register a function that returns (readings, explanation) as the check of one claim."""
    def register(fn):
        _CLAIMS.append((id, section, claim, article, tol, fn))
        return fn
    return register


# ---------------------------------------------------------------- helpers over minilora
GB, GiB = memory.GB, memory.GiB


def _gb(nbytes) -> str:
    return f"{nbytes / GB:.1f} GB"


def _pct(x) -> str:
    return f"{x:.3g}%"


def _tiny(x) -> str:
    """A rounding-level difference, shown the same on every machine."""
    return "< 1e-12" if abs(x) < 1e-12 else f"{x:.3g}"


def _trace(lora_A, lora_B):
    """merge_trace of the worked example for one assignment of the article's matrices."""
    return merge.merge_trace(np.asarray(EX_W0), np.asarray(lora_A), np.asarray(lora_B), EX_ALPHA, EX_R,
                             x=np.asarray(EX_X))


# The three ways to read the article's A (4×2) and B (2×4) as LoRA factors.
def _as_printed():
    """B @ A with the shapes as printed: lora_A = A (4×2), lora_B = B (2×4)."""
    return _trace(EX_A, EX_B)


def _a_at_b():
    """A @ B: the article's A (4×2) is (out, r) and B (2×4) is (r, in), i.e. PEFT's lora_B and
    lora_A, and the paper's B (d×r) and A (r×k) under swapped names."""
    return _trace(EX_B, EX_A)


def _transposed():
    """PEFT's convention reached by transposing each matrix: lora_A = Aᵀ (2×4), lora_B = Bᵀ (4×2)."""
    return _trace(np.asarray(EX_A).T, np.asarray(EX_B).T)


EX_READINGS = (("A @ B (PEFT's lora_B = A, lora_A = B)", _a_at_b, False),
               ("PEFT's convention on Aᵀ, Bᵀ", _transposed, False),
               ("as printed: B @ A with A (4×2), B (2×4)", _as_printed, True))


def _ex_step(key, article, tol=PRINTED_2DP):
    return [_reading(label, lambda f=f: f()[key].value, article, tol, stated=stated)
            for label, f, stated in EX_READINGS]


def _qlora(model, target_modules=QV, r=16, **kw):
    return memory.memory_breakdown(model, "qlora", r=r, target_modules=target_modules, **kw)


def _lora(model, target_modules=QV, r=16, **kw):
    return memory.memory_breakdown(model, "lora", r=r, target_modules=target_modules, **kw)


# ---------------------------------------------------------------- the claims
S_PROBLEM = "The Problem"
S_COMPARE = "Full Fine-Tuning vs LoRA"
S_RANK = "Rank Decomposition"
S_EXAMPLE = "A Concrete Numeric Example"
S_HYPER = "Hyperparameters"
S_QLORA = "QLoRA"
S_MERGE = "Merging Adapters"
S_QUICK = "Quick Reference"


@_claim("ex-h-base", S_EXAMPLE, "h_base = W₀·x", _fmt(EX_H_BASE), PRINTED_2DP)
def _check_ex_h_base():
    r = [_reading("W₀·x (rows of W₀ times x)", lambda: _a_at_b()["W0x"].value, EX_H_BASE, PRINTED_2DP,
                  stated=True),
         _reading("xᵀ·W₀ (columns of W₀ times x)",
                  lambda: merge.merge_trace(np.asarray(EX_W0).T, np.zeros((EX_R, 4)), np.zeros((4, EX_R)),
                                            EX_ALPHA, EX_R, x=np.asarray(EX_X))["W0x"].value,
                  EX_H_BASE, PRINTED_2DP)]
    return r, (f"W₀·x is {r[0].shown} (first row: 2.0·1.0 + 0.5·0.5 + 1.2·0.8 + 0.8·0.2); the article's "
               f"h_base matches neither W₀·x nor xᵀ·W₀ ({r[1].shown}), so every later line inherits the "
               "error.")


@_claim("ex-ba-shape", S_EXAMPLE, "BA = B @ A has shape (4 × 4)", "(4×4)")
def _check_ex_ba_shape():
    A, B = np.asarray(EX_A), np.asarray(EX_B)
    r = [_reading("B @ A as printed (B 2×4, A 4×2)", lambda: merge.delta_shape(A.shape, B.shape), (4, 4),
                  EXACT, stated=True),
         _reading("A @ B", lambda: merge.delta_shape(B.shape, A.shape), (4, 4), EXACT)]
    return r, (f"With the printed shapes B (2×4) @ A (4×2) is {r[0].shown}, which cannot be added to a "
               f"4×4 W₀; only A @ B is {r[1].shown}. PEFT (and minilora) store lora_A as (r, in) = (2×4) "
               "and lora_B as (out, r) = (4×2), so that B @ A is (out, in).")


@_claim("ex-scaling", S_EXAMPLE, "scaling = α / r = 8 / 2", "4.0")
def _check_ex_scaling():
    r = [_reading("α/r", lambda: merge.scaling(EX_ALPHA, EX_R), 4.0, EXACT, stated=True)]
    return r, (f"α/r = 8/2 = {r[0].shown}, as stated (rsLoRA would use α/√r = "
               f"{merge.scaling(EX_ALPHA, EX_R, use_rslora=True):.3g}).")


@_claim("ex-bax", S_EXAMPLE, "BA·x", _fmt(EX_BAX), PRINTED_2DP)
def _check_ex_bax():
    r = _ex_step("BAx", EX_BAX)
    return r, (f"With the printed shapes B·A·x is undefined; reading A @ B it is {r[0].shown}, with PEFT's "
               f"convention on the transposed matrices {r[1].shown}. No reading gives the article's "
               "numbers.")


@_claim("ex-scaled", S_EXAMPLE, "(BA·x) × 4", _fmt(EX_SCALED), PRINTED_2DP)
def _check_ex_scaled():
    r = _ex_step("scaled", EX_SCALED)
    return r, (f"4 × the article's BA·x is computed correctly, but BA·x itself is wrong: the adapter's "
               f"contribution is {r[0].shown} (A @ B) or {r[1].shown} (transposed).")


@_claim("ex-h", S_EXAMPLE, "h = W₀·x + (BA·x)·scaling", _fmt(EX_H), PRINTED_2DP)
def _check_ex_h():
    r = _ex_step("h_unmerged", EX_H)
    return r, (f"The right output is {r[0].shown} reading A @ B (or {r[1].shown} transposed): "
               f"the article's {_fmt(EX_H)} carries both its wrong h_base and its wrong BA·x.")


@_claim("ex-additions", S_EXAMPLE, "the printed additions and ×4", _fmt(EX_H), PRINTED_2DP)
def _check_ex_additions():
    r = [_reading("h_base + BA·x × scaling, from the article's own numbers",
                  lambda: np.asarray(EX_H_BASE) + np.asarray(EX_BAX) * merge.scaling(EX_ALPHA, EX_R),
                  EX_H, PRINTED_2DP, stated=True)]
    return r, ("The last two lines are internally consistent: the arithmetic from the article's "
               "intermediate values is right; the inputs to it are not.")


@_claim("ex-b-zero", S_EXAMPLE, "B starts at zero, so LoRA adds nothing", "ΔW = 0")
def _check_ex_b_zero():
    zeros_B = np.zeros((4, EX_R))
    r = [_reading("max |ΔW| with the printed B", lambda: float(np.abs(_a_at_b()["delta_W"].value).max()),
                  0.0, EXACT, stated=True),
         _reading("max |ΔW| with B = 0",
                  lambda: float(np.abs(merge.delta_weight(np.asarray(EX_B), zeros_B, EX_ALPHA, EX_R)).max()),
                  0.0, EXACT)]
    return r, (f"B = 0 does give ΔW = 0 and h = h_base, but the example then uses a nonzero B (max |ΔW| "
               f"= {r[0].shown}): it shows an adapter after some training, not at initialisation.")


@_claim("ex-67m", S_EXAMPLE, "'without touching the original 67M+ parameters'", "67M", ABBREV)
def _check_ex_67m():
    r = [_reading("parameters of the example's W₀ (4×4)",
                  lambda: memory.linear_weight_parameters(*np.asarray(EX_W0).shape), 67_000_000, ABBREV,
                  stated=True),
         _reading("the 8192×8192 layer of the earlier section",
                  lambda: memory.linear_weight_parameters(8192, 8192), 67_000_000, ABBREV)]
    return r, f"The example's W₀ has {r[0].shown} parameters; 67M is the 8192×8192 layer of another section."


@_claim("formula-merge-equals-forward", "The Math", "W₀·x + B·A·x·α/r equals (W₀ + B·A·α/r)·x",
        "identical", Tol(abs=1e-12, why="±1e-12 (float64 rounding)"))
def _check_formula_merge_equals_forward():
    r = [_reading("max |h merged − h unmerged|, worked example in float64",
                  lambda: _a_at_b()["max_diff"].value, 0.0, Tol(abs=1e-12), stated=True, show=_tiny)]
    return r, ("Merging is exact: the merged weight gives the unmerged layer's output up to rounding "
               f"({r[0].shown} here), which is why a merged model needs no adapter code at inference.")


@_claim("rd-w0-params", S_RANK, "8192 × 8192 is 'over 67 million parameters'", "67M", ABBREV)
def _check_rd_w0_params():
    r = [_reading("8192·8192", lambda: memory.linear_weight_parameters(8192, 8192), 67_000_000, ABBREV,
                  stated=True)]
    return r, f"8192² = {r[0].shown}."


@_claim("rd-ab-params", S_RANK, "A and B have 8192 × 16 = 131,072 each", "131,072, 131,072")
def _check_rd_ab_params():
    def sizes():
        a_shape, b_shape = merge.lora_factor_shapes(8192, 8192, 16)
        return math.prod(a_shape), math.prod(b_shape)
    r = [_reading("lora_A (16, 8192), lora_B (8192, 16)", sizes, (131_072, 131_072), EXACT, stated=True,
                  show=lambda v: ", ".join(f"{n:,}" for n in v))]
    return r, f"lora_A is r·k = 16·8192 and lora_B d·r = 8192·16: {r[0].shown}."


@_claim("rd-total", S_RANK, "A + B: '~262,000 parameters'", "262,000", ABBREV)
def _check_rd_total():
    r = [_reading("r·(d + k) for 8192×8192, r = 16", lambda: memory.lora_linear_parameters(8192, 8192, 16),
                  262_000, ABBREV, stated=True)]
    return r, f"r·(d + k) = 16·16384 = {r[0].shown} for one 8192×8192 matrix."


@_claim("rd-ratio", S_RANK, "'256× smaller than the full 67M'", "256")
def _check_rd_ratio():
    full, lora = memory.linear_weight_parameters(8192, 8192), memory.lora_linear_parameters(8192, 8192, 16)
    r = [_reading("d·k / (r·(d + k))",
                  lambda: memory.linear_weight_parameters(8192, 8192)
                  / memory.lora_linear_parameters(8192, 8192, 16), 256.0, EXACT, stated=True)]
    return r, (f"{full:,} / {lora:,} = {r[0].shown} exactly (d·k / (r·(d+k)) = d / 2r for a square "
               "matrix).")


@_claim("rd-shapes", S_RANK, "A is (d×r), B is (r×k), ΔW = B·A is (d×k)", "(8192×8192)")
def _check_rd_shapes():
    d = k = 8192
    r = [_reading("B·A with A (d×r), B (r×k) as written",
                  lambda: merge.delta_shape((d, 16), (16, k)), (d, k), EXACT, stated=True),
         _reading("B (d×r), A (r×k): the LoRA paper and PEFT",
                  lambda: merge.delta_shape((16, k), (d, 16)), (d, k), EXACT)]
    return r, (f"With A (d×r) and B (r×k), B·A is (r×k)·(d×r) = {r[0].shown}, not d×k (and needs k = d). "
               "The paper has B ∈ R^(d×r), A ∈ R^(r×k); PEFT and minilora store A: (r, in), B: (out, r), "
               f"so B @ A is (out, in) = {r[1].shown}.")


@_claim("pct-0.1", S_COMPARE, "LoRA trains '~0.1% params'", "0.1%", ORDER)
def _check_pct_0_1():
    def pct(model, tm):
        return lambda: 100 * memory.lora_parameters(model, 16, tm) / memory.count_parameters(model)["total"]
    r = [_reading("Llama 3 70B, r=16 on q,k,v,o (the article's config)", pct(LLAMA3_70B, QKVO), 0.1, ORDER,
                  show=_pct),
         _reading("Llama 3 70B, r=16 on q,v (PEFT default)", pct(LLAMA3_70B, QV), 0.1, ORDER, show=_pct),
         _reading("Llama 3 70B, r=16 on all linear", pct(LLAMA3_70B, "all-linear"), 0.1, ORDER, show=_pct),
         _reading("Llama-7B, r=16 on q,k,v,o", pct("llama-7b", QKVO), 0.1, ORDER, show=_pct)]
    return r, ("About 0.1% for a 70B model with r=16 on q,k,v,o; the fraction shrinks with model width "
               f"and grows with target modules: {r[1].shown} (q,v) to {r[2].shown} (all linear), and "
               f"{r[3].shown} for Llama-7B.")


@_claim("pc-per-module", S_HYPER, "per target module: params = 2 × r × d", "2·r·d")
def _check_pc_per_module():
    sh70, sh7 = memory.linear_shapes(LLAMA3_70B), memory.linear_shapes("llama-7b")
    r = [_reading("q_proj 4096→4096, r=16", lambda: memory.lora_linear_parameters(4096, 4096, 16),
                  2 * 16 * 4096, EXACT),
         _reading("Llama 3 70B k_proj 8192→1024 (GQA), r=16",
                  lambda: memory.lora_linear_parameters(*sh70["k_proj"], 16), 2 * 16 * 8192, EXACT),
         _reading("Llama-7B gate_proj 4096→11008, r=16",
                  lambda: memory.lora_linear_parameters(*sh7["gate_proj"], 16), 2 * 16 * 4096, EXACT)]
    return r, ("The count is r·(in + out): 2·r·d only for a square d×d matrix. With grouped-query "
               f"attention k_proj has {r[1].shown} (not {_fmt(r[1].article)}) and an MLP projection "
               f"{r[2].shown} (not {_fmt(r[2].article)}).")


@_claim("pc-per-head", S_HYPER, "'Per head: 4 × 2 × 16 × 4096 = 524K'", "524K", ABBREV)
def _check_pc_per_head():
    per_layer = lambda: memory.lora_parameters("llama-7b", 16, QKVO, layers=0)  # noqa: E731
    heads = memory.PRESETS["llama-7b"].num_attention_heads
    r = [_reading("per attention head (a head's share of one layer's q,k,v,o adapters)",
                  lambda: per_layer() // heads, 524_000, ABBREV, stated=True),
         _reading("per decoder layer (q,k,v,o of one layer, d=4096, r=16)", per_layer, 524_000, ABBREV)]
    return r, (f"4 × 2 × 16 × 4096 = {r[1].shown} is the count for one decoder LAYER (four 4096×4096 "
               "projections). LoRA adapts whole projection matrices, not heads: each A and B spans all "
               f"{heads} heads, whose share would be {r[0].shown}.")


@_claim("pc-total", S_HYPER, "'Total: 32 × 524K = 16.7M params'", "16.7M", ABBREV)
def _check_pc_total():
    r = [_reading("Llama-7B: d=4096, 32 heads, 32 layers",
                  lambda: memory.lora_parameters("llama-7b", 16, QKVO), 16_700_000, ABBREV),
         _reading("Llama 3 8B: d=4096, 32 heads, 32 layers, GQA",
                  lambda: memory.lora_parameters("llama3-8b", 16, QKVO), 16_700_000, ABBREV),
         _reading("Llama-2-13B: 40 heads, 40 layers", lambda: memory.lora_parameters("llama-13b", 16, QKVO),
                  16_700_000, ABBREV)]
    return r, ("The multiplier must be the number of LAYERS, not heads; 16.7M is right for Llama-7B only "
               f"because it has 32 of each. Llama 3 8B (same d and heads, 8 KV heads) gives {r[1].shown}; "
               f"Llama-2-13B gives {r[2].shown}.")


@_claim("mem-70b-params", S_PROBLEM, "Llama 3 70B has '70 billion parameters'", "70B", APPROX)
def _check_mem_70b_params():
    r = [_reading("Llama 3 70B", lambda: memory.count_parameters(LLAMA3_70B)["total"], 70e9, APPROX,
                  stated=True),
         _reading("Llama-2-70B", lambda: memory.count_parameters("llama-70b")["total"], 70e9, APPROX)]
    extra = memory.count_parameters(LLAMA3_70B)["total"] - memory.count_parameters("llama-70b")["total"]
    return r, (f"Llama 3 70B has {r[0].shown} parameters (its 128K vocabulary adds {extra / 1e9:.2f}B over "
               f"Llama-2-70B's {r[1].shown}).")


@_claim("mem-14-a100", S_PROBLEM, "full fine-tune: '~14 A100s just to fit the model and gradients'",
        "~14", ONE_GPU)
def _check_mem_14_a100():
    def gpus(model, kinds):
        return lambda: memory.gpus_needed(sum(getattr(memory.memory_breakdown(model, "full"), k)
                                              for k in kinds), 80)
    r = [_reading("weights + gradients in 16-bit, as written (4 B/param), 70e9",
                  gpus(70e9, ("weights", "gradients")), 14, ONE_GPU, stated=True),
         _reading("weights + gradients + AdamW with fp32 master (16 B/param), 70e9",
                  gpus(70e9, ("total",)), 14, ONE_GPU),
         _reading("the same for Llama 3 70B", gpus(LLAMA3_70B, ("total",)), 14, ONE_GPU)]
    total = memory.memory_breakdown(LLAMA3_70B, "full").total
    return r, (f"Weights and gradients alone (4 bytes/param) fit on {r[0].shown} A100-80GB; 14 is the count "
               f"for weights + gradients + AdamW state and fp32 master weights (16 bytes/param, "
               f"{_gb(total)} for Llama 3 70B), before activations.")


@_claim("mem-16bit", S_QLORA, "'70B × 2 bytes ≈ 140 GB' (16-bit base)", "140 GB", APPROX)
def _check_mem_16bit():
    r = [_reading("Llama 3 70B × 2 bytes", lambda: memory.memory_breakdown(LLAMA3_70B, "full").weights / GB,
                  140.0, APPROX, show=lambda v: f"{v:.1f} GB"),
         _reading("70e9 × 2 bytes", lambda: memory.memory_breakdown(70e9, "full").weights / GB, 140.0, APPROX,
                  stated=True, show=lambda v: f"{v:.1f} GB")]
    return r, (f"Holds in decimal GB ({r[0].shown} for Llama 3 70B); note that is "
               f"{memory.memory_breakdown(LLAMA3_70B, 'full').weights / GiB:.1f} GiB, the unit GPU sizes "
               "are quoted in.")


@_claim("mem-lora-total", S_QLORA, "standard LoRA on 70B: 'Total ~145 GB'", "145 GB", APPROX)
def _check_mem_lora_total():
    def tot(tm):
        return lambda: _lora(LLAMA3_70B, tm).total / GB
    show = lambda v: f"{v:.1f} GB"  # noqa: E731
    r = [_reading("r=16 on q,k,v,o (the article's config)", tot(QKVO), 145.0, APPROX, stated=True, show=show),
         _reading("r=16 on q,v", tot(QV), 145.0, APPROX, show=show),
         _reading("r=16 on all linear", tot("all-linear"), 145.0, APPROX, show=show)]
    return r, (f"16-bit base + adapter with its gradients and AdamW state: {r[1].shown} to {r[2].shown} "
               "before activations, so ~145 GB is fair if a few GB of activations are added.")


@_claim("mem-lora-gpus", S_QLORA, "standard LoRA on 70B: 'Needs ~4× A100 80GB'", "4", ONE_GPU)
def _check_mem_lora_gpus():
    def n(tm):
        return lambda: memory.gpus_needed(_lora(LLAMA3_70B, tm).total, 80)
    r = [_reading("r=16 on q,k,v,o", n(QKVO), 4, ONE_GPU, stated=True),
         _reading("r=16 on all linear", n("all-linear"), 4, ONE_GPU),
         _reading("the article's own 145 GB", lambda: memory.gpus_needed(145e9, 80), 4, ONE_GPU)]
    n = memory.gpus_needed(145e9, 80)
    return r, (f"145 GB is {145e9 / GiB:.0f} GiB: {n} A100-80GB cards hold it with "
               f"{n * 80 - 145e9 / GiB:.0f} GiB to spare for activations; A100-40GB cards would take "
               f"{memory.gpus_needed(145e9, 40)}.")


@_claim("mem-qlora-base", S_QLORA, "'70B × 0.5 bytes (NF4) ≈ 35 GB'", "35 GB", APPROX)
def _check_mem_qlora_base():
    show = lambda v: f"{v:.1f} GB"  # noqa: E731
    r = [_reading("Llama 3 70B as QLoRA stores it: NF4 + double-quant constants, embeddings/lm_head 16-bit",
                  lambda: _qlora(LLAMA3_70B).base / GB, 35.0, APPROX, show=show),
         _reading("the same without double quantization",
                  lambda: _qlora(LLAMA3_70B, double_quant=False).base / GB, 35.0, APPROX, show=show),
         _reading("70e9 × 4 bits, constants left out",
                  lambda: _qlora(70e9, lora_params=1, include_quant_constants=False).base / GB, 35.0, APPROX,
                  stated=True, show=show),
         _reading("Llama 3 70B, every parameter 4 bits, constants left out",
                  lambda: _qlora(LLAMA3_70B, quantize_all=True, include_quant_constants=False).base / GB,
                  35.0, APPROX, show=show)]
    bits = quant.nf4_bits_per_parameter(64, True)
    return r, (f"35 GB counts only the 4-bit codes. NF4 also stores one absmax per 64 weights "
               f"({bits:.3f} bits/param with double quantization) and bitsandbytes keeps embeddings and "
               f"lm_head in 16-bit: the stored base is {r[0].shown} ({r[1].shown} without double "
               "quantization).")


@_claim("mem-qlora-total", S_QLORA, "QLoRA on 70B: 'Total ~40 GB'", "40 GB", APPROX)
def _check_mem_qlora_total():
    def tot(tm, **kw):
        return lambda: _qlora(LLAMA3_70B, tm, **kw).total / GB
    show = lambda v: f"{v:.1f} GB"  # noqa: E731
    r = [_reading("r=16 on q,k,v,o (the article's config)", tot(QKVO), 40.0, APPROX, stated=True, show=show),
         _reading("r=16 on q,v", tot(QV), 40.0, APPROX, show=show),
         _reading("r=16 on all linear", tot("all-linear"), 40.0, APPROX, show=show),
         _reading("r=16 on q,k,v,o, quantization constants left out",
                  tot(QKVO, include_quant_constants=False), 40.0, APPROX, show=show)]
    return r, (f"Base in NF4 with its constants plus the adapter's weights, gradients and AdamW state: "
               f"{r[1].shown} to {r[2].shown}, before activations.")


@_claim("mem-qlora-a100", S_QLORA, "QLoRA on 70B: 'Runs on 1× A100 80GB'", "yes")
def _check_mem_qlora_a100():
    def fits(tm):
        return lambda: memory.fits_on(_qlora(LLAMA3_70B, tm).total, 80)
    r = [_reading("r=16 on q,k,v,o", fits(QKVO), True, EXACT, stated=True),
         _reading("r=16 on all linear", fits("all-linear"), True, EXACT)]
    used = _qlora(LLAMA3_70B, QKVO).total / GiB
    return r, (f"{used:.1f} GiB of weights and training state leave {80 - used:.0f} GiB of an 80 GiB card "
               "for activations.")


@_claim("mem-70b-48gb", "Introduction", "LoRA: 'a 70B model … on a single 48GB GPU'", "yes")
def _check_mem_70b_48gb():
    r = [_reading("LoRA with a 16-bit base, r=16 on q,k,v,o",
                  lambda: memory.fits_on(_lora(LLAMA3_70B, QKVO).total, 48), True, EXACT, stated=True),
         _reading("QLoRA (NF4 base), r=16 on q,k,v,o",
                  lambda: memory.fits_on(_qlora(LLAMA3_70B, QKVO).total, 48), True, EXACT)]
    q, lo = _qlora(LLAMA3_70B, QKVO).total, _lora(LLAMA3_70B, QKVO).total
    return r, (f"Plain LoRA keeps the 16-bit base ({_gb(lo)}), {lo / (48 * GiB):.1f}× a 48 GB card; "
               f"only QLoRA fits ({q / GiB:.1f} GiB, leaving {48 - q / GiB:.0f} GiB for "
               "activations, so short sequences or gradient checkpointing).")


@_claim("lora-consumer-gpus", S_COMPARE, "LoRA 'fits on consumer GPUs (24–48GB)'", "yes")
def _check_lora_consumer_gpus():
    r = [_reading("Llama-7B, LoRA, 16-bit base, on 24 GB",
                  lambda: memory.fits_on(_lora("llama-7b").total, 24), True, EXACT),
         _reading("Llama-2-13B, LoRA, 16-bit base, on 24 GB",
                  lambda: memory.fits_on(_lora("llama-13b").total, 24), True, EXACT),
         _reading("Llama 3 70B, LoRA, 16-bit base, on 48 GB",
                  lambda: memory.fits_on(_lora(LLAMA3_70B).total, 48), True, EXACT),
         _reading("Llama 3 70B, QLoRA, on 48 GB",
                  lambda: memory.fits_on(_qlora(LLAMA3_70B).total, 48), True, EXACT)]
    return r, (f"True for 7B-class models in 16-bit ({_gb(_lora('llama-7b').total)} before activations) and "
               f"for 70B only with a 4-bit base on 48 GB; a 13B model's 16-bit weights alone are "
               f"{memory.memory_breakdown('llama-13b', 'full').weights / GiB:.1f} GiB, over a 24 GB card.")


@_claim("qlora-65b-48gb", S_QLORA, "QLoRA fine-tuned 65B on a single 48GB GPU", "yes")
def _check_qlora_65b_48gb():
    paper = dict(r=64, target_modules="all-linear")
    r = [_reading("LLaMA-65B, NF4 + DQ, r=64 on all linear (the QLoRA paper), 16 B/trainable param",
                  lambda: memory.fits_on(_qlora("llama-65b", **paper).total, 48), True, EXACT, stated=True),
         _reading("the same with bf16 adapters and 32-bit paged AdamW, no master copy (12 B/trainable)",
                  lambda: memory.fits_on(_qlora("llama-65b", master_weights=False, **paper).total, 48),
                  True, EXACT),
         _reading("LLaMA-65B, r=16 on q,v",
                  lambda: memory.fits_on(_qlora("llama-65b").total, 48), True, EXACT)]
    tot16 = _qlora("llama-65b", **paper).total
    tot12 = _qlora("llama-65b", master_weights=False, **paper).total
    full = memory.memory_breakdown("llama-65b", "full", master_weights=False).total
    return r, (f"The paper's setup (r=64 on every linear layer) needs {tot12 / GiB:.1f} to {tot16 / GiB:.1f} "
               "GiB before activations, under 48 GiB; gradient checkpointing and paged optimizers absorb "
               f"the activation peaks. Its '>780 GB' for 16-bit fine-tuning is 12 bytes/param: {_gb(full)}.")


@_claim("adapter-100mb", S_MERGE, "adapter files are '~100MB for r=16'", "100 MB", ORDER)
def _check_adapter_100mb():
    def mb(model, tm, nbytes):
        return lambda: memory.adapter_file_bytes(model, 16, tm, dtype_bytes=nbytes) / 1e6
    show = lambda v: f"{v:.0f} MB"  # noqa: E731
    r = [_reading(f"{name}, {tname}, {dname}", mb(model, tm, nbytes), 100.0, ORDER, show=show)
         for name, model in (("Llama-7B", "llama-7b"), ("Llama 3 70B", LLAMA3_70B))
         for tname, tm in (("q,v", QV), ("all linear", "all-linear"))
         for dname, nbytes in (("float32 (PEFT's default)", 4), ("16-bit", 2))]
    return r, (f"Size = bytes per value × r·(in+out) summed over adapted matrices: from {r[1].shown} "
               f"(7B, q,v, 16-bit) to {r[6].shown} (70B, all linear, float32); PEFT's defaults (q,v, "
               f"float32) give {r[0].shown} for 7B. '~100MB' is one point in that range.")


@_claim("merge-262k", S_MERGE, "merge diagram for 70B: 'ΔW ~262K params'", "262K", ABBREV)
def _check_merge_262k():
    def whole(tm):
        return lambda: memory.lora_parameters(LLAMA3_70B, 16, tm)
    r = [_reading("the whole Llama 3 70B adapter, r=16 on q,k,v,o", whole(QKVO), 262_000, ABBREV,
                  stated=True),
         _reading("r=16 on q,v", whole(QV), 262_000, ABBREV),
         _reading("one 8192×8192 matrix, r=16", lambda: memory.lora_linear_parameters(8192, 8192, 16),
                  262_000, ABBREV)]
    return r, ("262K is one 8192×8192 matrix's A and B; a 70B model's adapter has one pair per adapted "
               f"matrix per layer: {r[1].shown} (q,v) or {r[0].shown} (q,k,v,o). Once multiplied out, each "
               f"ΔW is a dense d×k matrix ({memory.linear_weight_parameters(8192, 8192) / 1e6:.0f}M "
               "entries) of rank ≤ r.")


@_claim("merge-order", S_MERGE, "merge = add BA to W₀, 'then scaling by α/r'", "same as W₀ + BA·α/r",
        Tol(abs=1e-12, why="±1e-12 (float64 rounding)"))
def _check_merge_order():
    def diff():
        t = _a_at_b()
        then_scaled = (t["W0"].value + t["BA"].value) * t["scaling"].value
        return float(np.abs(then_scaled - t["W_merged"].value).max())
    r = [_reading("max |(W₀ + BA)·α/r − (W₀ + BA·α/r)|, worked example", diff, 0.0, Tol(abs=1e-12),
                  stated=True)]
    return r, (f"Order matters: scaling after the addition also multiplies W₀ by α/r (max difference "
               f"{r[0].shown} on the worked example). The merge formula scales BA first: W = W₀ + BA·α/r.")


@_claim("alpha-double", S_HYPER, "double r and α to keep the same scale", "ratio 1")
def _check_alpha_double():
    r = [_reading("α/r: scaling(32, 16) / scaling(16, 8)",
                  lambda: merge.scaling(32, 16) / merge.scaling(16, 8), 1.0, Tol(abs=1e-12), stated=True),
         _reading("rsLoRA α/√r: the same ratio",
                  lambda: merge.scaling(32, 16, use_rslora=True) / merge.scaling(16, 8, use_rslora=True),
                  1.0, Tol(abs=1e-12))]
    return r, (f"True for the α/r scaling the article uses; with rsLoRA (use_rslora=True) doubling both "
               f"multiplies the scale by √2 ({r[1].shown}).")


@_claim("legal-7b-a100", "Practical Uses", "7B, LoRA r=8, 'single A100'", "yes")
def _check_legal_7b_a100():
    r = [_reading("Llama-7B, LoRA r=8 on q,v, 16-bit base, A100 40GB",
                  lambda: memory.fits_on(_lora("llama-7b", r=8).total, 40), True, EXACT, stated=True),
         _reading("same, A100 80GB", lambda: memory.fits_on(_lora("llama-7b", r=8).total, 80), True, EXACT)]
    return r, f"{_gb(_lora('llama-7b', r=8).total)} before activations: fits either A100."


@_claim("qr-full-16", S_QUICK, "full fine-tune: '~16 bytes per param'", "16", APPROX)
def _check_qr_full_16():
    def per(**kw):
        return lambda: memory.bytes_per_parameter("full", **kw)["trainable"].total
    r = [_reading("mixed precision: 2 weight + 2 grad + 4 fp32 master + 8 AdamW", per(), 16.0, APPROX,
                  stated=True),
         _reading("pure fp32: 4 + 4 + 8", per(weight_bytes=4), 16.0, APPROX),
         _reading("16-bit weights and grads, fp32 AdamW, no master copy", per(master_weights=False), 16.0,
                  APPROX)]
    return r, ("16 bytes holds for AdamW with fp32 state, in mixed precision or pure fp32; without a master "
               f"copy it is {r[2].shown} (the QLoRA paper's accounting). Activations come on top.")


@_claim("qr-lora-trainable", S_QUICK, "LoRA: '~2 bytes per trainable param'", "2", APPROX)
def _check_qr_lora_trainable():
    r = [_reading("training: weight + grad + AdamW state (+ master)",
                  lambda: memory.bytes_per_parameter("lora")["trainable"].total, 2.0, APPROX, stated=True),
         _reading("the adapter weight alone, 16-bit",
                  lambda: memory.bytes_per_parameter("lora")["trainable"].weights, 2.0, APPROX)]
    lo = memory.lora_parameters(LLAMA3_70B, 16, QV) / memory.count_parameters(LLAMA3_70B)["total"]
    hi = memory.lora_parameters("llama-7b", 16, "all-linear") / memory.count_parameters("llama-7b")["total"]
    return r, (f"A trainable parameter costs the same {r[0].shown} bytes as in full fine-tuning (weight, "
               "gradient, AdamW m and v, master copy); 2 bytes is only its weight. It matters little in "
               f"total because adapters are {100 * lo:.2g}–{100 * hi:.2g}% of the parameters at r=16.")


@_claim("qr-lora-frozen", S_QUICK, "LoRA: '2 bytes per frozen param'", "2", APPROX)
def _check_qr_lora_frozen():
    r = [_reading("16-bit frozen weight, no gradient or state",
                  lambda: memory.bytes_per_parameter("lora")["frozen"].total, 2.0, APPROX, stated=True)]
    return r, "A frozen 16-bit weight needs no gradient and no optimizer state: 2 bytes."


@_claim("qr-qlora-frozen", S_QUICK, "QLoRA: '~0.5 bytes per frozen param (4-bit)'", "0.5", APPROX)
def _check_qr_qlora_frozen():
    def per(**kw):
        return lambda: memory.bytes_per_parameter("qlora", **kw)["frozen"].total

    def measured():
        w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
        return quant.quantize_nf4(w, blocksize=64, double_quant=True).nbytes / w.size
    show = lambda v: f"{v:.4g}"  # noqa: E731
    r = [_reading("NF4, blocksize 64, double quantization", per(), 0.5, APPROX, show=show),
         _reading("NF4, blocksize 64, no double quantization", per(double_quant=False), 0.5, APPROX,
                  show=show),
         _reading("4-bit codes only", per(include_quant_constants=False), 0.5, APPROX, show=show),
         _reading("measured: quantize_nf4(256×1024, double_quant=True).nbytes / n", measured, 0.5, APPROX,
                  show=show)]
    return r, (f"The 4-bit code is 0.5 bytes; each block of 64 also stores its absmax: {r[1].shown} bytes "
               f"without double quantization, {r[0].shown} with it (QLoRA's default); measured storage of "
               f"a real NF4 tensor: {r[3].shown}.")


@_claim("qr-qlora-trainable", S_QUICK, "QLoRA: '2 bytes per LoRA param'", "2", APPROX)
def _check_qr_qlora_trainable():
    r = [_reading("training: weight + grad + AdamW state (+ master)",
                  lambda: memory.bytes_per_parameter("qlora")["trainable"].total, 2.0, APPROX, stated=True),
         _reading("the adapter weight alone, 16-bit",
                  lambda: memory.bytes_per_parameter("qlora")["trainable"].weights, 2.0, APPROX)]
    return r, (f"As for LoRA: {r[0].shown} bytes per trainable parameter while training (QLoRA's paged "
               "AdamW still keeps 8 bytes of state per parameter, only paged to CPU under pressure).")


# ---------------------------------------------------------------- what this module expects
# verdict and which readings agree ('+') or not ('-'), per claim, in order. A change in minilora's
# formulas that moves a claim across its tolerance shows up as drift in ``run_checks``.
EXPECTED = {
    "ex-h-base": ("wrong", "--"),
    "ex-ba-shape": ("inconsistent", "-+"),
    "ex-scaling": ("holds", "+"),
    "ex-bax": ("wrong", "---"),
    "ex-scaled": ("wrong", "---"),
    "ex-h": ("wrong", "---"),
    "ex-additions": ("holds", "+"),
    "ex-b-zero": ("inconsistent", "-+"),
    "ex-67m": ("inconsistent", "-+"),
    "formula-merge-equals-forward": ("holds", "+"),
    "rd-w0-params": ("holds", "+"),
    "rd-ab-params": ("holds", "+"),
    "rd-total": ("holds", "+"),
    "rd-ratio": ("holds", "+"),
    "rd-shapes": ("inconsistent", "-+"),
    "pct-0.1": ("depends on an assumption", "+---"),
    "pc-per-module": ("depends on an assumption", "+--"),
    "pc-per-head": ("inconsistent", "-+"),
    "pc-total": ("depends on an assumption", "+--"),
    "mem-70b-params": ("holds", "++"),
    "mem-14-a100": ("inconsistent", "-++"),
    "mem-16bit": ("holds", "++"),
    "mem-lora-total": ("holds", "+++"),
    "mem-lora-gpus": ("wrong", "---"),
    "mem-qlora-base": ("depends on an assumption", "--++"),
    "mem-qlora-total": ("holds", "++++"),
    "mem-qlora-a100": ("holds", "++"),
    "mem-70b-48gb": ("inconsistent", "-+"),
    "lora-consumer-gpus": ("depends on an assumption", "+--+"),
    "qlora-65b-48gb": ("holds", "+++"),
    "adapter-100mb": ("depends on an assumption", "---+++--"),
    "merge-262k": ("inconsistent", "--+"),
    "merge-order": ("wrong", "-"),
    "alpha-double": ("depends on an assumption", "+-"),
    "legal-7b-a100": ("holds", "++"),
    "qr-full-16": ("depends on an assumption", "++-"),
    "qr-lora-trainable": ("inconsistent", "-+"),
    "qr-lora-frozen": ("holds", "+"),
    "qr-qlora-frozen": ("depends on an assumption", "+-++"),
    "qr-qlora-trainable": ("inconsistent", "-+"),
}


# ---------------------------------------------------------------- running the checks
def claim_ids() -> list[str]:
    return [c[0] for c in _CLAIMS]


def check_article() -> list[Claim]:
    """Recompute every claim with minilora's functions; a check that crashes gets the verdict
    "error: ..." (and so shows up as drift)."""
    out = []
    for id, section, claim, article, tol, fn in _CLAIMS:
        try:
            readings, explanation = fn()
            verdict, shown = verdict_of(readings), readings[0].shown
        except Exception as e:  # a broken function elsewhere in minilora: report it, keep checking
            readings, explanation = [], f"the check raised {type(e).__name__}: {e}"
            verdict, shown = f"error: {type(e).__name__}", "—"
        out.append(Claim(id, section, claim, article, shown, verdict, explanation, tol.why, tuple(readings)))
    return out


def run_checks(claims: list[Claim] | None = None) -> list[Drift]:
    """Compare each claim's verdict and agreeing readings with ``EXPECTED``; return the differences."""
    claims = check_article() if claims is None else claims
    drift = []
    seen = set()
    for c in claims:
        seen.add(c.id)
        got = (c.verdict, pattern_of(c.readings))
        want = EXPECTED.get(c.id)
        if want is None:
            drift.append(Drift(c.id, "no entry in EXPECTED", f"{got[0]} {got[1]}"))
        elif tuple(want) != got:
            drift.append(Drift(c.id, f"{want[0]} {want[1]}", f"{got[0]} {got[1]}"))
    for id in EXPECTED:
        if id not in seen:
            drift.append(Drift(id, "a claim", "missing"))
    return drift


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(claims: list[Claim]) -> str:
    """The report: a summary, one table row per claim, then each claim's readings."""
    counts = {v: sum(c.verdict == v for c in claims) for v in VERDICTS}
    lines = [
        "# The LoRA article, checked by minilora",
        "",
        "Generated by `minilora check-article --markdown`; do not edit by hand. Every value in the",
        "minilora column is computed by minilora's own functions (`lora.merge`, `memory`, `quant`); the",
        "article's values are quoted from *What is LoRA?*. Shapes follow PEFT: lora_A is (r, in),",
        "lora_B is (out, r), so ΔW = B @ A · α/r is (out, in). GB = 10^9 bytes, GiB = 2^30 bytes (GPU",
        "cards are sold by GiB). Memory figures count weights, gradients, optimizer state and NF4",
        "constants, not activations.",
        "",
        "Verdicts: **holds** (every reading agrees), **depends on an assumption** (some readings agree),",
        "**wrong** (none agrees), **inconsistent** (the reading the article names disagrees, another",
        "agrees: the number belongs to a different setting).",
        "",
        "Summary: " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS) + f" ({len(claims)} claims).",
        "",
        "| id | claim | article | minilora | verdict | why |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        lines.append("| " + " | ".join(_md_cell(x) for x in (*c.cells, c.explanation)) + " |")
    lines += ["", "## Readings", ""]
    for c in claims:
        lines.append(f"### {c.id} ({c.section})")
        lines.append("")
        lines.append(f"{c.claim}: article {c.article}, tolerance {c.tolerance}; verdict **{c.verdict}**.")
        lines.append("")
        for r in c.readings:
            mark = "agrees" if r.matches else "disagrees"
            stated = " (the article's own reading)" if r.stated else ""
            shown = r.value if isinstance(r.value, str) and r.value.startswith("undefined") else r.shown
            lines.append(f"- {r.label}{stated}: {shown} vs article {_fmt(r.article)}: {mark}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_table(claims: list[Claim]) -> str:
    """The command's table: the same cells as the markdown rows, padded into columns."""
    header = ("id", "claim", "article", "minilora", "verdict")
    rows = [header] + [c.cells for c in claims]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    fmt = lambda r: " | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


# ---------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", nargs="?", const=DEFAULT_MARKDOWN, default=None, metavar="PATH",
                        help=f"also write the full report as markdown (default path: {DEFAULT_MARKDOWN})")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print each claim's explanation and readings under the table")


def run(args) -> int:
    """Print the table; write the markdown if asked; exit 1 when a claim drifts from EXPECTED."""
    claims = check_article()
    print(format_table(claims))
    if getattr(args, "verbose", False):
        print()
        print(to_markdown(claims).split("## Readings", 1)[1].strip())
    counts = {v: sum(c.verdict == v for c in claims) for v in VERDICTS}
    print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" ({len(claims)} claims)")
    if args.markdown:
        from minilora.fileio import write_text_atomic
        write_text_atomic(args.markdown, to_markdown(claims))
        print(f"wrote {args.markdown}")
    drift = run_checks(claims)
    if drift:
        import sys
        sys.stdout.flush()
        print(f"{len(drift)} claim(s) drifted from what minilora.teaching.article expects:", file=sys.stderr)
        for d in drift:
            print(f"  {d}", file=sys.stderr)
        return 1
    return 0
