"""The fast twins: code that computes what a reference computes, faster, each tested equal to it.

A student reads the references (``functional.py``, ``optim.py``, ``lora/layer.py``, ``train.py``);
this package holds what the library runs instead outside ``minilora.reference()``. It sits below
``functional.py`` and ``optim.py`` so that they can hand work to their twins; a twin never calls
its reference. Each module's docstring says which reference it equals, what it buys (measured, in
docs/benchmarks.md) and which test checks the two equal.

* ``functional.py``: fused ops with hand-written backwards (``linear``, ``softmax``,
  ``log_softmax``, ``cross_entropy``, ``rms_norm``, ``layer_norm``, ``rotary_embedding``,
  ``swiglu``), twins of the composites of the same names in ``minilora/functional.py``;
* ``attention.py``: ``scaled_dot_product_attention`` in query blocks with key-major scores, twin of
  ``functional.scaled_dot_product_attention``;
* ``cuda_kernels.py``: minilora's CUDA kernels for softmax, log-softmax, cross-entropy and RMSNorm
  (one thread block per row), used by ``fast/functional.py`` on a GPU;
* ``parallel.py``: the CPU threads the twins split their rows over (not a twin itself);
* ``optim.py``: AdamW's update in cache-sized pieces, parameters on threads, twin of ``optim.AdamW``.
* ``decode.py``: one decoding step of a Llama on bare arrays (matrix-vector products, on BLAS's
  threads or with rows on ours), twin of the model's cached forward in ``models/llama.py``, used by ``models.generate``.

Twins that need a higher layer's types live beside their reference, clearly named:
``lora/fused.py`` (the LoRA layer as one autograd node, twin of ``lora/layer.py``'s module form) and
``quant/kernels.py`` (the NF4 CUDA kernels).
"""
