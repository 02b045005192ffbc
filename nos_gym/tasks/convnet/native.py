"""The child network's batch norm + 2x2 max-pool + ReLU as one native CPU kernel.

Each block of the child is ``relu(max_pool2d(batch_norm(conv(x)), 2))``. On a CPU, torch
runs that as five passes over the convolution's output forward (batch statistics,
normalise, pool with indices, ReLU) and five backward (ReLU mask, a zero-filled
unpooling, two batch-norm passes), each reading or writing a tensor several times the
L2 cache; together they cost about as much as the convolutions. ``bn_relu_pool`` does the
block in one pass over the statistics and one over the pixels forward, and two backward,
in ``nos_gym/tasks/convnet/csrc/child_bn_pool.cpp`` (built on first use like the Rosenbrock kernel:
``nos_gym.engine.native.build``; ``NOS_GYM_NATIVE=0`` turns it off).

What it computes is torch's block: batch statistics over (N, H, W) per channel (biased
variance to normalise, unbiased for the running variance, ``momentum`` as
``nn.BatchNorm2d``'s), ``y = z * a + b`` with ``a = gamma * invstd`` and
``b = beta - mean * a`` (ATen's CPU form), the first maximum of each 2x2 window (NaN wins),
``clamp_min(0)``; backward, ATen's batch-norm training gradient through the argmax pixel
of each window where the output is positive. In eval mode the running statistics stand
in for the batch's. Its sums are taken in double over the pixels in order, so its
numbers do not depend on the CPU's vector width; they differ from torch's (which sums in
float, in an order that does) by float rounding.

Inputs are float32 or bfloat16 (under ``torch.autocast``, the convolution's output is
bfloat16): the arithmetic is float32 either way and the output has the input's dtype;
``gamma``, ``beta`` and the statistics stay float32.

Elsewhere -- CUDA, an odd image size, no C++ compiler (warned once) -- ``bn_relu_pool``
runs torch's operators (``bn_relu_pool_reference``), so a network has one code path.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from nos_gym.engine.native import NativeLibrary

__all__ = ["ChildKernelUnavailableWarning", "NoBF16UnitsWarning", "available", "bn_relu_pool", "bn_relu_pool_reference",
           "cpu_has_bf16_units", "library", "warn_if_no_bf16_units"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "child_bn_pool.cpp"
ABI_VERSION = 2
#: 256-bit vectors even where AVX-512 exists: the channel loops (32 channels a child) are too short
#: for 512-bit vectors of the one-byte argmax, which leave them to the scalar remainder loop.
#: Vector width does not change the numbers (nothing is reassociated).
EXTRA_FLAGS = ("-mprefer-vector-width=256",)
_DTYPES = {torch.float32: 32, torch.bfloat16: 16}


class ChildKernelUnavailableWarning(RuntimeWarning):
    """The native batch-norm/pool kernel could not be built here; torch's operators run instead."""


class NoBF16UnitsWarning(RuntimeWarning):
    """precision="bf16" on a CPU without bf16 arithmetic units: it runs, emulated, slower than fp32."""


#: /proc/cpuinfo flags of CPU bf16 arithmetic (x86: AVX512-BF16, AMX; Arm: BF16)
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 arithmetic units (its /proc/cpuinfo flags; False where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return any(flag in line.split() for flag in BF16_FLAGS)
    except OSError:
        pass
    return False


_warned_bf16 = False


def warn_if_no_bf16_units() -> None:
    """Warn once per process if this CPU has no bf16 units (precision="bf16" then gives no speed-up)."""
    global _warned_bf16
    if not _warned_bf16 and not cpu_has_bf16_units():
        _warned_bf16 = True
        warnings.warn("nos_gym: precision='bf16' on a CPU without bf16 units (AVX512-BF16/AMX): oneDNN emulates "
                      "bfloat16 there, which is slower than fp32; use precision='fp32' on this machine",
                      NoBF16UnitsWarning, stacklevel=3)


def _setup(lib: ctypes.CDLL, path: Path) -> None:
    if lib.nos_child_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.nos_child_abi_version()}, expected {ABI_VERSION}")
    p, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.nos_bn_pool_forward.argtypes = [p, i32, i64, i64, i64, i64, p, p, p, p, f64, f64, i32, p, p, p, p, p]
    lib.nos_bn_pool_forward.restype = i32
    lib.nos_bn_pool_backward.argtypes = [p, p, p, p, p, i32, i64, i64, i64, i64, p, p, p, p, p, p]
    lib.nos_bn_pool_backward.restype = i32


#: the kernel: ``library(arch)`` is the loaded library or None (``nos_gym.engine.native.NativeLibrary``)
library = NativeLibrary(SOURCE, _setup, ChildKernelUnavailableWarning,
                        "torch's operators run the child's batch norm + pool + ReLU instead (slower on CPU; scores "
                        "differ by float rounding, under another fingerprint)", EXTRA_FLAGS)


def available() -> bool:
    """Whether the native kernel runs here (builds it on first call)."""
    return library() is not None


def bn_relu_pool_reference(z: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
                           training: bool, momentum: float, eps: float) -> Tensor:
    """``relu(max_pool2d(batch_norm(z), 2))`` with torch's operators (max-pool before ReLU: they commute)."""
    h = F.batch_norm(z, running_mean, running_var, gamma, beta, training=training, momentum=momentum, eps=eps)
    return F.relu(F.max_pool2d(h, 2))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _BNReluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
                training: bool, momentum: float, eps: float, arch: str) -> Tensor:
        lib = library(arch)
        n, c, h, w = z.shape
        z = z.contiguous(memory_format=torch.channels_last)
        gamma, beta = gamma.detach().float().contiguous(), beta.detach().float().contiguous()

        def pooled(dtype: torch.dtype) -> Tensor:
            return torch.empty((n, c, h // 2, w // 2), dtype=dtype, memory_format=torch.channels_last)

        out = pooled(z.dtype)
        argmax, zsel = (pooled(torch.uint8), pooled(z.dtype)) if training else (None, None)
        mean, invstd = (torch.empty(c), torch.empty(c)) if training else (None, None)
        rc = lib.nos_bn_pool_forward(z.data_ptr(), _DTYPES[z.dtype], n, h, w, c, gamma.data_ptr(), beta.data_ptr(),
                                     _ptr(running_mean), _ptr(running_var), float(momentum), float(eps),
                                     int(training), out.data_ptr(), _ptr(argmax), _ptr(zsel), _ptr(mean),
                                     _ptr(invstd))
        if rc != 0:
            raise RuntimeError(f"nos_bn_pool_forward rejected its arguments (code {rc})")
        if training:
            ctx.save_for_backward(z, out, argmax, zsel, gamma, mean, invstd)
        ctx.arch = arch
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.saved_tensors:
            raise RuntimeError("the native batch-norm/pool kernel has no backward in eval mode")
        z, out, argmax, zsel, gamma, mean, invstd = ctx.saved_tensors
        n, c, h, w = z.shape
        grad_out = grad_out.to(z.dtype).contiguous(memory_format=torch.channels_last)
        grad_z = torch.empty_like(z, memory_format=torch.channels_last)
        grad_gamma, grad_beta = torch.empty(c), torch.empty(c)
        rc = library(ctx.arch).nos_bn_pool_backward(
            z.data_ptr(), out.data_ptr(), argmax.data_ptr(), zsel.data_ptr(), grad_out.data_ptr(), _DTYPES[z.dtype],
            n, h, w, c, gamma.data_ptr(), mean.data_ptr(), invstd.data_ptr(), grad_z.data_ptr(),
            grad_gamma.data_ptr(), grad_beta.data_ptr())
        if rc != 0:
            raise RuntimeError(f"nos_bn_pool_backward rejected its arguments (code {rc})")
        return grad_z, grad_gamma, grad_beta, None, None, None, None, None, None


def native_applies(z: Tensor) -> bool:
    """Whether ``bn_relu_pool`` runs the native kernel for ``z`` (CPU, float32/bfloat16, even sizes, built)."""
    return (z.device.type == "cpu" and z.dtype in _DTYPES and z.dim() == 4 and z.shape[2] % 2 == 0
            and z.shape[3] % 2 == 0 and z.shape[2] >= 2 and z.shape[3] >= 2 and available())


def bn_relu_pool(z: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor, *,
                 training: bool, momentum: float = 0.1, eps: float = 1e-5, native: bool | None = None,
                 arch: str = "native") -> Tensor:
    """``relu(max_pool2d(batch_norm(z, ...), 2))`` for z (N, C, H, W); returns (N, C, H/2, W/2).

    Training mode uses the batch's statistics and updates ``running_mean``/``running_var``
    in place; eval mode uses them. ``native``: None picks the native kernel where it applies
    (``native_applies``), True requires it, False runs torch's operators.
    """
    use = native_applies(z) if native is None else native
    if not use:
        return bn_relu_pool_reference(z, gamma, beta, running_mean, running_var, training, momentum, eps)
    if z.device.type != "cpu" or z.dtype not in _DTYPES:
        raise ValueError(f"the native kernel takes float32/bfloat16 CPU tensors, got {z.dtype} on {z.device}")
    if running_mean.dtype != torch.float32 or not running_mean.is_contiguous() or not running_var.is_contiguous():
        raise ValueError("running statistics must be contiguous float32 tensors")
    return _BNReluPool.apply(z, gamma, beta, running_mean, running_var, bool(training), float(momentum), float(eps),
                             arch)
