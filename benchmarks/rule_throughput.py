"""Speed of the rule compiler, side by side in one run (issue: foundation).

(a) one optimizer step on a ~10M-parameter model: NOSOptimizer running PowerSign's string,
    the dedicated PowerSign class, and torch.optim.Adam(foreach=True). Goal: PowerSign
    within 1.5x of Adam's step time.
(b) 1,024 different random rules: one BatchedRule over (1024, N) stacked parameters vs
    the same rules applied one by one. Goal: >= 20x faster batched.

    python benchmarks/rule_throughput.py            # full sizes
    python benchmarks/rule_throughput.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nos_gym.dsl import Masker, get_space
from nos_gym.optim import NOSOptimizer, PowerSign
from nos_gym.rules import BatchedRule


def _time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` (after warm-up)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def optimizer_steps(n_params: int, repeats: int, device: str) -> list[tuple[str, float]]:
    width = int((n_params / 4) ** 0.5)  # 4 square layers of width^2 weights
    layers = [torch.nn.Linear(width, width) for _ in range(4)]
    model = torch.nn.Sequential(*layers).to(device)
    total = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    rows = []
    for name, make in [
        ("torch.optim.Adam(foreach=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
        ("NOSOptimizer('g * exp(sign(g) * sign(m))')", lambda ps: NOSOptimizer(ps, rule="powersign", lr=1e-3)),
        ("nos_gym.optim.PowerSign", lambda ps: PowerSign(ps, lr=1e-3)),
        ("NOSOptimizer('ADAM')", lambda ps: NOSOptimizer(ps, rule="adam", lr=1e-3)),
    ]:
        opt = make(list(model.parameters()))

        def step(opt=opt):
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()

        rows.append((name, _time(step, repeats)))
    print(f"\n(a) one optimizer step, {total / 1e6:.1f}M parameters, {device}")
    adam = rows[0][1]
    print(f"{'optimizer':<46} {'ms/step':>9} {'x Adam':>8}")
    for name, sec in rows:
        print(f"{name:<46} {sec * 1e3:>9.2f} {sec / adam:>8.2f}")
    return rows


def batched_vs_loop(n_rules: int, n_params: int, steps: int, depth: int, device: str) -> tuple[float, float]:
    programs = Masker(get_space("full"), depth).sample_many(n_rules, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    w0 = torch.randn(n_rules, n_params, device=device)

    def run_batched():
        rule = BatchedRule(programs, generator=gen)
        w = w0.clone()
        state = rule.init(w)
        for _ in range(steps):
            d, state = rule.update(state, w, w)  # gradient of |w|^2 / 2
            w = w - 1e-3 * d
        if device == "cuda":
            torch.cuda.synchronize()

    def run_loop():
        for i, p in enumerate(programs):
            rule = BatchedRule([p], generator=gen)
            w = w0[i : i + 1].clone()
            state = rule.init(w)
            for _ in range(steps):
                d, state = rule.update(state, w, w)
                w = w - 1e-3 * d
        if device == "cuda":
            torch.cuda.synchronize()

    batched = _time(run_batched, repeats=3, warmup=1)
    loop = _time(run_loop, repeats=1, warmup=0)
    return batched, loop


def batched_table(n_rules: int, sizes: list[int], steps: int, depth: int, device: str) -> None:
    print(f"\n(b) {n_rules} different random depth-{depth} rules ('full' space), {steps} steps, {device}")
    print(f"{'params/rule':>11} {'batched s':>10} {'one-by-one s':>13} {'speed-up':>9}")
    for n_params in sizes:
        batched, loop = batched_vs_loop(n_rules, n_params, steps, depth, device)
        print(f"{n_params:>11,} {batched:>10.3f} {loop:>13.3f} {loop / batched:>8.1f}x")
    print("goal: >= 20x. One-by-one cost is per-call overhead (flat in size); batched cost grows with\n"
          "rules x params, so the speed-up is largest for the small per-rule problems of the fast tasks.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device}")
    optimizer_steps(500_000 if args.quick else 10_000_000, repeats=5 if args.quick else 20, device=args.device)
    batched_table(64 if args.quick else 1024, [2, 100] if args.quick else [2, 100, 1000],
                  10 if args.quick else 50, 2, args.device)


if __name__ == "__main__":
    main()
