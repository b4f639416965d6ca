"""Template banks and shared layers against independent computations.

Every reference weight is mixed here with ``torch.einsum`` (never with the library's own
contraction) and every reference layer is the matching ``torch.nn`` layer or functional.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

from helpers import exact_kernels, on
import softshare
from softshare.layers.fast_mix import BankMixer
from softshare import (
    SharedConv1d,
    SharedConv2d,
    SharedLinear,
    SoftshareError,
    TemplateBank,
    init_coefficients,
    named_banks,
    to_channels_last,
)

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def mixed(layer, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight mixed independently of the library (in `dtype` if given)."""
    return torch.einsum("k,k...->...", layer.coefficients.to(dtype), layer.bank.templates.to(dtype))


def reference_conv(layer, weight: torch.Tensor) -> nn.Module:
    """The torch.nn conv with the same configuration as `layer` and the given weight."""
    cls = nn.Conv2d if isinstance(layer, SharedConv2d) else nn.Conv1d
    ref = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
              layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, dtype=weight.dtype)
    with torch.no_grad():
        ref.weight.copy_(weight)
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref


def random_coefficients(*layers) -> None:
    with torch.no_grad():
        for layer in layers:
            layer.coefficients.normal_()


CONV2D_CASES = [
    # (weight shape, stride, padding, dilation, groups, bias, padding_mode)
    ((6, 4, 3, 3), 1, 0, 1, 1, False, "zeros"),
    ((6, 4, 3, 3), 2, 1, 1, 1, True, "zeros"),
    ((6, 4, 3, 3), (2, 1), (1, 2), 1, 1, True, "zeros"),
    ((6, 4, 3, 3), 1, "same", 2, 1, True, "zeros"),
    ((6, 4, 3, 2), 1, "same", (1, 2), 1, False, "zeros"),
    ((6, 4, 3, 3), 1, "valid", 1, 1, True, "zeros"),
    ((6, 2, 3, 3), 1, 1, 1, 2, True, "zeros"),
    ((8, 1, 3, 3), 2, 1, 2, 4, False, "zeros"),  # depthwise-like: 4 groups of 1 input channel
    ((6, 4, 3, 3), 1, 1, 1, 1, True, "reflect"),
    ((6, 4, 3, 3), 1, "same", 1, 1, False, "reflect"),
    ((6, 4, 3, 3), 1, (2, 1), 1, 1, False, "circular"),
    ((6, 2, 3, 3), 2, 2, (1, 2), 2, True, "replicate"),
    ((6, 4, 2, 2), 1, "same", 1, 1, True, "circular"),
]


def _in_channels(shape, groups):
    return shape[1] * groups


@pytest.mark.parametrize("shape,stride,padding,dilation,groups,bias,mode", CONV2D_CASES)
def test_shared_conv2d_matches_conv2d_on_mixed_weight(shape, stride, padding, dilation, groups, bias, mode):
    torch.manual_seed(0)
    bank = TemplateBank(3, shape).double()
    layer = SharedConv2d(bank, stride, padding, dilation, groups, bias, mode).double()
    random_coefficients(layer)
    x = torch.randn(2, _in_channels(shape, groups), 9, 8, dtype=torch.float64)
    expected = reference_conv(layer, mixed(layer))(x)
    torch.testing.assert_close(layer(x), expected, **TIGHT)
    # the weight property is the mix too
    torch.testing.assert_close(layer.weight, mixed(layer), **TIGHT)


CONV1D_CASES = [
    ((5, 4, 3), 1, 0, 1, 1, False, "zeros"),
    ((5, 4, 3), 2, 1, 1, 1, True, "zeros"),
    ((5, 4, 3), 1, "same", 3, 1, True, "zeros"),
    ((6, 2, 3), 1, 1, 1, 2, True, "reflect"),
    ((5, 4, 4), 1, "same", 1, 1, False, "circular"),
    ((5, 4, 3), 3, 2, 2, 1, True, "replicate"),
]


@pytest.mark.parametrize("shape,stride,padding,dilation,groups,bias,mode", CONV1D_CASES)
def test_shared_conv1d_matches_conv1d_on_mixed_weight(shape, stride, padding, dilation, groups, bias, mode):
    torch.manual_seed(1)
    bank = TemplateBank(4, shape).double()
    layer = SharedConv1d(bank, stride, padding, dilation, groups, bias, mode).double()
    random_coefficients(layer)
    x = torch.randn(3, _in_channels(shape, groups), 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_conv(layer, mixed(layer))(x), **TIGHT)


@pytest.mark.parametrize("bias", [True, False])
def test_shared_linear_matches_linear_on_mixed_weight(bias):
    torch.manual_seed(2)
    bank = TemplateBank(3, (7, 5)).double()
    layer = SharedLinear(bank, bias=bias).double()
    random_coefficients(layer)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    weight = sum(layer.coefficients[j] * bank.templates[j] for j in range(3))  # python loop sum
    expected = F.linear(x, weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, **TIGHT)
    assert (layer.bias is None) == (not bias)


# -- several layers on one bank -------------------------------------------------------------
class Net(nn.Module):
    """Three convs with different configurations on one bank, and a shared linear pair."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.bank = TemplateBank(k, (4, 4, 3, 3))
        self.c1 = SharedConv2d(self.bank, padding=1, bias=True)
        self.c2 = SharedConv2d(self.bank, padding="same", dilation=2, padding_mode="reflect")
        self.c3 = SharedConv2d(self.bank, stride=2, padding=1, bias=True, padding_mode="circular")
        self.lbank = TemplateBank(2, (4, 4))
        self.l1 = SharedLinear(self.lbank)
        self.l2 = SharedLinear(self.lbank, bias=False)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x)) + x
        x = self.c3(x).mean((2, 3))
        return self.l2(torch.tanh(self.l1(x)))


def reference_forward(net: Net, x, templates=None, lin_templates=None, coefficients=None):
    """Net.forward computed with torch.nn reference layers and einsum-mixed weights."""
    templates = net.bank.templates if templates is None else templates
    lin_templates = net.lbank.templates if lin_templates is None else lin_templates
    coefficients = coefficients or {}

    def w(name, t):
        layer = getattr(net, name)
        return torch.einsum("k,k...->...", coefficients.get(name, layer.coefficients), t)

    def conv(name, inp):
        layer = getattr(net, name)
        ref = reference_conv(layer, torch.zeros(layer.bank.weight_shape, dtype=inp.dtype))
        del ref.weight
        ref.weight = w(name, templates)  # differentiable reference weight
        return ref(inp)

    x = torch.tanh(conv("c1", x))
    x = torch.tanh(conv("c2", x)) + x
    x = conv("c3", x).mean((2, 3))
    return F.linear(torch.tanh(F.linear(x, w("l1", lin_templates), net.l1.bias)), w("l2", lin_templates))


def make_net(seed=0, dtype=torch.float64, k=3) -> Net:
    torch.manual_seed(seed)
    net = Net(k).to(dtype)
    random_coefficients(net.c1, net.c2, net.c3, net.l1, net.l2)
    return net


def reference_grads(net: Net, xs):
    """Gradients of sum(out^2) over the inputs, by autograd through einsum-mixed weights."""
    leaves = {"T": net.bank.templates.detach().clone().requires_grad_(),
              "L": net.lbank.templates.detach().clone().requires_grad_()}
    coefficients = {n: getattr(net, n).coefficients.detach().clone().requires_grad_()
                    for n in ("c1", "c2", "c3", "l1", "l2")}
    total = sum(reference_forward(net, x, leaves["T"], leaves["L"], coefficients).pow(2).sum() for x in xs)
    total.backward()
    return leaves["T"].grad, leaves["L"].grad, {n: c.grad for n, c in coefficients.items()}


def assert_grads_match(net: Net, expected, **tol):
    tol = tol or TIGHT
    grad_t, grad_l, grad_c = expected
    torch.testing.assert_close(net.bank.templates.grad, grad_t, **tol)
    torch.testing.assert_close(net.lbank.templates.grad, grad_l, **tol)
    for name, grad in grad_c.items():
        torch.testing.assert_close(getattr(net, name).coefficients.grad, grad, **tol)


def test_multi_layer_bank_forward_and_gradients():
    net = make_net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = net(x)
    torch.testing.assert_close(out, reference_forward(net, x), **TIGHT)
    out.pow(2).sum().backward()
    assert_grads_match(net, reference_grads(net, [x]))
    # gradients reach every template and coefficient
    assert net.bank.templates.grad.abs().amax(dim=(1, 2, 3, 4)).min() > 0
    assert all(getattr(net, n).coefficients.grad.abs().sum() > 0 for n in ("c1", "c2", "c3", "l1", "l2"))


def test_bank_materialises_once_per_forward_and_drops_after_backward(monkeypatch):
    net = make_net()
    calls = []
    original = BankMixer._materialise

    def counting(mixer, bank, key):
        calls.append(bank)
        return original(mixer, bank, key)

    monkeypatch.setattr(BankMixer, "_materialise", counting)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = net(x)
    assert calls == [net.bank, net.lbank]  # one materialisation per bank for all its layers
    assert net.bank._mixer._cache is not None
    out.sum().backward()
    assert net.bank._mixer._cache is None and net.lbank._mixer._cache is None
    net(x)
    assert calls == [net.bank, net.lbank] * 2
    with torch.no_grad():  # every forward pass re-mixes, so even .data edits are seen
        net.bank.templates.data.mul_(2)
        torch.testing.assert_close(net(x), reference_forward(net, x), **TIGHT)
    assert len(calls) == 6


def test_layer_applied_twice_in_one_forward():
    net = make_net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = net.c1(torch.tanh(net.c1(x))) + net.c2(x)
    t = net.bank.templates.detach().requires_grad_()
    a1, a2 = (getattr(net, n).coefficients.detach().requires_grad_() for n in ("c1", "c2"))
    w1, w2 = torch.einsum("k,k...->...", a1, t), torch.einsum("k,k...->...", a2, t)
    ref = (F.conv2d(torch.tanh(F.conv2d(x, w1, net.c1.bias, padding=1)), w1, net.c1.bias, padding=1)
           + F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), w2, dilation=2))
    torch.testing.assert_close(out, ref, **TIGHT)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    torch.testing.assert_close(net.bank.templates.grad, t.grad, **TIGHT)
    torch.testing.assert_close(net.c1.coefficients.grad, a1.grad, **TIGHT)
    torch.testing.assert_close(net.c2.coefficients.grad, a2.grad, **TIGHT)


def test_cache_invalidated_after_optimizer_step():
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
        torch.testing.assert_close(net(x), reference_forward(net, x), **TIGHT)


def test_cache_invalidated_by_in_place_changes_without_backward():
    net = make_net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        net(x)  # populates the (no-grad) cache
        net.bank.templates.mul_(0.5)
        torch.testing.assert_close(net(x), reference_forward(net, x), **TIGHT)
        net.c2.coefficients.add_(1.0)
        torch.testing.assert_close(net(x), reference_forward(net, x), **TIGHT)


def test_cache_invalidated_after_load_state_dict():
    net, other = make_net(seed=0), make_net(seed=1)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        before = net(x)
        net.load_state_dict(other.state_dict())
        after = net(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, other.eval()(x), **TIGHT)
    torch.testing.assert_close(after, reference_forward(other, x), **TIGHT)


def test_cache_invalidated_after_dtype_move():
    net = make_net(dtype=torch.float32)
    x = torch.randn(2, 4, 8, 8)
    net(x)  # cache holds float32 weights
    net.to(torch.float64)
    out = net(x.double())
    assert out.dtype == torch.float64 and net.c2.weight.dtype == torch.float64
    torch.testing.assert_close(out, reference_forward(net, x.double()), **TIGHT)
    out.sum().backward()
    assert net.bank.templates.grad.dtype == torch.float64


def test_gradient_accumulation_over_two_passes_without_step():
    net = make_net()
    x1, x2 = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)
    net(x1).pow(2).sum().backward()
    net(x2).pow(2).sum().backward()
    assert_grads_match(net, reference_grads(net, [x1, x2]))


def test_two_forwards_then_one_backward():
    net = make_net()
    x1, x2 = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)
    (net(x1).pow(2).sum() + net(x2).pow(2).sum()).backward()
    assert_grads_match(net, reference_grads(net, [x1, x2]))


def test_two_forwards_then_two_separate_backwards():
    # as with ordinary weights: each loss is backpropagated on its own
    net = make_net()
    x1, x2 = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64)
    loss1, loss2 = net(x1).pow(2).sum(), net(x2).pow(2).sum()
    loss1.backward()
    loss2.backward()
    assert_grads_match(net, reference_grads(net, [x1, x2]))


def test_backward_after_in_place_parameter_change_raises():
    net = make_net()
    loss = net(torch.randn(2, 4, 8, 8, dtype=torch.float64)).sum()
    with torch.no_grad():
        net.bank.templates.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_eval_then_train():
    net = make_net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        evaluated = net(x)
    assert not evaluated.requires_grad
    net.train()
    out = net(x)
    assert out.requires_grad
    torch.testing.assert_close(out, evaluated, **TIGHT)
    out.pow(2).sum().backward()
    assert_grads_match(net, reference_grads(net, [x]))
    with torch.inference_mode():
        torch.testing.assert_close(net(x), evaluated, **TIGHT)
    net(x).pow(2).sum().backward()  # back in training after inference mode
    grads = reference_grads(net, [x])
    torch.testing.assert_close(net.bank.templates.grad, 2 * grads[0], **TIGHT)


def test_frozen_templates_train_coefficients_only():
    net = make_net()
    net.bank.templates.requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    net(x).pow(2).sum().backward()
    assert net.bank.templates.grad is None
    expected = reference_grads(net, [x])[2]
    for name in ("c1", "c2", "c3"):
        torch.testing.assert_close(getattr(net, name).coefficients.grad, expected[name], **TIGHT)


def test_layer_unused_in_forward_gets_no_gradient():
    net = make_net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    net.c1(x).sum().backward()  # c2, c3 share the bank but are not used
    assert net.c2.coefficients.grad is None and net.c3.coefficients.grad is None
    t = net.bank.templates.detach().requires_grad_()
    a = net.c1.coefficients.detach().requires_grad_()
    ref = reference_conv(net.c1, torch.zeros(4, 4, 3, 3, dtype=torch.float64))
    del ref.weight
    ref.weight = torch.einsum("k,k...->...", a, t)
    ref(x).sum().backward()
    torch.testing.assert_close(net.bank.templates.grad, t.grad, **TIGHT)
    torch.testing.assert_close(net.c1.coefficients.grad, a.grad, **TIGHT)


def test_gradcheck_single_layer_and_multi_layer_bank():
    torch.manual_seed(3)
    single = TemplateBank(2, (3, 2, 2, 2)).double()
    layer = SharedConv2d(single, padding=1, bias=True).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)

    def f_single(t, a):
        return functional_call(layer, {"bank.templates": t, "coefficients": a}, (x,))

    assert gradcheck(f_single, (single.templates.detach().requires_grad_(),
                                torch.randn(2, dtype=torch.float64, requires_grad=True)))

    net = make_net(k=2)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    names = ["bank.templates", "c1.coefficients", "c2.coefficients", "c3.coefficients"]
    params = dict(net.named_parameters())

    def f_multi(t, a1, a2, a3):
        return functional_call(net, {**params, **dict(zip(names, (t, a1, a2, a3)))}, (x,))

    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert gradcheck(f_multi, inputs)
    assert gradgradcheck(f_multi, inputs)  # double backward (e.g. gradient penalties) works too


# -- errors and repr ------------------------------------------------------------------------
def test_template_shape_mismatch_raises_clear_error():
    with pytest.raises(SoftshareError, match=r"needs 4-D templates.*\(4, 4, 3\)"):
        SharedConv2d(TemplateBank(2, (4, 4, 3)))
    with pytest.raises(SoftshareError, match="needs 3-D templates"):
        SharedConv1d(TemplateBank(2, (4, 4, 3, 3)))
    with pytest.raises(SoftshareError, match="needs 2-D templates"):
        SharedLinear(TemplateBank(2, (4, 4, 3)))
    with pytest.raises(SoftshareError, match="needs a TemplateBank"):
        SharedConv2d(nn.Parameter(torch.zeros(2, 4, 4, 3, 3)))


def test_bad_conv_arguments_raise_and_leave_bank_clean():
    bank = TemplateBank(2, (6, 2, 3, 3))
    with pytest.raises(SoftshareError, match="groups=4 must be a positive divisor of out_channels=6"):
        SharedConv2d(bank, groups=4)
    with pytest.raises(SoftshareError, match="groups=0"):
        SharedConv2d(bank, groups=0)
    with pytest.raises(SoftshareError, match="padding_mode"):
        SharedConv2d(bank, padding_mode="mirror")
    with pytest.raises(SoftshareError, match="padding must be"):
        SharedConv2d(bank, padding="full")
    with pytest.raises(SoftshareError, match="stride 1"):
        SharedConv2d(bank, stride=2, padding="same")
    assert bank.layers == []  # failed layers are not attached
    with pytest.raises(SoftshareError, match="at least 1 template"):
        TemplateBank(0, (4, 4))
    with pytest.raises(SoftshareError, match="at least 2 positive dims"):
        TemplateBank(2, (4,))


def test_repr_shows_bank_and_k():
    bank = TemplateBank(5, (8, 4, 3, 3))
    text = repr(SharedConv2d(bank, stride=2, padding=1))
    assert "k=5" in text and "TemplateBank" in text and "weight_shape=(8, 4, 3, 3)" in text
    assert "stride=(2, 2)" in text
    text = repr(SharedLinear(TemplateBank(3, (2, 7))))
    assert "k=3" in text and "TemplateBank(k=3, weight_shape=(2, 7))" in text


# -- initialisation -------------------------------------------------------------------------
def test_templates_are_kaiming_normal_fan_in_relu_each():
    torch.manual_seed(4)
    k, shape = 4, (64, 96, 3, 3)
    bank = TemplateBank(k, shape)
    fan_in = 96 * 3 * 3
    expected_std = math.sqrt(2.0 / fan_in)
    n = math.prod(shape)
    for template in bank.templates.detach():
        # std of a normal sample's std is std / sqrt(2n): 2% is > 10 standard errors here
        assert abs(template.std().item() / expected_std - 1) < 0.02
        assert abs(template.mean().item()) < 5 * expected_std / math.sqrt(n)
    flat = bank.templates.detach().reshape(k, -1)
    correlation = torch.corrcoef(flat)
    assert (correlation - torch.eye(k)).abs().max() < 0.02  # independent templates
    linear = TemplateBank(3, (200, 500))
    assert abs(linear.templates.std().item() / math.sqrt(2.0 / 500) - 1) < 0.02


@pytest.mark.parametrize("n,k", [(6, 2), (3, 3), (2, 5)])
def test_init_coefficients_rows_of_orthogonal_matrix(n, k):
    torch.manual_seed(n * 10 + k)
    bank = TemplateBank(k, (2, 2))
    layers = [SharedLinear(bank) for _ in range(n)]
    init_coefficients(layers)
    a = torch.stack([layer.coefficients.detach() for layer in layers]).double()
    if k >= n:
        torch.testing.assert_close(a @ a.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(a.T @ a, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-6)


def test_init_coefficients_k1_starts_every_layer_positive():
    """k = 1: an orthogonal (n x 1) column has random signs; they start positive (same unit column)."""
    for seed in range(5):
        torch.manual_seed(seed)
        layers = [SharedLinear(TemplateBank(1, (2, 2))) for _ in range(8)]
        init_coefficients(layers)
        a = torch.stack([layer.coefficients.detach() for layer in layers]).double()
        assert (a > 0).all()
        torch.testing.assert_close(a.T @ a, torch.eye(1, dtype=torch.float64), rtol=0, atol=1e-6)


def test_init_coefficients_rejects_mixed_bank_sizes():
    with pytest.raises(SoftshareError, match="different sizes"):
        init_coefficients([SharedLinear(TemplateBank(2, (2, 2))), SharedLinear(TemplateBank(3, (2, 2)))])


def test_named_banks_lists_users_in_module_order():
    net = make_net()
    banks = named_banks(net)
    assert [(name, [n for n, _ in users]) for name, _, users in banks] == [
        ("bank", ["c1", "c2", "c3"]), ("lbank", ["l1", "l2"])]
    assert banks[0][1] is net.bank


# -- copies and memory ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_a_model_with_live_cache(how):
    net = make_net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    out = net(x)  # cache populated, with a graph behind it
    if how == "deepcopy":
        clone = copy.deepcopy(net)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(net))
    else:
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert clone.c1.bank is clone.c2.bank is clone.bank and clone.bank is not net.bank
    assert [id(layer) for layer in clone.bank.layers] == [id(clone.c1), id(clone.c2), id(clone.c3)]
    torch.testing.assert_close(clone(x), out, **TIGHT)
    # the clone trains independently of the original
    clone(x).pow(2).sum().backward()
    torch.optim.SGD(clone.parameters(), lr=1.0).step()
    torch.testing.assert_close(net(x), out, **TIGHT)
    torch.testing.assert_close(clone(x), reference_forward(clone, x), **TIGHT)
    out.sum().backward()  # the original's graph is intact


def test_materialised_weights_are_freed_after_each_step():
    net = make_net(dtype=torch.float32)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(2, 4, 8, 8)
    refs = []
    for _ in range(3):
        opt.zero_grad()
        loss = net(x).pow(2).sum()
        refs.append(weakref.ref(net.c2.weight))
        loss.backward()
        opt.step()
        del loss
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_training_reuses_bank_buffers_but_never_overwrites_live_weights():
    net = make_net(dtype=torch.float32)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 4, 8, 8)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = net(x).pow(2).sum()
        pointer = net.bank._mixer._scratch["weights"].data_ptr()
        loss.backward()
        opt.step()
        return pointer

    step()
    assert step() == step()  # the materialisation buffer is reused from step to step
    held = net.c1.weight  # a user keeps a weight: the next steps must not write into it
    snapshot = held.detach().clone()
    net(x).pow(2).sum().backward()
    opt.step()
    step()
    torch.testing.assert_close(held.detach(), snapshot, rtol=0, atol=0)
    torch.testing.assert_close(net(x), reference_forward(net, x), rtol=1e-5, atol=1e-5)
    # .grad handed out by one backward is not overwritten by the next (set_to_none=False)
    opt.zero_grad(set_to_none=False)
    net(x).pow(2).sum().backward()
    first = net.bank.templates.grad.clone()
    net(x).pow(2).sum().backward()
    torch.testing.assert_close(net.bank.templates.grad, 2 * first, rtol=1e-5, atol=1e-5)
    net.eval()
    assert net.bank._mixer._scratch == {}  # eval releases the training buffers


# -- channels-last ---------------------------------------------------------------------------
def test_to_channels_last_model_matches_and_trains():
    torch.manual_seed(5)
    model = softshare.create_model("swrn_16_2_2").double()
    converted = to_channels_last(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(converted(x.contiguous(memory_format=torch.channels_last)), model(x),
                               rtol=1e-9, atol=1e-9)
    for module in converted.modules():
        if isinstance(module, (nn.Conv2d, SharedConv2d)):
            assert module.weight.is_contiguous(memory_format=torch.channels_last), module
    for name, bank, _ in named_banks(converted):
        t = bank.templates  # (k, out, in, kh, kw) stored as (k, out, kh, kw, in)
        assert t.permute(0, 1, 3, 4, 2).is_contiguous(), name

    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in (model, converted)]
    for _ in range(2):
        for m, opt, inp in zip((model, converted), opts, (x, x.contiguous(memory_format=torch.channels_last))):
            opt.zero_grad()
            F.cross_entropy(m(inp), torch.tensor([1, 2])).backward()
            opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-9, msg=name)
        assert q.grad.stride() == q.stride(), name
        assert opts[1].state[q]["momentum_buffer"].stride() == q.stride(), name
    torch.testing.assert_close(converted(x), model(x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_in_many_chunks(monkeypatch, channels_last):
    monkeypatch.setattr(softshare.layers.fast_mix, "_CHUNK", 7)  # 144-element templates: 21 chunks
    net = make_net()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    if channels_last:
        to_channels_last(net)
        x = x.contiguous(memory_format=torch.channels_last)
        assert net.c1.weight.is_contiguous(memory_format=torch.channels_last)
    x1, x2 = x, x.flip(0)
    net(x1).pow(2).sum().backward()
    net(x2).pow(2).sum().backward()
    assert_grads_match(net, reference_grads(net, [x1, x2]))
    if channels_last:
        assert net.bank.templates.grad.stride() == net.bank.templates.stride()


def test_layer_added_to_a_cast_bank_matches_its_dtype():
    bank = TemplateBank(2, (3, 4)).double()
    layer = SharedLinear(bank)
    assert layer.coefficients.dtype == layer.bias.dtype == torch.float64
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, mixed(layer), layer.bias), **TIGHT)


def test_to_channels_last_leaves_conv1d_and_linear_banks_alone():
    model = nn.Sequential(SharedConv1d(TemplateBank(2, (4, 4, 3)), padding=1), SharedLinear(TemplateBank(2, (5, 4))))
    to_channels_last(model)
    assert model[0].bank.templates.is_contiguous() and model[0].weight.is_contiguous()
    assert model[1].bank.templates.is_contiguous()


# -- on the device under test (`--device`; benchmarks/gpu_check.py runs these on CUDA) -----------
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # max |error| / max |float64 CPU reference|


def scaled_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.detach().double().cpu() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shared_conv_on_device_matches_conv_on_mixed_weight(device, precision, channels_last):
    torch.manual_seed(0)
    bank = TemplateBank(3, (32, 16, 3, 3))
    layers = nn.ModuleList([SharedConv2d(bank, padding=1, bias=True), SharedConv2d(bank, stride=2, padding=1)])
    random_coefficients(*layers)
    with torch.no_grad():
        layers[0].bias.normal_()
        x = torch.randn(4, 16, 12, 12)
        expected = [F.conv2d(x.double(), mixed(layer, torch.float64),
                             None if layer.bias is None else layer.bias.double(), layer.stride, layer.padding)
                    for layer in layers]
    layers.to(device)
    if channels_last:
        to_channels_last(layers)
    with exact_kernels(device), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        got = [layer(on(device, x, channels_last)) for layer in layers]
    for out, ref in zip(got, expected):
        assert out.device.type == device.type
        assert out.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert scaled_error(out, ref) < TOLERANCE[precision]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bank_gradients_on_device_match_reference(device, channels_last):
    torch.manual_seed(1)
    bank = TemplateBank(2, (8, 8, 3, 3))
    layers = nn.ModuleList([SharedConv2d(bank, padding=1) for _ in range(3)])
    init_coefficients(layers)
    x = torch.randn(2, 8, 10, 10)
    templates = bank.templates.detach().double().requires_grad_()
    coefficients = [layer.coefficients.detach().double().requires_grad_() for layer in layers]
    h = x.double()
    for c in coefficients:
        h = torch.tanh(F.conv2d(h, torch.einsum("k,k...->...", c, templates), padding=1))
    h.pow(2).sum().backward()

    layers.to(device)
    if channels_last:
        to_channels_last(layers)
    h = on(device, x, channels_last)
    with exact_kernels(device):
        for layer in layers:
            h = torch.tanh(layer(h))
        h.pow(2).sum().backward()
    assert bank.templates.grad.device.type == device.type
    assert bank.templates.grad.stride() == bank.templates.stride()  # the templates' own layout
    assert scaled_error(bank.templates.grad, templates.grad) < TOLERANCE["fp32"]
    for layer, c in zip(layers, coefficients):
        assert scaled_error(layer.coefficients.grad, c.grad) < TOLERANCE["fp32"]

# -- 1-D convolutions computed as channels-last 2-D ones ---------------------------------------
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, padding=2, dilation=2), dict(groups=2),
                                    dict(padding="same", bias=True), dict(padding=1, padding_mode="circular")])
def test_conv1d_channels_last_matches_conv1d(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, **{"bias": False, **kwargs}).double()
    fast = softshare.layers.Conv1d(4, 6, 3, **{"bias": False, **kwargs}).double()
    fast.load_state_dict(conv.state_dict())
    assert not fast.channels_last  # torch's computation until to_channels_last
    to_channels_last(fast)
    assert fast.channels_last
    x = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    out = fast(x)
    torch.testing.assert_close(out, conv(x), **TIGHT)
    assert out.stride(1) == 1  # channels-last: (N, C, L) stored as (N, L, C)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *fast.parameters()], g)
    expected = torch.autograd.grad(conv(x), [x, *conv.parameters()], g)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, **TIGHT)
    # the functional form, and unbatched inputs (torch's path)
    y = torch.randn(4, 11, dtype=torch.float64)
    torch.testing.assert_close(fast(y), conv(y), **TIGHT)


def test_shared_conv1d_channels_last_and_share_keep_the_flag():
    torch.manual_seed(1)
    bank = TemplateBank(2, (5, 4, 3)).double()
    layer = SharedConv1d(bank, padding=1).double()
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    expected = layer(x)
    to_channels_last(layer)
    assert layer.channels_last
    torch.testing.assert_close(layer(x), expected, **TIGHT)
    model = nn.Sequential(to_channels_last(softshare.layers.Conv1d(4, 4, 3, padding=1)), nn.ReLU(),
                          to_channels_last(softshare.layers.Conv1d(4, 4, 3, padding=1)))
    softshare.share(model, num_templates=1)
    assert all(isinstance(m, SharedConv1d) and m.channels_last for m in (model[0], model[2]))
