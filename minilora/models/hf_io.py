"""Hugging Face checkpoint files: ``config.json`` + ``model.safetensors``, read and written.

The layout is transformers' own, so ``LlamaForCausalLM.from_pretrained`` in either library reads what
the other's ``save_pretrained`` wrote:

* ``config.json``: ``LlamaConfig.to_dict()`` (model_type "llama", architectures, the hyperparameters);
* ``model.safetensors``: one tensor per parameter under its dotted name, with metadata
  ``{"format": "pt"}`` (transformers refuses files without it). A tied head (``tie_word_embeddings``)
  is stored once, as ``model.embed_tokens.weight``, as transformers does. Large checkpoints come
  sharded instead: ``model.safetensors.index.json`` maps each tensor name to the shard file that
  holds it (``{"weight_map": {name: "model-00001-of-00002.safetensors", ...}}``); both are read.

safetensors (a JSON header of names, dtypes, shapes and byte offsets, then the raw little-endian
bytes) is read with ``safetensors.numpy``, except bfloat16, which NumPy has no dtype for: those
tensors are read from the header's offsets as uint16 and widened to float32 by a 16-bit left shift
(bfloat16 is the top half of a float32). Everything is converted to float32 on load. Files are
written to a temporary name and renamed, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .. import backend
from ..fileio import save_safetensors_atomic, write_json_atomic
from .config import LlamaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SAFETENSORS_TO_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not describe this model (one line says what and how)."""


def save_pretrained(model, save_directory, dtype=np.float32) -> None:
    """Write ``model`` (a LlamaForCausalLM) as config.json + model.safetensors in float32/float16."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"save dtype must be float32 or float16, got {dtype.name}")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["torch_dtype"] = dtype.name
    tensors = {}
    for name, p in model.named_parameters():  # a tied lm_head shares embed_tokens' Parameter: once
        tensors[name] = np.ascontiguousarray(backend.to_numpy(p.data).astype(dtype))
    write_json_atomic(out / CONFIG_NAME, config)
    save_safetensors_atomic(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})


def read_config(directory) -> LlamaConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}; pass a folder written by "
                                "save_pretrained (config.json + model.safetensors)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from None
    if d.get("model_type") not in (None, "llama"):
        raise CheckpointError(f"{path} describes a {d.get('model_type')!r} model; minilora loads "
                              "Llama checkpoints only (model_type 'llama')")
    try:
        return LlamaConfig.from_dict(d)
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path} is not a usable Llama config ({type(e).__name__}: {e})") from None
    except ValueError as e:   # a refused setting (RoPE type, biases, ...): say which file
        raise CheckpointError(f"{path}: {e}") from None


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file and the byte offset where the data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file; re-save it")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path} has a corrupt safetensors header; re-save it") from None
    return header, 8 + n


def load_safetensors(path) -> dict:
    """name -> float32 NumPy array, for F32, F16, BF16 (and F64) tensors."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; a checkpoint folder needs "
                                f"{WEIGHTS_NAME} beside {CONFIG_NAME}")
    header, start = _safetensors_header(path)
    header.pop("__metadata__", None)
    dtypes = {info["dtype"] for info in header.values()}
    unsupported = dtypes - set(_SAFETENSORS_TO_NUMPY) - {"BF16"}
    if unsupported:
        raise CheckpointError(f"{path} holds tensors of dtype {sorted(unsupported)}; minilora loads "
                              "F32, F16 and BF16 checkpoints")
    if "BF16" not in dtypes:
        return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        lo, hi = info["data_offsets"]
        raw = np.asarray(blob[start + lo:start + hi])
        if info["dtype"] == "BF16":
            bits = raw.view("<u2").astype(np.uint32) << 16     # bf16 = high 16 bits of a float32
            arr = bits.view(np.float32)
        else:
            arr = raw.view(np.dtype(_SAFETENSORS_TO_NUMPY[info["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def load_checkpoint_weights(directory) -> dict:
    """name -> float32 array from ``directory``'s model.safetensors, or from the shards its
    model.safetensors.index.json lists (each shard read once; every listed name must be there)."""
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file() or not (directory / WEIGHTS_INDEX_NAME).is_file():
        return load_safetensors(directory / WEIGHTS_NAME)
    index_path = directory / WEIGHTS_INDEX_NAME
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a safetensors index with a weight_map "
                              f"({type(e).__name__}: {e}); re-save the checkpoint") from None
    weights = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path} names shard {shard!r} outside the folder; shards "
                                  "must be plain file names beside the index")
        weights.update(load_safetensors(directory / shard))
    absent = [name for name in weight_map if name not in weights]
    if absent:
        raise CheckpointError(f"{index_path} lists {absent[:3]} but their shards do not hold them; "
                              "re-save the checkpoint")
    return weights


def load_pretrained(directory) -> tuple[LlamaConfig, dict, Path]:
    """(config, name -> float32 array, the weights file) of a checkpoint folder: config.json, and
    model.safetensors or the shards of model.safetensors.index.json. A tied head is stored under
    ``model.embed_tokens.weight`` only; ``LlamaForCausalLM.from_pretrained`` builds the model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist; pass a folder "
                                "written by save_pretrained")
    config = read_config(directory)
    weights = load_checkpoint_weights(directory)
    source = directory / (WEIGHTS_NAME if (directory / WEIGHTS_NAME).is_file() else WEIGHTS_INDEX_NAME)
    if config.tie_word_embeddings:
        head = weights.pop("lm_head.weight", None)
        if head is not None and "model.embed_tokens.weight" not in weights:
            weights["model.embed_tokens.weight"] = head
    elif "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        raise CheckpointError(f"{source} has no lm_head.weight but config.json says "
                              "tie_word_embeddings=false; fix the config or the checkpoint")
    weights.pop("model.rotary_emb.inv_freq", None)  # a buffer some transformers versions save
    return config, weights, source
