"""A tiny model with Hugging Face Llama's module names, for LoRA tests that need no real Llama.

``ToyLM`` has model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj,
model.layers.{i}.mlp.{gate,up,down}_proj, model.norm and lm_head, and a forward that mixes them
(not attention: just enough that every Linear influences the logits).
"""
from minilora import Tensor, nn
from minilora import functional as F


class _Attn(nn.Module):
    def __init__(self, d, bias=False):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d // 2, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        gate = F.sigmoid(self.k_proj(x).sum(axis=-1, keepdims=True))
        return self.o_proj(self.q_proj(x) * gate + self.v_proj(x))


class _MLP(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter)
        self.up_proj = nn.Linear(d, inter)
        self.down_proj = nn.Linear(inter, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, d, inter, bias=False):
        super().__init__()
        self.self_attn = _Attn(d, bias)
        self.mlp = _MLP(d, inter)
        self.input_layernorm = nn.RMSNorm(d)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(x)


class _Inner(nn.Module):
    def __init__(self, vocab, d, inter, n_layers, bias=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d, std=0.5)
        self.layers = nn.ModuleList([_Block(d, inter, bias) for _ in range(n_layers)])
        self.norm = nn.RMSNorm(d)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class _Out:
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


class ToyLM(nn.Module):
    """Names like transformers' LlamaForCausalLM; ``model(ids, labels=ids)`` gives .loss/.logits."""

    def __init__(self, vocab=20, d=16, inter=24, n_layers=2, bias=False):
        super().__init__()
        self.model = _Inner(vocab, d, inter, n_layers, bias)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids, labels=None):
        ids = input_ids.data if isinstance(input_ids, Tensor) else input_ids
        logits = self.lm_head(self.model(ids))
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1], labels[:, 1:])
        return _Out(loss, logits)

    def get_output_embeddings(self):
        return self.lm_head
