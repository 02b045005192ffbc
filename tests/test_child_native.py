"""The child's native batch norm + max-pool + ReLU kernel: torch's block to float rounding, the same
bits on every vector width, bf16, the fallback, and grouped children computed as lone ones."""

import platform
import warnings

import pytest
import torch
import torch.nn.functional as F

from nos_gym.dsl import parse
from nos_gym.tasks.convnet import native as child_native
from nos_gym.tasks.convnet.grouped import GroupedConvNet, per_child_loss
from nos_gym.tasks.convnet.native import bn_relu_pool, bn_relu_pool_reference
from nos_gym.tasks.convnet.network import init_child

pytestmark = pytest.mark.numerics
needs_kernel = pytest.mark.skipif(not child_native.available(), reason="no C++ compiler: the kernel cannot be built")
CL = torch.channels_last


def _inputs(shape=(20, 32, 16, 16), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=CL)
    c = shape[1]
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    grad = torch.randn(shape[0], c, shape[2] // 2, shape[3] // 2, generator=gen).to(dtype)
    return z, gamma, beta, grad


def _run(z, gamma, beta, grad, native, training=True, arch="native"):
    z, gamma, beta = (t.clone().requires_grad_() for t in (z, gamma, beta))
    mean, var = torch.zeros(z.shape[1]), torch.ones(z.shape[1])
    out = bn_relu_pool(z, gamma, beta, mean, var, training=training, native=native, arch=arch)
    if not training:
        return out.detach(), mean, var
    out.backward(grad)
    return out.detach(), z.grad, gamma.grad, beta.grad, mean, var


@needs_kernel
@pytest.mark.parametrize("shape", [(20, 32, 16, 16), (7, 64, 8, 4)])
def test_native_block_computes_torchs_block(shape):
    z, gamma, beta, grad = _inputs(shape)
    native, ref = _run(z, gamma, beta, grad, True), _run(z, gamma, beta, grad, False)
    for name, a, b in zip(("out", "dz", "dgamma", "dbeta", "running_mean", "running_var"), native, ref):
        # float rounding only: sums over ~10^3-10^4 terms in another order (double here, float there)
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()), name
    for training in (False,):
        (a, *_), (b, *_) = _run(z, gamma, beta, grad, True, training), _run(z, gamma, beta, grad, False, training)
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


@needs_kernel
def test_running_statistics_follow_batchnorm2d():
    z, gamma, beta, _ = _inputs((10, 32, 8, 8))
    bn = torch.nn.BatchNorm2d(32)
    bn(z)
    mean, var = torch.zeros(32), torch.ones(32)
    bn_relu_pool(z, gamma, beta, mean, var, training=True, native=True)
    assert torch.allclose(mean, bn.running_mean, atol=1e-6) and torch.allclose(var, bn.running_var, rtol=1e-5)


@needs_kernel
def test_nan_spreads_as_in_torch():
    z, gamma, beta, _ = _inputs((4, 32, 4, 4))
    z[1, 3, 2, 2] = float("nan")  # batch statistics of channel 3 become NaN: the whole channel is NaN
    a = bn_relu_pool(z, gamma, beta, torch.zeros(32), torch.ones(32), training=True, native=True)
    b = bn_relu_pool_reference(z, gamma, beta, torch.zeros(32), torch.ones(32), True, 0.1, 1e-5)
    assert torch.equal(a.isnan(), b.isnan()) and bool(a[:, 3].isnan().all())


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds")
@pytest.mark.parametrize("arch", ["x86-64", "x86-64-v3"])
def test_same_bits_on_narrower_vector_units(arch):
    """Nothing is reassociated or contracted, so SSE2 and AVX2 builds give the host build's bits."""
    for dtype in (torch.float32, torch.bfloat16):
        z, gamma, beta, grad = _inputs((20, 32, 16, 16), dtype)
        host, other = _run(z, gamma, beta, grad, True), _run(z, gamma, beta, grad, True, arch=arch)
        for a, b in zip(host, other):
            assert torch.equal(a, b), (arch, dtype)


@needs_kernel
def test_bf16_block_is_close_to_fp32():
    z, gamma, beta, grad = _inputs((20, 32, 16, 16))
    z16 = z.bfloat16()
    out16, dz16, *_ = _run(z16, gamma, beta, grad.bfloat16(), True)
    out32, dz32, *_ = _run(z16.float().contiguous(memory_format=CL), gamma, beta, grad.bfloat16().float(), True)
    assert out16.dtype == dz16.dtype == torch.bfloat16
    assert float((out16.float() - out32).abs().max()) <= 2 ** -7 * float(out32.abs().max())  # bf16 rounding
    # (a near-tie in a window can route the gradient to another pixel: compare the bulk)
    assert float((dz16.float() - dz32).abs().mean()) <= 2 ** -6 * float(dz32.abs().mean())


def test_torchs_operators_where_the_kernel_does_not_apply(monkeypatch):
    z, gamma, beta, grad = _inputs((4, 32, 5, 6))  # an odd size: torch's operators
    assert not child_native.native_applies(z)
    out = bn_relu_pool(z, gamma, beta, torch.zeros(32), torch.ones(32), training=True)
    ref = F.relu(F.max_pool2d(F.batch_norm(z, torch.zeros(32), torch.ones(32), gamma, beta, True), 2))
    assert torch.equal(out, ref)
    monkeypatch.setenv("NOS_GYM_NATIVE", "0")
    assert not child_native.available()
    from nos_gym.tasks.convnet import ConvNetTask

    assert ConvNetTask("ci", device="cpu").config()["block"] == "torch"


@needs_kernel
def test_fingerprint_names_the_block_kernel():
    from nos_gym.tasks.convnet import ConvNetTask

    task = ConvNetTask("ci", device="cpu")
    assert task.config()["block"] == "native" and task.version == 2


def test_bf16_on_a_cpu_without_bf16_units_warns_once(monkeypatch):
    monkeypatch.setattr(child_native, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(child_native, "_warned_bf16", False)
    from nos_gym.tasks.convnet import ConvNetTask

    with pytest.warns(child_native.NoBF16UnitsWarning, match="bf16 units"):
        ConvNetTask("ci", device="cpu", precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConvNetTask("ci", device="cpu", precision="bf16")


@needs_kernel
def test_a_grouped_network_computes_each_child_exactly_as_alone():
    """On a CPU the grouped network runs child by child, so a child's logits and gradient do not
    depend on the group: bit for bit, whatever its neighbours."""
    inits = torch.stack([init_child(s) for s in range(3)])
    x = torch.randn(10, 3, 32, 32)
    y = torch.randint(0, 10, (10,))
    group = GroupedConvNet(3, inits, channels_last=True).train()
    logits = group(x)
    per_child_loss(logits, y).sum().backward()
    for i in range(3):
        alone = GroupedConvNet(1, inits[i], channels_last=True).train()
        one = alone(x)
        per_child_loss(one, y).sum().backward()
        assert torch.equal(one[0], logits[i]) and torch.equal(alone.flat.grad[0], group.flat.grad[i]), i
        assert torch.equal(alone.running_var1, group.running_var1.view(3, -1)[i])


@needs_kernel
def test_grouped_scores_equal_lone_scores():
    from nos_gym.tasks.convnet import ConvNetTask

    rules = [parse("ADAM"), parse("g * exp(sign(g) * sign(m))")]
    task = ConvNetTask("ci", device="cpu", rules_per_group=2)
    alone = ConvNetTask("ci", device="cpu")
    assert [r.reward for r in task.evaluate(rules)] == [r.reward for r in alone.evaluate(rules)]
