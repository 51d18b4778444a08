"""Hugging Face checkpoint files: ``config.json`` + ``model.safetensors``, read and written.

The layout is transformers' own, so ``LlamaForCausalLM.from_pretrained`` in either library reads what
the other's ``save_pretrained`` wrote:

* ``config.json``: ``LlamaConfig.to_dict()`` (model_type "llama", architectures, the hyperparameters);
* ``model.safetensors``: one tensor per parameter under its dotted name, with metadata
  ``{"format": "pt"}`` (transformers refuses files without it). A tied head (``tie_word_embeddings``)
  is stored once, as ``model.embed_tokens.weight``, as transformers does. Large checkpoints come
  sharded instead: ``model.safetensors.index.json`` maps each tensor name to the shard file that
  holds it (``{"weight_map": {name: "model-00001-of-00002.safetensors", ...}}``); both are read.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
``data_offsets`` [begin, end) relative to the data section), then the raw little-endian bytes. The
reader here checks what safetensors itself checks before trusting a byte: the header fits in the
file, each entry has a known dtype, a shape of non-negative integers and offsets whose length is
shape x dtype size, and the tensors tile the data section exactly (in range, contiguous, no overlap,
nothing after the last). Then every dtype goes through one path, a view of the memory-mapped bytes:
F32/F16/F64 as NumPy's little-endian types, BF16 (no NumPy dtype) as uint16 widened to float32 by a
16-bit left shift (bfloat16 is the top half of a float32). Everything is converted to float32.

Loading is checked in this order, so a damaged or lying checkpoint costs nothing to refuse:
config.json (types and ranges, ``LlamaConfig``), the headers of the weight files against the shapes
the config implies (``parameter_shapes``: names, shapes, a tied or untied head), and only then the
weights are read, each refused when it holds NaN or infinity (``allow_nonfinite=True`` loads them,
for forensics). Every problem is a one-line ``CheckpointError`` naming the file, the field or tensor,
and what was expected. The folder is read with ``fileio.read_consistently`` and written with
``fileio.atomic_folder``: a reader never gets the config of one save with the weights of another.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from .. import backend
from ..fileio import (atomic_folder, read_consistently, recover, save_safetensors_atomic,
                      write_json_atomic)
from .config import LlamaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# what a model save writes or replaces; other files in the folder (a tokenizer, notes) are kept
SAVE_OWNS = (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors")
_SAFETENSORS_TO_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_ITEMSIZE = {"F32": 4, "F16": 2, "F64": 8, "BF16": 2}
# safetensors refuses headers above 100 MB; a config.json is a few KB: anything larger is damage
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_BYTES = 16_000_000


class CheckpointError(ValueError):
    """A checkpoint whose files do not describe a loadable model (one line says which file, what
    is wrong and what was expected)."""


def save_pretrained(model, save_directory, dtype=np.float32) -> None:
    """Write ``model`` (a LlamaForCausalLM) as config.json + model.safetensors in float32/float16,
    replacing the folder as a whole (``fileio.atomic_folder``)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"save dtype must be float32 or float16, got {dtype.name}")
    config = model.config.to_dict()
    config["torch_dtype"] = dtype.name
    tensors = {}
    for name, p in model.named_parameters():  # a tied lm_head shares embed_tokens' Parameter: once
        tensors[name] = np.ascontiguousarray(backend.to_numpy(p.data).astype(dtype))
    with atomic_folder(save_directory, owned=SAVE_OWNS) as tmp:
        write_json_atomic(tmp / CONFIG_NAME, config)
        save_safetensors_atomic(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})


def read_json(path: Path, error=CheckpointError):
    """The JSON value in ``path``; a file too large, not UTF-8 or not JSON raises ``error``."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path} is {size} bytes; expected a JSON file of a few KB (at most "
                        f"{MAX_JSON_BYTES}): the file is damaged, re-save it")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        if isinstance(e, error):
            raise
        raise error(f"{path} is not valid JSON ({type(e).__name__}: {_one_line(e)}); re-save "
                    "it") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def read_config(directory) -> LlamaConfig:
    """The checked LlamaConfig of a checkpoint folder's config.json (``CheckpointError`` naming the
    file and the field when a value has the wrong type or range)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}; pass a folder written by "
                                "save_pretrained (config.json + model.safetensors)")
    d = read_json(path)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds a JSON {type(d).__name__}; expected an object of Llama "
                              "hyperparameters")
    if d.get("model_type") not in (None, "llama"):
        raise CheckpointError(f"{path} describes a {d.get('model_type')!r} model; minilora loads "
                              "Llama checkpoints only (model_type 'llama')")
    try:
        return LlamaConfig.from_dict(d)
    except (TypeError, KeyError, ValueError, ArithmeticError, AttributeError) as e:
        # a wrong type deep in a nested field (rope_scaling) or a refused setting: say which file
        raise CheckpointError(f"{path}: {_one_line(e)}") from None


def parameter_shapes(config: LlamaConfig) -> dict:
    """name -> shape of every parameter of ``LlamaForCausalLM(config)``, computed without building
    it (Hugging Face's names; a tied head is ``model.embed_tokens.weight`` alone)."""
    C, V, I = config.hidden_size, config.vocab_size, config.intermediate_size
    D, H, G = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (G * D, C),
            p + "self_attn.v_proj.weight": (G * D, C), p + "self_attn.o_proj.weight": (C, H * D),
            p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C),
            p + "mlp.down_proj.weight": (C, I)})
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def check_shapes(config: LlamaConfig, shapes: dict, source, what: str = "config.json",
                 error=CheckpointError) -> None:
    """Refuse (``error``) a weights file whose tensor names or shapes (``shapes``, from its header)
    are not the ones ``config`` implies, before anything is allocated. A tied head may be stored."""
    have = {k: tuple(v) for k, v in shapes.items() if k != "model.rotary_emb.inv_freq"}
    # the layer count first: a damaged config's 10**9 layers must not be listed one name at a time
    layers = {int(k.split(".")[2]) for k in have
              if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    n_file = max(layers) + 1 if layers else 0
    if n_file != config.num_hidden_layers:
        keys = (f"missing keys model.layers.{n_file}.*" if n_file < config.num_hidden_layers
                else f"unexpected keys model.layers.{config.num_hidden_layers}.*")
        raise error(f"{source} holds {n_file} decoder layers ({keys}); expected num_hidden_layers "
                    f"= {config.num_hidden_layers} from {what}: the config and weights do not "
                    "belong together")
    want = parameter_shapes(config)
    if config.tie_word_embeddings and "lm_head.weight" in have:
        if have["lm_head.weight"] != want["model.embed_tokens.weight"]:
            raise error(f"{source}: lm_head.weight has shape {have['lm_head.weight']}; expected "
                        f"{want['model.embed_tokens.weight']} as {what} ties it to the embeddings")
        if "model.embed_tokens.weight" in have:
            have.pop("lm_head.weight")
    missing = [k for k in want if k not in have and not (
        k == "model.embed_tokens.weight" and config.tie_word_embeddings and "lm_head.weight" in have)]
    if missing:
        hint = (f"; {what} says tie_word_embeddings=false but the file has no lm_head.weight"
                if missing == ["lm_head.weight"] else "")
        raise error(f"{source} lacks tensor {missing[0]!r}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                    f"expected every parameter {what} implies{hint}")
    unexpected = [k for k in have if k not in want and k != "lm_head.weight"]
    if unexpected:
        raise error(f"{source} has tensor {unexpected[0]!r}, which {what} implies no parameter "
                    f"for (num_hidden_layers={config.num_hidden_layers}); the config and weights do "
                    "not belong together")
    for name, shape in want.items():
        got = have.get(name, have.get("lm_head.weight"))
        if got != shape:
            raise error(f"{source}: tensor {name} has shape {got}; expected {shape} from "
                        f"{what}'s sizes")


# ------------------------------------------------------------------ safetensors
def read_safetensors_header(path) -> tuple[dict, int]:
    """({name: {"dtype", "shape", "data_offsets"}}, byte offset where the data starts) of a
    safetensors file, every entry checked as safetensors checks it (see the module docstring)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is {size} bytes; a safetensors file starts with an 8-byte "
                                  "header length: the file is truncated, re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: header length is {n} bytes but the file has {size - 8} "
                                  "after the length field; the file is truncated or damaged, re-save it")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON "
                                  f"({_one_line(e)}); re-save the file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}; "
                              "expected an object of tensor entries")
    start, data_size = 8 + n, size - 8 - n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings; re-save the file")
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where} is not an entry of dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{where} has dtype {dtype!r}; minilora loads F32, F16, BF16 "
                                  "(and F64) checkpoints")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where} has shape {shape!r}; expected a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"{where} has data_offsets {offsets!r}; expected [begin, end] "
                                  f"with 0 <= begin <= end <= {data_size} (the data section)")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where} spans {offsets[1] - offsets[0]} bytes; expected "
                                  f"{nbytes} for shape {shape} of {dtype}")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for lo, hi, name in sorted(spans):
        if lo != position:
            raise CheckpointError(f"{path}: tensor {name!r} begins at byte {lo} of the data; expected "
                                  f"{position} (tensors must tile the data without gaps or overlaps)")
        position = hi
    if position != data_size:
        raise CheckpointError(f"{path}: the tensors end at byte {position} of the data but the data "
                              f"section has {data_size}; the file is damaged, re-save it")
    return header, start


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def load_safetensors(path, allow_nonfinite: bool = False) -> dict:
    """name -> float32 NumPy array, for F32, F16, BF16 (and F64) tensors, after the header checks
    of ``read_safetensors_header``; a tensor holding NaN or infinity is refused by name unless
    ``allow_nonfinite``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; a checkpoint folder needs "
                                f"{WEIGHTS_NAME} beside {CONFIG_NAME}")
    try:
        header, start = read_safetensors_header(path)
        blob = np.memmap(path, dtype=np.uint8, mode="r") if start < path.stat().st_size else \
            np.zeros(0, np.uint8)   # a file of empty tensors cannot be mapped
        out = {}
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            raw = np.asarray(blob[start + lo:start + hi])
            if len(raw) != hi - lo:     # the file shrank after its header was read
                raise CheckpointError(f"{path}: tensor {name!r} is cut short; the file changed or is "
                                      "truncated, re-save it")
            if info["dtype"] == "BF16":
                bits = raw.view("<u2").astype(np.uint32) << 16     # bf16 = high 16 bits of a float32
                arr = bits.view(np.float32)
            else:
                arr = raw.view(np.dtype(_SAFETENSORS_TO_NUMPY[info["dtype"]]).newbyteorder("<"))
            arr = arr.reshape(info["shape"]).astype(np.float32)
            if not allow_nonfinite and not np.isfinite(arr).all():
                raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinity; expected "
                                      "finite weights (pass allow_nonfinite=True to load it anyway)")
            out[name] = arr
        return out
    except CheckpointError:
        raise
    except (OSError, ValueError, MemoryError, OverflowError) as e:   # a read error, a failed map
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {_one_line(e)}); "
                              "re-save or re-copy the file") from None


def _weight_files(directory: Path) -> tuple[list, Path]:
    """([weight files], the file to name in errors): model.safetensors, or the shards that
    model.safetensors.index.json lists (plain names beside the index)."""
    if (directory / WEIGHTS_NAME).is_file() or not (directory / WEIGHTS_INDEX_NAME).is_file():
        return [directory / WEIGHTS_NAME], directory / WEIGHTS_NAME
    index_path = directory / WEIGHTS_INDEX_NAME
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} has no weight_map of tensor name -> shard file name; "
                              "re-save the checkpoint")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path} names shard {shard!r} outside the folder; shards "
                                  "must be plain file names beside the index")
    return [directory / s for s in shards], index_path


def load_checkpoint_weights(directory, config: LlamaConfig | None = None,
                            allow_nonfinite: bool = False) -> dict:
    """name -> float32 array from ``directory``'s model.safetensors, or from the shards its
    model.safetensors.index.json lists (each shard read once; every listed name must be there).
    With ``config``, every header is checked against its shapes before any weight is read."""
    directory = Path(directory)
    files, source = _weight_files(directory)
    for f in files:
        if not f.is_file() and source.name == WEIGHTS_INDEX_NAME:
            raise CheckpointError(f"{source} lists shard {f.name!r}, which is not in the folder; "
                                  "expected every listed shard beside the index: re-save or re-copy")
        if not f.is_file():
            raise FileNotFoundError(f"weights file {str(f)!r} does not exist; a checkpoint folder "
                                    f"needs {WEIGHTS_NAME} (or its shards) beside {CONFIG_NAME}")
    headers = {f: read_safetensors_header(f)[0] for f in files}
    if source.name == WEIGHTS_INDEX_NAME:
        weight_map = read_json(source)["weight_map"]
        for name, shard in weight_map.items():
            if name not in headers[directory / shard]:
                raise CheckpointError(f"{source} lists {[name]} but its shard {shard} does not "
                                      "hold it; re-save the checkpoint")
    if config is not None:
        shapes = {name: info["shape"] for h in headers.values() for name, info in h.items()}
        check_shapes(config, shapes, source)
    weights = {}
    for f in files:
        weights.update(load_safetensors(f, allow_nonfinite=allow_nonfinite))
    return weights


def load_pretrained(directory, allow_nonfinite: bool = False) -> tuple[LlamaConfig, dict, Path]:
    """(config, name -> float32 array, the weights file) of a checkpoint folder: config.json, and
    model.safetensors or the shards of model.safetensors.index.json, all from one save (a
    concurrent save is waited out: ``fileio.read_consistently``). A tied head is returned under
    ``model.embed_tokens.weight`` only; ``LlamaForCausalLM.from_pretrained`` builds the model."""
    directory = Path(directory)
    recover(directory)   # a save interrupted between its two renames (fileio.atomic_folder)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist; pass a folder "
                                "written by save_pretrained")
    return read_consistently(directory, lambda: _load_pretrained(directory, allow_nonfinite))


def _load_pretrained(directory: Path, allow_nonfinite: bool):
    config = read_config(directory)
    weights = load_checkpoint_weights(directory, config, allow_nonfinite=allow_nonfinite)
    _, source = _weight_files(directory)
    if config.tie_word_embeddings:
        head = weights.pop("lm_head.weight", None)
        if head is not None and "model.embed_tokens.weight" not in weights:
            weights["model.embed_tokens.weight"] = head
    weights.pop("model.rotary_emb.inv_freq", None)  # a buffer some transformers versions save
    return config, weights, source


class _ZeroDraws:
    """Stands in for the random generator while a model for a checkpoint is built: every "draw" is
    ``np.zeros`` (no random numbers, untouched pages), since the file's weights replace them all."""

    def standard_normal(self, shape):
        return np.zeros(shape, dtype=backend.default_float())

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size, dtype=backend.default_float())


def no_random_init():
    """A context in which building a model draws no random weights (``backend.use_rng``): used to
    build the model a checkpoint's weights are loaded into (~3.8 s saved on the 135M SmolLM2)."""
    return backend.use_rng(_ZeroDraws())
