"""Modules: parameter discovery and names, state dicts, submodule replacement, modes, and the layers
(Linear, Embedding, RMSNorm) against torch.nn."""
import numpy as np
import pytest

from minilora import Tensor, nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.RMSNorm(3)

    def forward(self, x):
        return self.norm(self.proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(3, 5, bias=True)

    def forward(self, ids):
        x = self.embed(ids)
        h = self.blocks[0](x)
        return self.head(h)


def test_named_parameters_dotted_and_ordered():
    names = [n for n, _ in Net().named_parameters()]
    assert names == ["embed.weight", "blocks.0.proj.weight", "blocks.0.norm.weight",
                     "blocks.1.proj.weight", "blocks.1.norm.weight", "head.weight", "head.bias"]


def test_shared_parameter_listed_once():
    net = Net()
    net.blocks[1].proj.weight = net.blocks[0].proj.weight
    names = [n for n, _ in net.named_parameters()]
    assert "blocks.1.proj.weight" not in names and len(list(net.parameters())) == 6


def test_state_dict_round_trip():
    a, b = Net(), Net()
    sd = {k: v.copy() for k, v in a.state_dict().items()}
    missing, unexpected = b.load_state_dict(sd)
    assert missing == [] and unexpected == []
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(a(ids).data, b(ids).data)


def test_load_state_dict_strict_errors():
    net = Net()
    sd = dict(net.state_dict())
    del sd["head.bias"]
    with pytest.raises(KeyError, match="missing keys.*head.bias"):
        net.load_state_dict(sd)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert missing == ["head.bias"] and unexpected == []
    sd = dict(net.state_dict(), extra=np.zeros(1))
    with pytest.raises(KeyError, match="unexpected keys.*extra"):
        net.load_state_dict(sd)
    sd = dict(net.state_dict())
    sd["head.weight"] = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="head.weight has shape"):
        net.load_state_dict(sd, strict=False)


class Doubler(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2.0


def test_set_and_get_submodule():
    net = Net()
    old = net.get_submodule("blocks.0.proj")
    assert isinstance(old, nn.Linear)
    ids = np.array([[1, 2]])
    before = net(ids).data
    order = [n for n, _ in net.named_modules()]
    net.set_submodule("blocks.0.proj", Doubler(old))
    assert isinstance(net.get_submodule("blocks.0.proj"), Doubler)
    # the replacement takes the old one's place: module order (and so parameter order) is kept
    assert [n for n, _ in net.named_modules() if n != "blocks.0.proj.inner"] == order
    assert "blocks.0.proj.inner.weight" in dict(net.named_parameters())
    # RMSNorm is scale invariant, so doubling the projection leaves the output unchanged
    np.testing.assert_allclose(net(ids).data, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(AttributeError):
        net.set_submodule("blocks.0.nothing", Doubler(old))
    with pytest.raises(AttributeError):
        net.get_submodule("blocks.7")


def test_train_eval_and_requires_grad():
    net = Net()
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    net.requires_grad_(False)
    assert not any(p.requires_grad for p in net.parameters())
    net.head.requires_grad_(True)
    assert net.num_parameters(trainable_only=True) == 3 * 5 + 5
    out = net(np.array([[1, 2]])).sum()
    out.backward()
    assert net.head.weight.grad is not None and net.embed.weight.grad is None


def test_zero_grad_and_to_cpu():
    net = Net()
    net(np.array([[1]])).sum().backward()
    assert net.head.weight.grad is not None
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    assert net.to("cpu") is net and net.head.weight.device == "cpu"


def test_layers_float32_and_shapes():
    lin = nn.Linear(4, 6)
    assert lin.weight.shape == (6, 4) and lin.weight.dtype == np.float32
    emb = nn.Embedding(7, 3)
    assert emb(np.array([[0, 6]])).shape == (1, 2, 3)
    assert nn.RMSNorm(5).weight.data.tolist() == [1.0] * 5


@pytest.mark.interop
def test_layers_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    lin = nn.Linear(4, 5, bias=True)
    tl = torch.nn.Linear(4, 5)
    tl.weight.data = torch.tensor(lin.weight.data)
    tl.bias.data = torch.tensor(lin.bias.data)
    xt = torch.tensor(x, requires_grad=True)
    xm = Tensor(x, requires_grad=True)
    ym, yt = lin(xm), tl(xt)
    np.testing.assert_allclose(ym.data, yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    ym.sum().backward()
    yt.sum().backward()
    np.testing.assert_allclose(xm.grad, xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.weight.grad, tl.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lin.bias.grad, tl.bias.grad.numpy(), rtol=1e-5, atol=1e-5)

    norm = nn.RMSNorm(4, eps=1e-5)
    norm.weight.data = rng.standard_normal(4).astype(np.float32)
    tn = torch.nn.RMSNorm(4, eps=1e-5)
    tn.weight.data = torch.tensor(norm.weight.data)
    np.testing.assert_allclose(norm(Tensor(x)).data, tn(torch.tensor(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)

    emb = nn.Embedding(6, 3)
    te = torch.nn.Embedding(6, 3)
    te.weight.data = torch.tensor(emb.weight.data)
    ids = np.array([[0, 5, 5, 2]])
    ym, yt = emb(ids), te(torch.tensor(ids))
    np.testing.assert_array_equal(ym.data, yt.detach().numpy())
    up = rng.standard_normal(ym.shape).astype(np.float32)
    ym.backward(up)
    yt.backward(torch.tensor(up))
    np.testing.assert_allclose(emb.weight.grad, te.weight.grad.numpy(), rtol=1e-6, atol=1e-6)
