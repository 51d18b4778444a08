"""The autograd engine at notebook size: forward + backward of a small transformer graph, minilora
(NumPy) vs the same graph in PyTorch.

The graph is 4 pre-norm blocks written with the generic building blocks a notebook uses (``@``,
reshape/transpose, softmax over masked scores, layer_norm, gelu, residual adds), then a
cross-entropy loss: it measures the engine (graph recording, topological sort, backward closures,
gradient accumulation) more than any fused kernel. At these sizes the Python overhead per op matters
as much as the arithmetic. Both run interleaved in one process, on ``--threads`` threads each.
Target: minilora within 1.5x of torch.

Run:  python benchmarks/bench_autograd.py [--steps 20] [--batch 4 --seq 32 --hidden 64]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, limit_threads, machine_summary  # noqa: E402


def make_weights(L: int, C: int, V: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = {"emb": rng.standard_normal((V, C)) * 0.02, "head": rng.standard_normal((V, C)) * 0.02}
    for i in range(L):
        for name, shape in (("wq", (C, C)), ("wk", (C, C)), ("wv", (C, C)), ("wo", (C, C)),
                            ("w1", (4 * C, C)), ("w2", (C, 4 * C))):
            w[f"{name}{i}"] = rng.standard_normal(shape) * 0.02
        for name in ("ln1", "ln2"):
            w[f"{name}{i}"] = np.ones(C)
    return {k: v.astype(np.float32) for k, v in w.items()}


def graph(lib: dict, w: dict, ids, L: int, H: int, mask):
    """Mean cross-entropy of a 4-block pre-norm transformer. ``lib`` holds the few calls whose
    spelling differs between the libraries (embedding, layer_norm, gelu, softmax, axis moves)."""
    B, T = ids.shape
    C = w["emb"].shape[1]
    D = C // H
    x = lib["embedding"](ids, w["emb"])                                   # (B, T, C)
    for i in range(L):
        h = lib["layer_norm"](x, w[f"ln1{i}"])
        q = lib["heads"]((h @ w[f"wq{i}"].T).reshape(B, T, H, D))          # (B, H, T, D)
        k = lib["heads"]((h @ w[f"wk{i}"].T).reshape(B, T, H, D))
        v = lib["heads"]((h @ w[f"wv{i}"].T).reshape(B, T, H, D))
        att = lib["softmax"]((q @ lib["kT"](k)) * (1.0 / np.sqrt(D)) + mask)  # (B, H, T, T)
        y = lib["heads"](att @ v).reshape(B, T, C)                         # (B, T, H, D) -> (B, T, C)
        x = x + y @ w[f"wo{i}"].T
        h = lib["layer_norm"](x, w[f"ln2{i}"])
        x = x + lib["gelu"](h @ w[f"w1{i}"].T) @ w[f"w2{i}"].T              # (B, T, 4C) -> (B, T, C)
    logits = x @ w["head"].T                                               # (B, T, V)
    return lib["cross_entropy"](logits, ids)


def _stepper(lib: dict, w: dict, ids, L: int, H: int, mask):
    """One forward + backward of ``graph`` with either library's ops; returns the loss."""
    def step():
        for p in w.values():
            p.grad = None
        loss = graph(lib, w, ids, L, H, mask)
        loss.backward()
        return loss.item()
    return step


def minilora_step(w_np: dict, ids, L, H):
    from minilora import Tensor, backend
    from minilora import functional as F
    backend.keep_freed_host_memory()   # as the CLI and train() do (not on import): malloc keeps a step's freed buffers
    w = {k: Tensor(v.copy(), requires_grad=True) for k, v in w_np.items()}
    T = ids.shape[1]
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    lib = {"embedding": F.embedding, "layer_norm": lambda x, g: F.layer_norm(x, g, None, 1e-5),
           "gelu": F.gelu, "softmax": lambda s: F.softmax(s, axis=-1),
           "heads": lambda t: t.transpose(0, 2, 1, 3), "kT": lambda k: k.swapaxes(-1, -2),
           "cross_entropy": F.cross_entropy}
    return _stepper(lib, w, ids, L, H, mask)


def torch_step(w_np: dict, ids, L, H):
    import torch
    import torch.nn.functional as TF
    w = {k: torch.tensor(v, requires_grad=True) for k, v in w_np.items()}
    T = ids.shape[1]
    C = w_np["emb"].shape[1]
    mask = torch.triu(torch.full((T, T), float("-inf")), 1)
    tids = torch.tensor(ids)
    lib = {"embedding": TF.embedding, "layer_norm": lambda x, g: TF.layer_norm(x, (C,), g, None, 1e-5),
           "gelu": TF.gelu, "softmax": lambda s: torch.softmax(s, dim=-1),
           "heads": lambda t: t.transpose(1, 2), "kT": lambda k: k.transpose(-1, -2),
           "cross_entropy": lambda z, t: TF.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1))}
    return _stepper(lib, w, tids, L, H, mask)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=96)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2,
                    help="threads for both: torch, NumPy's BLAS and minilora's kernels")
    args = ap.parse_args(argv)
    limit_threads(args.threads)
    print(machine_summary())
    w = make_weights(args.layers, args.hidden, args.vocab)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
    fns = {"minilora": minilora_step(w, ids, args.layers, args.heads)}
    try:
        fns["torch"] = torch_step(w, ids, args.layers, args.heads)
        a, b = fns["minilora"](), fns["torch"]()
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (a, b)   # the same graph, the same loss
    except ImportError:
        print("torch not installed: minilora timing only")
    med = interleaved_medians(fns, steps=args.steps, warmup=args.warmup)
    print(f"graph: {args.layers} blocks, batch {args.batch}, seq {args.seq}, hidden {args.hidden}, "
          f"{args.heads} heads, vocab {args.vocab}")
    line = f"forward+backward: minilora {med['minilora'] * 1e3:.2f} ms"
    if "torch" in med:
        ratio = med["minilora"] / med["torch"]
        line += (f" | torch {med['torch'] * 1e3:.2f} ms | ratio {ratio:.2f} "
                 f"({'within' if ratio <= 1.5 else 'outside'} the 1.5x target)")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
