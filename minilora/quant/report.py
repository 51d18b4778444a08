"""Quantize a whole checkpoint to NF4 and report what it costs: ``minilora quantize``.

QLoRA keeps every large frozen matrix in 4-bit NormalFloat and everything small (embeddings'
neighbours: norms, biases) in full precision. This module applies that rule to a ``model.safetensors``
state dict, and tabulates per tensor the bytes before and after, the bits stored per parameter and
the error of the round trip (mean absolute, max absolute, RMSE), then the totals:

    minilora quantize CHECKPOINT_DIR [--blocksize 64] [--double-quant] [--out DIR]

With ``--out`` the quantized arrays (packed indices, absmax or the double-quantized constants) are
written to ``DIR/model.nf4.safetensors`` atomically, with the shapes and settings in its metadata;
``load_quantized`` reads it back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import backend
from .nf4 import NF4Tensor, QuantizedTensor4bit, quantization_error, quantize_nf4

__all__ = ["SKIP_SUBSTRINGS", "QUANTIZED_FILE", "should_quantize", "quantize_state_dict",
           "TensorReport", "QuantizationReport", "quantization_report", "save_quantized",
           "load_quantized", "add_arguments", "run"]

# Tensors whose names contain these stay in full precision: embeddings are lookups (only a few rows
# are read per token, so dequantizing the whole table buys nothing) and norms are tiny vectors.
SKIP_SUBSTRINGS = ("embed", "norm")
QUANTIZED_FILE = "model.nf4.safetensors"
_FORMAT = "minilora-nf4/1"


def should_quantize(name: str, array) -> bool:
    """QLoRA's rule here: every 2-D floating-point weight except embeddings and norms."""
    lowered = name.lower()
    return (array.ndim == 2 and np.issubdtype(array.dtype, np.floating)
            and not any(s in lowered for s in SKIP_SUBSTRINGS))


def quantize_state_dict(sd: dict, blocksize: int = 64, double_quant: bool = False) -> dict:
    """``{name: NF4Tensor}`` for the weights ``should_quantize`` picks, the other arrays unchanged."""
    return {name: quantize_nf4(a, blocksize, double_quant) if should_quantize(name, a) else a
            for name, a in sd.items()}


@dataclass
class TensorReport:
    """One row of the report: a tensor's storage before and after, and its round-trip error."""
    name: str
    shape: tuple
    quantized: bool
    bytes_before: int
    bytes_after: int
    mean_abs_error: float = 0.0
    max_abs_error: float = 0.0
    rmse: float = 0.0

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.bytes_after / max(self.size, 1)


@dataclass
class QuantizationReport:
    """Per-tensor rows and the totals of quantizing a state dict."""
    rows: list = field(default_factory=list)
    blocksize: int = 64
    double_quant: bool = False

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def quantized_totals(self) -> dict:
        """Totals over the quantized tensors only, errors pooled over all their values."""
        rows = [r for r in self.rows if r.quantized]
        n = sum(r.size for r in rows)
        if n == 0:
            return {"parameters": 0, "bytes_before": 0, "bytes_after": 0, "bits_per_parameter": 0.0,
                    "mean_abs_error": 0.0, "max_abs_error": 0.0, "rmse": 0.0}
        after = sum(r.bytes_after for r in rows)
        return {
            "parameters": n,
            "bytes_before": sum(r.bytes_before for r in rows),
            "bytes_after": after,
            "bits_per_parameter": 8 * after / n,
            "mean_abs_error": sum(r.mean_abs_error * r.size for r in rows) / n,
            "max_abs_error": max(r.max_abs_error for r in rows),
            "rmse": float(np.sqrt(sum(r.rmse ** 2 * r.size for r in rows) / n)),
        }

    def format_table(self) -> str:
        """The report as a fixed-width text table with a totals line."""
        head = (f"{'tensor':<44} {'shape':>13} {'before':>10} {'after':>10} {'bits/param':>10} "
                f"{'mean|err|':>10} {'max|err|':>10} {'RMSE':>10}")
        lines = [f"NF4, blocksize {self.blocksize}"
                 f"{', double quantization' if self.double_quant else ''}", head, "-" * len(head)]
        for r in self.rows:
            shape = "x".join(str(d) for d in r.shape) or "scalar"
            errors = (f"{r.mean_abs_error:>10.6f} {r.max_abs_error:>10.6f} {r.rmse:>10.6f}"
                      if r.quantized else f"{'(kept)':>10} {'':>10} {'':>10}")
            lines.append(f"{r.name:<44} {shape:>13} {_human(r.bytes_before):>10} "
                         f"{_human(r.bytes_after):>10} {r.bits_per_parameter:>10.4f} {errors}")
        lines.append("-" * len(head))
        t = self.quantized_totals()
        ratio = self.bytes_before / max(self.bytes_after, 1)
        lines.append(f"{'total':<44} {'':>13} {_human(self.bytes_before):>10} "
                     f"{_human(self.bytes_after):>10} {'':>10} ({ratio:.2f}x smaller)")
        lines.append(f"{'quantized weights':<44} {t['parameters']:>13,} {_human(t['bytes_before']):>10} "
                     f"{_human(t['bytes_after']):>10} {t['bits_per_parameter']:>10.4f} "
                     f"{t['mean_abs_error']:>10.6f} {t['max_abs_error']:>10.6f} {t['rmse']:>10.6f}")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def quantization_report(sd: dict, quantized: dict | None = None, blocksize: int = 64,
                        double_quant: bool = False) -> QuantizationReport:
    """Sizes and errors of quantizing ``sd`` (quantized here unless ``quantized`` is given)."""
    if quantized is None:
        quantized = quantize_state_dict(sd, blocksize, double_quant)
    report = QuantizationReport(blocksize=blocksize, double_quant=double_quant)
    for name, original in sd.items():
        q = quantized.get(name, original)
        if isinstance(q, QuantizedTensor4bit):
            err = quantization_error(original, q.dequantize())
            report.rows.append(TensorReport(name, tuple(original.shape), True, int(original.nbytes),
                                            q.nbytes, err["mean_abs_error"], err["max_abs_error"],
                                            err["rmse"]))
        else:
            report.rows.append(TensorReport(name, tuple(original.shape), False,
                                            int(original.nbytes), int(original.nbytes)))
    return report


# ---------------------------------------------------------------- files
def save_quantized(quantized: dict, out_dir) -> Path:
    """Write ``quantize_state_dict``'s result to ``out_dir/model.nf4.safetensors`` atomically.

    A quantized tensor ``name`` becomes ``name.packed`` plus ``name.absmax`` (or ``name.absmax_q``,
    ``name.nested_absmax``, ``name.offset`` with double quantization); kept arrays keep their name.
    The metadata records each quantized tensor's shape, blocksize and type.
    """
    from ..fileio import save_safetensors_atomic
    tensors, layout = {}, {}
    for name, value in quantized.items():
        if isinstance(value, QuantizedTensor4bit):
            for part, array in value.stored_arrays().items():
                tensors[f"{name}.{part}"] = array
            layout[name] = {"shape": list(value.shape), "blocksize": value.blocksize,
                            "quant_type": value.quant_type, "double_quant": value.double_quant}
        else:
            tensors[name] = value
    collisions = set(layout) & set(tensors)
    if collisions:
        raise ValueError(f"tensor names {sorted(collisions)} clash with quantized parts; rename them")
    path = Path(out_dir) / QUANTIZED_FILE
    save_safetensors_atomic(tensors, path, metadata={"format": _FORMAT,
                                                     "quantized": json.dumps(layout)})
    return path


def load_quantized(path) -> dict:
    """Read ``save_quantized``'s file back: ``{name: QuantizedTensor4bit or numpy array}``."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    path = Path(path)
    if path.is_dir():
        path = path / QUANTIZED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with `minilora quantize DIR --out`")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a minilora NF4 file (format {meta.get('format')!r}); "
                         "write it with `minilora quantize DIR --out`")
    layout = json.loads(meta["quantized"])
    arrays = load_file(str(path))
    out = {}
    for name, info in layout.items():
        prefix = f"{name}."
        parts = {k[len(prefix):]: arrays.pop(k) for k in list(arrays) if k.startswith(prefix)}
        cls = NF4Tensor if info["quant_type"] == "nf4" else QuantizedTensor4bit
        out[name] = cls.from_arrays(parts, info["shape"], info["blocksize"], info["quant_type"])
    out.update(arrays)
    return out


# ---------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    parser.add_argument("checkpoint_dir", help="folder holding model.safetensors")
    parser.add_argument("--blocksize", type=int, default=64,
                        help="values per absmax block: a power of two from 32 to 4096")
    parser.add_argument("--double-quant", action="store_true",
                        help="also quantize the absmax constants to 8 bits (QLoRA)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"write the quantized tensors to DIR/{QUANTIZED_FILE}")


def run(args) -> int:
    from safetensors.numpy import load_file
    folder = Path(args.checkpoint_dir)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a checkpoint folder that holds "
                                "model.safetensors (e.g. one written by save_pretrained)")
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {e}); "
                         "re-save the checkpoint with save_pretrained") from e
    sd = {k: backend.to_numpy(v) for k, v in sd.items()}
    quantized = quantize_state_dict(sd, args.blocksize, args.double_quant)
    report = quantization_report(sd, quantized, args.blocksize, args.double_quant)
    print(report.format_table())
    if args.out:
        written = save_quantized(quantized, args.out)
        print(f"wrote {written}")
    return 0
