"""Combining adapters: ``add_weighted_adapter`` builds a new adapter from a weighted mix of others.

Given adapters with updates ΔW_i = s_i·B_i·A_i (s_i = α_i/r_i) and weights w_i, the target is the
weighted sum ΔW = Σ w_i·ΔW_i, stored as a new LoRA pair (A, B) with α = r, so its scaling is 1.
Three ways, as in PEFT (peft 0.21, ``LoraModel.add_weighted_adapter``); tests/test_peft_interop.py
checks each against PEFT's own result:

* "cat" — **exact**. Stack the A's (each times w_i·s_i) as rows and the B's as columns:
  A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (Σr_i, in), B = [B_1, B_2, ...] (out, Σr_i); then
  B·A = Σ_i B_i·(w_i s_i A_i) = Σ w_i ΔW_i, because a block row times a block column is the sum of
  the block products. The price: the rank is Σ r_i.
* "svd" — **approximate** (exact when rank(ΔW) ≤ svd_rank). Form ΔW = Σ w_i ΔW_i, take its SVD
  U·S·Vᵀ and keep the top svd_rank singular triplets: B = U_k·S_k, A = V_kᵀ, the best rank-k
  approximation (Eckart–Young). The error is the dropped singular values.
* "linear" — **approximate**, cheap, and usually poor. Mix the factors separately:
  A = Σ c_i·A_i, B = Σ c_i·B_i with c_i = √(w_i s_i) (the sign goes on A). Then
  B·A = Σ_i c_i² B_i A_i + Σ_{i≠j} c_i c_j B_i A_j: the wanted sum plus cross terms B_i·A_j that
  pair one adapter's B with another's A, which nobody trained. Exact only for a single adapter.
  Needs equal ranks.

One deliberate difference from PEFT: the new adapter always has ``use_rslora=False``. PEFT copies
the first adapter's config, so with rsLoRA its new scaling is α/√r = √r instead of 1 and the
combined update comes out √r times too large; here the combination is exactly as documented.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend

COMBINATION_TYPES = ("svd", "linear", "cat")


def _union_targets(configs):
    kinds = {isinstance(c.target_modules, str) for c in configs}
    if len(kinds) > 1:
        raise ValueError("add_weighted_adapter: the adapters mix list and regex target_modules; "
                         "combine adapters whose target_modules are of the same kind")
    if kinds == {True}:
        return "|".join(f"({c.target_modules})" for c in configs)
    names = []
    for c in configs:
        names += [t for t in c.target_modules if t not in names]
    return sorted(names)


def add_weighted_adapter(peft_model, adapters, weights, adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """Add adapter ``adapter_name`` = Σ weights[i] · ΔW(adapters[i]) (see the module docstring).

    ``combination_type``: "cat" (exact, rank Σr_i), "svd" (best rank-``svd_rank`` approximation,
    default rank max r_i), "linear" (factor-wise mix, approximate, equal ranks needed). With a single
    adapter "linear" is used, which is then exact, as in PEFT. The new adapter is inactive and frozen;
    ``set_adapter(adapter_name)`` uses it.
    """
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    weights = [float(w) for w in (weights if isinstance(weights, (list, tuple, np.ndarray)) else [weights])]
    if not adapters:
        raise ValueError("add_weighted_adapter: give at least one adapter name")
    if len(adapters) != len(weights):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; "
                         "give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {weights}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"add_weighted_adapter: combination_type={combination_type!r}; minilora "
                         f"implements {COMBINATION_TYPES}")
    peft_model._check_exists(adapters)
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"add_weighted_adapter: an adapter called {adapter_name!r} already exists")
    configs = [peft_model.peft_config[a] for a in adapters]
    if any(c.rank_pattern for c in configs):
        raise ValueError("add_weighted_adapter: adapters with a rank_pattern are not supported; "
                         "combine adapters with one rank each")
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"add_weighted_adapter: 'linear' needs adapters of equal rank, got {ranks};"
                             " use 'cat' (exact) or 'svd'")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
        if isinstance(new_rank, bool) or not isinstance(new_rank, int) or new_rank <= 0:
            raise ValueError(f"add_weighted_adapter: svd_rank must be a positive int, got {svd_rank!r}")

    # α = r makes the new scaling 1: the factors below carry all the weighting and scaling.
    new_config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, use_rslora=False,
                                     target_modules=_union_targets(configs), rank_pattern={},
                                     alpha_pattern={}, layers_to_transform=None, modules_to_save=None,
                                     init_lora_weights=True)
    peft_model._inject(adapter_name, new_config)

    for _, layer in peft_model.lora_layers():
        if adapter_name not in layer.lora_A:
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        A_new, B_new = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        xpmod = backend.get_xp(A_new.data)
        A_out = xpmod.zeros_like(A_new.data)   # (new_rank, in)
        B_out = xpmod.zeros_like(B_new.data)   # (out, new_rank)
        if combination_type == "cat":
            # rows of A and columns of B, adapter after adapter; unfilled rank slots stay zero
            A_cat = xpmod.concatenate([layer.lora_A[a].weight.data * (w * layer.scaling[a])
                                       for a, w in present], axis=0)       # (Σr_i, in)
            B_cat = xpmod.concatenate([layer.lora_B[a].weight.data for a, _ in present],
                                      axis=1)                              # (out, Σr_i)
            A_out[:A_cat.shape[0]] = A_cat
            B_out[:, :B_cat.shape[1]] = B_cat
        elif combination_type == "linear":
            for a, w in present:
                ws = w * layer.scaling[a]
                c = math.sqrt(abs(ws))
                A_out += layer.lora_A[a].weight.data * (math.copysign(c, ws))  # sign on A only
                B_out += layer.lora_B[a].weight.data * c
        else:  # svd of the exact weighted sum of deltas (each ΔW_i from merge.delta_weight)
            delta = sum(layer.get_delta_weight(a).astype(np.float64) * w for a, w in present)
            U, S, Vh = xpmod.linalg.svd(delta, full_matrices=False)  # (out, k) (k,) (k, in)
            k = min(new_rank, S.shape[0])
            B_out[:, :k] = U[:, :k] * S[:k]                          # (out, k), columns scaled by S
            A_out[:k] = Vh[:k]                                       # (k, in)
        A_new.data = A_out.astype(A_new.data.dtype)
        B_new.data = B_out.astype(B_new.data.dtype)
