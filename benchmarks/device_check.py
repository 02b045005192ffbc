"""Correctness on an accelerator, before its speed figures are worth anything (issues 3, 4).

The CPU test suite checks these on CPU; a GPU machine runs them here first, on random
images of CIFAR-10's shapes (the machine has no data, and equality needs none):

1. ``BatchedRule`` (the batched executor) == ``NOSOptimizer`` (the per-tensor executor) on
   48 random deterministic rules, fp32, on the device;
2. the grouped network trains B = 4 children as training each alone does (fp32);
3. the GPU path (bf16 autocast + channels_last) runs, keeps weights fp32 and stays near fp32.

It prints one PASS/FAIL line per check and exits 1 if any failed.

    python benchmarks/device_check.py --device cuda
    python benchmarks/device_check.py --device cpu        # the dry run, on any machine
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable

import torch

from nos_gym.data import synthetic_cifar10
from nos_gym.dsl import Masker, get_space, parse
from nos_gym.engine.rules import BatchedRule
from nos_gym.optim import NOSOptimizer
from nos_gym.tasks.convnet import train_child
from nos_gym.tasks.convnet.grouped import train_children


def check_executors_agree(device: torch.device) -> str:
    programs = Masker(get_space("extended"), 2).sample_many(48, seed=5, distinct=True, deterministic=True)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(len(programs), 3, 7, generator=gen).to(device)

    def grad_of(w: torch.Tensor) -> torch.Tensor:
        return 2 * w + 1.5 * torch.sin(3 * w)

    rule, w = BatchedRule(programs, device=device), w0.clone()
    state = rule.init(w)
    for _ in range(15):
        d, state = rule.update(state, grad_of(w), w)
        w = w - 1e-2 * d
    worst = 0.0
    for i, p in enumerate(programs):
        v = w0[i].clone().requires_grad_(True)
        opt = NOSOptimizer([v], rule=p, lr=1e-2)
        for _ in range(15):
            v.grad = grad_of(v.detach())
            opt.step()
        a, b = v.detach(), w[i]
        both = torch.isfinite(a) & torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            raise AssertionError(f"{p.format()}: finite in one executor only")
        # fp32, 15 steps; a GPU's exp/log/FMA round differently from a CPU's
        err = float(((a - b).abs() / (b.abs() + 1e-3))[both].max()) if both.any() else 0.0
        worst = max(worst, err)
        if err > 1e-3:
            raise AssertionError(f"{p.format()}: relative difference {err:.2e}")
    return f"48 rules x 15 steps, worst relative difference {worst:.1e}"


def check_grouped_equals_alone(device: torch.device) -> str:
    data = synthetic_cifar10(device, train=500, val=200, test=1, seed=1)
    programs = [parse("ADAM"), parse("g"), parse("g * exp(sign(g) * sign(m))"), parse("RMSProp")]
    lrs = [1e-3, 1e-2, 1e-2, 1e-3]
    group = train_children(programs, lrs, data.train, data.val, epochs=1, batch_size=50)
    worst = 0.0
    for i, (p, lr) in enumerate(zip(programs, lrs)):
        alone, net = train_child(p, lr, data.train, data.val, epochs=1, batch_size=50)
        err = float((net.flat() - group.net.flat[i].detach()).abs().mean() / net.flat().abs().mean())
        worst = max(worst, err)
        if err >= 1e-2 or abs(alone.loss - float(group.loss[i])) >= 1e-2 * alone.loss:
            raise AssertionError(f"{p.format()}: grouped vs alone weights differ by {err:.2e}")
    return f"B=4, 10 steps, worst relative weight difference {worst:.1e}"


def check_bf16_path(device: torch.device) -> str:
    data = synthetic_cifar10(device, train=400, val=200, test=1, seed=2)
    args = ([parse("ADAM"), parse("g")], [1e-3, 1e-2], data.train, data.val)
    fp32 = train_children(*args, epochs=1, batch_size=50)
    bf16 = train_children(*args, epochs=1, batch_size=50, precision="bf16")
    if bf16.net.flat.dtype != torch.float32 or bf16.diverged.any():
        raise AssertionError("bf16 run diverged or changed the weights' dtype")
    gap = float(((bf16.loss - fp32.loss).abs() / fp32.loss).max())
    if gap > 0.05:
        raise AssertionError(f"bf16 loss {bf16.loss.tolist()} vs fp32 {fp32.loss.tolist()}")
    return f"bf16 vs fp32 final loss within {gap:.1%}"


CHECKS: dict[str, Callable[[torch.device], str]] = {
    "batched executor == NOSOptimizer": check_executors_agree,
    "grouped training == one by one": check_grouped_equals_alone,
    "bf16 + channels_last path": check_bf16_path,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch {torch.__version__}")
    failed = 0
    for label, check in CHECKS.items():
        t0 = time.perf_counter()
        try:
            detail = check(device)
            print(f"PASS  {label}: {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:  # report every check, then fail
            failed += 1
            print(f"FAIL  {label}: {exc}", flush=True)
            traceback.print_exc()
    print(f"{len(CHECKS) - failed} of {len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
