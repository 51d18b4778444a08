"""The figures in the course notebooks' prose, checked against what computes them.

A notebook's prose may quote a number in one of two ways. Either a code cell writes the sentence
from the variables it has just computed (an f-string shown with ``IPython.display.Markdown``), so
the saved notebook cannot disagree with its own run; or the figure is typed in a markdown cell and
a test here compares it with minilora's value, or with the value the notebook printed in its saved
outputs, rounded as the prose rounds it. Each check finds the quoted text first, so rewording a
sentence without updating its test fails too.

Nothing is executed: the markdown comes from the notebooks' percent-format sources (``NN_*.py``)
and the outputs from the saved ``.ipynb`` files (re-execute a notebook after changing it, as
tests/test_notebook_sources.py says).
"""
from __future__ import annotations

import argparse
import inspect
import math
import re
from functools import cache
from pathlib import Path

import nbformat
import numpy as np
import pytest

from minilora import memory, quant, settings
from minilora.commands import demo
from minilora.commands.finetune import DEFAULT_TARGETS, lora_finetune
from minilora.models import PRESETS, load_base_model

from test_gguf import _smollm2  # the GGUF file, or a skip saying how to install it

jupytext = pytest.importorskip(
    "jupytext", reason="jupytext reads the notebook sources: pip install jupytext (in the dev extra)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def path_of(prefix: str, suffix: str) -> Path:
    """The course notebook (or its source) whose name starts with ``prefix``, e.g. "04"."""
    (path,) = NOTEBOOKS.glob(f"{prefix}_*{suffix}")
    return path


@cache
def markdown(prefix: str) -> str:
    """The markdown cells of notebook ``prefix``'s source, joined, with jupytext's ``# `` removed."""
    cells = jupytext.read(path_of(prefix, ".py")).cells
    return "\n\n".join(c.source for c in cells if c.cell_type == "markdown")


def _texts(prefix: str, mime: str) -> list[str]:
    nb = nbformat.read(path_of(prefix, ".ipynb"), as_version=4)
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and mime == "text/plain":
                found.append(out["text"])
            elif mime in out.get("data", {}):
                found.append(out["data"][mime])
    return found


@cache
def printed(prefix: str) -> str:
    """Everything notebook ``prefix`` printed in its saved outputs (streams and plain-text results)."""
    return "\n".join(_texts(prefix, "text/plain"))


@cache
def generated(prefix: str) -> str:
    """The Markdown that notebook ``prefix``'s code cells wrote from their variables (saved outputs)."""
    return "\n".join(_texts(prefix, "text/markdown"))


def quoted(text: str, where: str, fmt: str, value) -> str:
    """``value`` formatted as the prose writes it, asserted to occur in ``text``."""
    figure = fmt.format(value)
    assert figure in " ".join(text.split()), f"{where} should say {figure!r} (computed: {value!r})"
    return figure


@cache
def base_config():
    return load_base_model().config


def demo_defaults() -> argparse.Namespace:
    """`minilora demo`'s arguments when none are given."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args([])


# ------------------------------------------------------------------ prose written by the code
GENERATED = {"04": "What the numbers say", "05": "Does the hypothesis hold here?",
             "07": "What the numbers say"}


@pytest.mark.parametrize("prefix", sorted(GENERATED))
def test_the_summary_is_written_by_the_notebook(prefix):
    """The closing section's figures come from a code cell's output, not from typed markdown."""
    heading = markdown(prefix).split(GENERATED[prefix], 1)
    assert len(heading) == 2, f"notebook {prefix} lost its section {GENERATED[prefix]!r}"
    typed = re.findall(r"\d+\.\d+|\d+%", heading[1])
    assert not typed, (f"notebook {prefix}'s section {GENERATED[prefix]!r} types figures {typed}: "
                       "write them from the variables in a code cell (IPython.display.Markdown)")
    text = generated(prefix)
    assert text.strip(), (f"notebook {prefix} has no generated Markdown in its saved outputs: "
                          f"re-execute it with `jupyter nbconvert --to notebook --execute --inplace`")
    assert "{" not in text.replace("\\{", ""), f"notebook {prefix}'s generated text has an unfilled field"


def _result_row(prefix: str, name: str) -> list[str]:
    """The figures of the line of the saved results table that starts with ``name``."""
    for line in printed(prefix).splitlines():
        if line.split()[:1] == [name] and "%" in line:
            return line.split()[1:4]
    raise AssertionError(f"notebook {prefix} printed no results line for {name!r}")


def test_notebooks_04_and_07_run_the_same_lora():
    """07 says its LoRA run is 04's: the same accuracy, held-out loss and pretraining-text loss."""
    assert _result_row("04", "LoRA") == _result_row("07", "LoRA")
    assert "the LoRA run is notebook 04's" in " ".join(generated("07").split())


def test_trainable_share_of_notebook_04_and_the_demo():
    """04's share of the base model and the trainable% that `minilora demo` prints, both computed."""
    args = demo_defaults()
    assert (args.rank, args.alpha, tuple(args.targets.split(","))) == (8, 16, tuple(DEFAULT_TARGETS)), \
        "notebook 04's adapter is the demo's: update the notebook with the demo's defaults"
    n_lora = memory.lora_parameters(base_config(), 8, DEFAULT_TARGETS)
    n_base = memory.count_parameters(base_config())["total"]
    text = generated("04")
    quoted(text, "notebook 04", "LoRA trains {:,} numbers", n_lora)
    quoted(text, "notebook 04", "{:.2%} of the base model's", n_lora / n_base)
    peft_share = quoted(text, "notebook 04", "prints above, {:.4f}", 100 * n_lora / (n_base + n_lora))
    assert f"trainable%: {peft_share.split(', ')[1]}" in printed("04")


# ------------------------------------------------------------------ typed figures, library values
def test_notebook_00_memory_of_llama3_70b():
    text = markdown("00")
    full = memory.memory_breakdown("llama3-70b", "full")
    lora = memory.memory_breakdown("llama3-70b", "lora", r=16, target_modules=("q_proj", "k_proj",
                                                                                "v_proj", "o_proj"))
    qlora = memory.memory_breakdown("llama3-70b", "qlora", r=16,
                                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    quoted(text, "notebook 00", "about {:.2f} TB", full.total / 1e12)
    quoted(text, "notebook 00", "or {} A100-80GB cards", memory.gpus_needed(full.total, 80))
    quoted(text, "notebook 00", "({} cards)", memory.gpus_needed(full.weights + full.gradients, 80))
    quoted(text, "notebook 00", "LoRA** trains {:.1f}M parameters", lora.trainable_params / 1e6)
    quoted(text, "notebook 00", "({:.2%})", lora.trainable_params / lora.total_params)
    quoted(text, "notebook 00", "fits on **{}** A100-80GB cards", memory.gpus_needed(lora.total, 80))
    quoted(text, "notebook 00", "the stored base is {:.1f} GB", qlora.gb("base"))
    quoted(text, "notebook 00", "the total ~{:.1f} GB", qlora.gb())
    quoted(text, "notebook 00", "holds 80 GiB = {:.1f} GB", 80 * memory.GiB / memory.GB)


def test_notebook_00_and_01_small_figures():
    quoted(markdown("00"), "notebook 00", "{:.0f}M is the 8192×8192 layer",
           memory.linear_weight_parameters(8192, 8192) / 1e6)
    source = path_of("01", ".py").read_text(encoding="utf-8")
    points = int(re.search(r"np\.linspace\(-6, 6, (\d+)\)", source)[1])
    quoted(markdown("01"), "notebook 01", "through {} points at once", points)
    slope, intercept = re.search(r"y_data = (\d+) \* x_data - (\d+) \+", source).groups()
    quoted(markdown("01"), "notebook 01", "from $y = {0[0]}x - {0[1]}$", (slope, intercept))


def test_notebook_00_redone_example_is_what_it_printed():
    quoted_h = re.search(r"redone, \$h\$ = `\[([^\]]*)\]`", markdown("00"))
    assert quoted_h, "notebook 00 should quote the redone h"
    printed_h = re.search(r"trained: h = \[([^\]]*)\]", printed("00"))
    assert printed_h, "notebook 00's saved outputs should print the redone h"
    assert ([float(v) for v in quoted_h.group(1).split(",")]
            == [float(v) for v in printed_h.group(1).split()])


def _shares(config) -> dict:
    c, n = memory.count_parameters(config), config.num_hidden_layers
    return {"mlp": n * c["layer"]["mlp"] / c["total"], "attention": n * c["layer"]["self_attn"] / c["total"],
            "embeddings": (c["embed_tokens"] + c["lm_head"]) / c["total"]}


def test_notebook_02_parameter_shares():
    text = markdown("02")
    tiny, big = _shares(base_config()), _shares(PRESETS["llama-7b"])
    quoted(text, "notebook 02", "({:.0%} here, ", tiny["mlp"])
    quoted(text, "notebook 02", "here, {:.0%} in", big["mlp"])
    quoted(text, "notebook 02", "({:.0%}, ", tiny["attention"])
    quoted(text, "notebook 02", ", {:.0%}): the same", big["attention"])
    quoted(text, "notebook 02", "({:.0%} against ", tiny["embeddings"])
    quoted(text, "notebook 02", "against {:.0%}: a", big["embeddings"])
    assert 0.6 < tiny["mlp"] < 0.7 and 0.6 < big["mlp"] < 0.7, "'about two thirds' no longer fits"
    assert 0.28 < tiny["attention"] < 0.38 and 0.28 < big["attention"] < 0.38, "'about a third' no longer fits"


def test_notebook_02_shapes_and_rope():
    text, cfg = markdown("02"), base_config()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    quoted(text, "notebook 02", "{} layers of width", cfg.num_hidden_layers)
    quoted(text, "notebook 02", "V vocabulary ({} = 256 bytes", cfg.vocab_size)
    quoted(text, "notebook 02", "intermediate width $I = {}$", cfg.intermediate_size)
    quoted(text, "notebook 02", "heads of $D = {}$", head_dim)
    slowest = 2 * math.pi * cfg.rope_theta ** ((head_dim - 2) / head_dim)   # positions per turn, last pair
    quoted(text, "notebook 02", "one turn every ~{:,} positions", int(round(slowest, -3)))


def test_notebook_04_and_05_recipe():
    text, cfg = markdown("04"), base_config()
    quoted(text, "notebook 04", "every one of the {:,} parameters", memory.count_parameters(cfg)["total"])
    quoted(text, "notebook 04", "linear warm-up for {} steps",
           inspect.signature(lora_finetune).parameters["warmup"].default)
    demo_lr = demo_defaults().lr
    lrs = re.search(r'LR = \{"LoRA": ([\d.e-]+), "full": ([\d.e-]+)\}', path_of("04", ".py").read_text())
    assert (float(lrs[1]), float(lrs[2])) == pytest.approx((demo_lr, demo_lr / 10), rel=1e-12)
    quoted(text, "notebook 04", "LoRA gets the demo's ${:.0f}\\cdot10^{{-3}}$", demo_lr * 1e3)
    quoted(text, "notebook 04", "ten times less, ${:.0f}\\cdot10^{{-4}}$", demo_lr / 10 * 1e4)
    text5 = markdown("05")
    quoted(text5, "notebook 05", "the {} matrices $W_q, W_v$", 2 * cfg.num_hidden_layers)
    quoted(text5, "notebook 05", "of the {} layers", cfg.num_hidden_layers)
    quoted(text5, "notebook 05", "The hidden size is {}", cfg.hidden_size)
    quoted(text5, "notebook 05", "Llama-7B's {}", PRESETS["llama-7b"].hidden_size)


def test_notebook_03_scaling_claims():
    """Section 5's words against its printed tables: the first update ~1/r, flat, ~r for the three
    scalings (within a factor 2 over ranks 1-64), and rank-64 α/r learning less than rank 2 while
    rsLoRA improves up to the target's rank 8 and then stays within 20% of it."""
    text, source, out = " ".join(markdown("03").split()), path_of("03", ".py").read_text(), printed("03")
    assert "def first_update(r, seed, d=256" in source and "Measured on a 256×256 layer" in text
    assert "steps = 30 if FAST else 100" in source and "100 SGD steps on a 64×64 layer" in text
    assert "def relative_loss(r, steps, d=64" in source and "g.standard_normal((d, 8))" in source
    table = [line.split() for line in out.splitlines()
             if re.fullmatch(r"\s*\d+(\s+[\d.e-]+){3}\s*", line)]
    ranks = np.array([float(row[0]) for row in table])
    sizes = np.array([[float(v) for v in row[1:]] for row in table]).T      # (3 scalings, ranks)
    assert ranks.tolist() == [1, 2, 4, 8, 16, 32, 64]
    for values in (sizes[0] * ranks, sizes[1], sizes[2] / ranks):          # ~1/r, flat, ~r
        assert values.max() / values.min() < 2, values
    learned = {line.split()[0]: {int(k): float(v) for k, v in re.findall(r"r=(\d+): ([\d.]+)", line)}
               for line in out.splitlines() if re.search(r"r=64: [\d.]+$", line)}
    plain, rs = learned["α/r,"], learned["α/√r"]
    assert "a rank-64 adapter learns **less** than a rank-2 one" in text and plain[64] > plain[2]
    assert "until the rank of the target (8) and then levels off" in text
    assert all(rs[a] > rs[b] for a, b in zip([1, 2, 4], [2, 4, 8]))
    assert all(abs(rs[r] / rs[8] - 1) < 0.2 for r in (16, 32, 64))


# (notebook, what its prose says, the line of its code that makes it so)
CODE_CONSTANTS = [
    ("02", "drawn 4000 times", "n_draws = 4000"),
    ("02", "$\\tau = 1.5$ gives the", "temperature=1.5"),
    ("06", "Llama (hidden size 64, 2 layers", "hidden_size=64, intermediate_size=172, num_hidden_layers=2"),
    ("06", "Twenty merge/unmerge cycles", "for cycle in range(1, 21):"),
    ("06", "the two rank-4 adapters, weights 0.7 and 0.3", "weights = [0.7, 0.3]"),
    ("06", "two rank-4 updates has rank 8", "LoraConfig(r=4,"),
    ("10", "A 6 → 4 layer with a rank-2 adapter", "toy_lora(6, 4, R, ALPHA, init_lora_weights=False)"),
    ("10", "with a rank-2 adapter", "R, ALPHA = 2, 4"),
    ("10", "(the paper suggests $\\lambda = 2^4$)", "LORAPLUS_RATIO = 16"),
]


@pytest.mark.parametrize("prefix, prose, code", CODE_CONSTANTS, ids=lambda v: str(v)[:24])
def test_prose_states_the_codes_constants(prefix, prose, code):
    assert prose in " ".join(markdown(prefix).split()), f"notebook {prefix} should say {prose!r}"
    assert code in path_of(prefix, ".py").read_text(encoding="utf-8"), (
        f"notebook {prefix}'s code no longer has {code!r}: make its prose ({prose!r}) say what the code does")


def test_notebook_06_float_rounding():
    text = markdown("06")
    quoted(text, "notebook 06", r"$2^{{-24}} \approx {:.0f}\cdot10^{{-8}}$", np.finfo(np.float32).eps / 2 * 1e8)
    quoted(text, "notebook 06", r"$2^{{-11}} \approx {:.0f}\cdot10^{{-4}}$", np.finfo(np.float16).eps / 2 * 1e4)


def _merge_table() -> list[tuple[float, float, float, float]]:
    """Notebook 06's printed rows: |ΔW|/|W0|, float32 error, float16 error, float16 share lost."""
    rows = []
    for line in printed("06").splitlines():
        m = re.match(r"\s*([\d.e+-]+) \|\s+([\d.e+-]+)\s+\d+% \|\s+([\d.e+-]+)\s+(\d+)%$", line)
        if m:
            rows.append((float(m[1]), float(m[2]), float(m[3]), int(m[4]) / 100))
    assert len(rows) >= 5, "notebook 06 should print its float32 / float16 merging table"
    return rows


def test_notebook_06_merging_error_figures():
    """"~1% ... when ΔW is 2% of W0, ~5% at 0.5%, most entries lost at 1e-4": read off its table."""
    text, rows = markdown("06"), _merge_table()
    for words in ("below 1% over the", "~1% of the adapter's contribution when $\\Delta W$ is 2%",
                  "~5% at 0.5%", "$10^{-4}$ of $W_0$ most of its entries round away"):
        assert words in " ".join(text.split()), f"notebook 06 should say {words!r}"
    nearest = lambda q: min(rows, key=lambda r: abs(math.log(r[0] / q)))   # noqa: E731
    assert max(r[1] for r in rows) < 0.01
    assert 0.005 <= nearest(0.02)[2] < 0.02
    assert 0.03 <= nearest(0.005)[2] < 0.07
    assert nearest(1e-4)[3] > 0.5


def test_notebook_07_code_book_and_bits():
    text = markdown("07")
    p_max = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    quoted(text, "notebook 07", "= {:.7f}$", p_max)
    quoted(text, "notebook 07", "$4 + 32/64 = {:g}$ bits", quant.nf4_bits_per_parameter(64, double_quant=False))
    extra = quant.nf4_bits_per_parameter(64, double_quant=True) - 4
    quoted(text, "notebook 07", "= {:.3f}$ bits instead of", extra)
    quoted(text, "notebook 07", "so **{:.3f}** bits", 4 + extra)
    quoted(text, "notebook 07", "4-bit codes ({:.3f} with their constants)",
           memory.bytes_per_parameter("qlora")["frozen"].total)
    quoted(text, "notebook 07", "an fp32 master copy, {:g} bytes", memory.bytes_per_parameter("lora")["trainable"].total)
    quoted(text, "notebook 07", "holds {:.1f} GB", 80 * memory.GiB / memory.GB)
    quoted(text, "notebook 07", "{:.2f}B parameters", memory.count_parameters("llama3-70b")["total"] / 1e9)
    nf4_test = (ROOT / "tests" / "test_nf4.py").read_text(encoding="utf-8")
    version = re.search(r"bitsandbytes (\d+\.\d+\.\d+)", text)[1]
    assert f"bitsandbytes {version}" in nf4_test, "notebook 07 names another bitsandbytes than test_nf4.py"


def test_notebook_07_shows_the_articles_70b():
    """The memory table and chart use Llama 3 70B, the model the text (and the article) means."""
    source = path_of("07", ".py").read_text(encoding="utf-8")
    assert '"70B": "llama3-70b"' in source and '"llama-70b"' not in source
    assert "Llama 3 70B" in markdown("07")
    n = memory.count_parameters("llama3-70b")["total"]
    assert f"{n:,}" in printed("07"), "notebook 07's memory table should list Llama 3 70B's parameters"


def test_notebook_07_index_entropy_is_the_one_docs_quote():
    """docs/math.md's "about 3.88 bits" is what notebook 07 measured (printed to 3 decimals)."""
    measured = float(re.search(r"'NF4': ([\d.]+)", printed("07"))[1])
    assert f"{measured:.3f} bits of entropy" in generated("07")
    math_md = " ".join((ROOT / "docs" / "math.md").read_text(encoding="utf-8").split())
    docs = float(re.search(r"they carry about ([\d.]+) bits of entropy", math_md)[1])
    assert abs(measured - docs) <= 0.005 + 0.0005, (docs, measured)      # both roundings


def test_notebook_08_micro_batch_threshold():
    quoted(markdown("08"), "notebook 08", "tokens ({})", settings.MIN_TOKENS_PER_MICRO_BATCH)


def test_notebook_08_medium_config_is_the_benchmarks():
    source = (ROOT / "benchmarks" / "gpu.py").read_text(encoding="utf-8")
    medium = dict(re.findall(r"(\w+)=(\d+)", re.search(r"medium=dict\(([^)]*)\)", source)[1]))
    text = markdown("08")
    quoted(text, "notebook 08", "hidden size {}, ", medium["hidden_size"])
    quoted(text, "notebook 08", "{0[batch]} × {0[seq]} tokens per batch", medium)


def test_notebook_08_nf4_kernel_traffic():
    """One read of the packed byte half, the float32 absmax shared by 64 values, one float32 write."""
    quoted(markdown("08"), "notebook 08", r"\tfrac{{4}}{{64}} + 4 \approx {:.1f}$ bytes per value",
           0.5 + 4 / 64 + 4)


def test_notebook_09_q4_1_block():
    from minilora.gguf import GGML_TYPES
    (per_block, nbytes), = [(n, b) for name, n, b in GGML_TYPES.values() if name == "Q4_1"]
    text = markdown("09")
    quoted(text, "notebook 09", "blocks of {} weights", per_block)
    quoted(text, "notebook 09", "{0[0]} bytes per {0[1]} weights, {0[2]:g} bits per weight",
           (nbytes, per_block, 8 * nbytes / per_block))


def test_notebook_09_base_size():
    quoted(markdown("09"), "notebook 09", "own {:.0f}k-parameter model",
           memory.count_parameters(base_config())["total"] / 1e3)
    quoted(markdown("09"), "notebook 09", "placed at normal quantiles: {:g} bits",
           quant.nf4_bits_per_parameter(64, double_quant=False))


def test_notebook_09_and_readme_smollm2_figures():
    """The merge rules and matrix shapes of notebook 09, and the file size in README.md, from the file."""
    from minilora.gguf import GGUFFile
    path = _smollm2()
    meta = GGUFFile(path).metadata
    width = meta["llama.embedding_length"]
    kv = width // meta["llama.attention.head_count"] * meta["llama.attention.head_count_kv"]
    text = markdown("09")
    quoted(text, "notebook 09", "the file's {:,} merge rules", len(meta["tokenizer.ggml.merges"]))
    quoted(text, "notebook 09", "a {0} × {0} (or", width)
    quoted(text, "notebook 09", "(or {} × ", kv)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quoted(readme, "README.md", "ships ({:.0f} MB;", path.stat().st_size / 1e6)
