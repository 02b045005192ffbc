"""Speed of the rule compiler, side by side in one run (issues: foundation, 14).

(a) one optimizer step on 10M parameters, in two layouts: a model's parameters (4 square
    ``nn.Linear`` layers) and 10 tensors of 1M. Rows: torch's Adam (foreach and fused),
    NOSOptimizer running PowerSign's string (foreach and fused paths), the PowerSign and
    AddSign classes and AddSign's string (fused), and every Table 1 rule on the fused path.
    Timing is interleaved: each round steps every optimizer once, in an order rotated by
    one each round (so drifting load from neighbours lands on all rows alike), after a
    ``gc.collect()``; the table gives the min and the median over rounds, and ratios to
    Adam(foreach=True) and Adam(fused=True) from each. Each ``--threads`` value runs in its
    own process. Compile time (the first step) is printed per fused row.
    Goals (issue 14): PowerSign and AddSign <= 0.8x Adam(foreach); every Table 1 rule on
    the fused path <= 1.0x Adam(foreach).
(b) 1,024 different random rules: one BatchedRule over (1024, N) stacked parameters vs
    the same rules applied one by one. Goal: >= 20x faster batched.
(c) BatchedRule's fused path (``fused=True``: one compiled opcode kernel per step,
    ``nos_gym.engine.fused_batched``) vs today's executor (``fused=False``) on the same 1,024 random
    rules x {2, 100, 1,000} parameters (rows of 2 take the per-entry "flat" tables),
    interleaved rounds, min and median per step. Compile time (first use, cold or from
    inductor's disk cache) is printed. Goal (issue 14): >= 2x at 1,000 parameters per rule.

    python benchmarks/rule_throughput.py --threads 1 2      # full sizes, both thread counts
    python benchmarks/rule_throughput.py --quick            # small sizes, a smoke run
    python benchmarks/rule_throughput.py --skip-batched --skip-fused-batched   # part (a) only
    python benchmarks/rule_throughput.py --skip-steps --skip-batched   # part (c) only
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import subprocess
import sys
import time

import torch

from nos_gym.dsl import Masker, get_space
from nos_gym.engine.rules import FUSED_MIN_NUMEL, FUSED_MIN_WIDTH, BatchedRule
from nos_gym.optim import AddSign, NOSOptimizer, PowerSign, table1


def _time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` (after warm-up)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _layout(kind: str, n_params: int, device: str) -> list[torch.nn.Parameter]:
    if kind == "model":
        width = int((n_params / 4) ** 0.5)  # 4 square layers of width^2 weights (+ biases)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(device)
        params = list(model.parameters())
    else:  # 10 equal tensors
        params = [torch.nn.Parameter(torch.randn(n_params // 10, device=device) * 0.1) for _ in range(10)]
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-2
    return params


def optimizer_rows(with_table1: bool = True) -> list[tuple[str, object]]:
    rows = [
        ("torch.optim.Adam(foreach=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
        ("torch.optim.Adam(fused=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        ("NOS('g * exp(sign(g) * sign(m))') foreach",
         lambda ps: NOSOptimizer(ps, rule="powersign", lr=1e-3, fused=False)),
        ("NOS('g * exp(sign(g) * sign(m))') fused",
         lambda ps: NOSOptimizer(ps, rule="powersign", lr=1e-3, fused=True)),
        ("PowerSign class foreach", lambda ps: PowerSign(ps, lr=1e-3, fused=False)),
        ("PowerSign class fused", lambda ps: PowerSign(ps, lr=1e-3, fused=True)),
        ("AddSign class fused", lambda ps: AddSign(ps, lr=1e-3, fused=True)),
        ("NOS('(1 + sign(g) * sign(m)) * g') fused",
         lambda ps: NOSOptimizer(ps, rule="(1 + sign(g) * sign(m)) * g", lr=1e-3, fused=True)),
    ]
    if with_table1:
        for name in table1():
            rows.append((f"table1 {name} fused", lambda ps, n=name: NOSOptimizer(ps, rule=n, lr=1e-3, fused=True)))
    return rows


def optimizer_steps(n_params: int, rounds: int, device: str, layouts=("model", "10x1M"),
                    with_table1: bool = True) -> dict[str, list[tuple[str, float, float]]]:
    """Part (a): per layout, rows of (optimizer, min s, median s) over interleaved rounds."""
    factories = optimizer_rows(with_table1)
    out = {}
    for kind in layouts:
        params = _layout(kind, n_params, device)
        total = sum(p.numel() for p in params)
        opts, compile_s = [], {}
        for name, make in factories:
            opt = make(params)
            start = time.perf_counter()
            opt.step()  # the first step: state allocation, and the compile on the fused path
            compile_s[name] = time.perf_counter() - start
            opt.step()
            opts.append((name, opt))
        samples = {name: [] for name, _ in opts}
        for r in range(rounds):
            order = opts[r % len(opts):] + opts[: r % len(opts)]
            for name, opt in order:
                gc.collect()
                start = time.perf_counter()
                opt.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                samples[name].append(time.perf_counter() - start)
        rows = [(name, min(s), statistics.median(s)) for name, s in samples.items()]
        out[kind] = rows
        _print_rows(kind, total, len(params), rounds, device, rows, compile_s)
        del opts, params
        gc.collect()
    return out


def _print_rows(kind, total, n_tensors, rounds, device, rows, compile_s) -> None:
    adam = {r[0]: r for r in rows}["torch.optim.Adam(foreach=True)"]
    fused = {r[0]: r for r in rows}["torch.optim.Adam(fused=True)"]
    print(f"\n(a) one optimizer step, layout {kind!r}: {total / 1e6:.1f}M parameters in {n_tensors} tensors, "
          f"{device}, {torch.get_num_threads()} threads, {rounds} interleaved rounds")
    print(f"{'optimizer':<44} {'min ms':>8} {'med ms':>8} {'xAdamFE':>8} {'(med)':>6} {'xAdamF':>7} {'1st step s':>10}")
    for name, lo, med in rows:
        print(f"{name:<44} {lo * 1e3:>8.2f} {med * 1e3:>8.2f} {lo / adam[1]:>8.2f} {med / adam[2]:>6.2f} "
              f"{lo / fused[1]:>7.2f} {compile_s[name]:>10.2f}")
    t1 = [(lo / adam[1], med / adam[2], name) for name, lo, med in rows if name.startswith("table1")]
    if t1:
        worst = max(t1)
        print(f"Table 1 on the fused path: max ratio to Adam(foreach) {worst[0]:.2f} (min) / "
              f"{max(t[1] for t in t1):.2f} (median), slowest {worst[2]!r}; goal <= 1.0")
    goal = [name for name, *_ in rows if "Sign" in name or "sign" in name]
    ok = all({r[0]: r for r in rows}[n][1] / adam[1] <= 0.8 for n in goal if "fused" in n)
    print(f"PowerSign/AddSign fused <= 0.8x Adam(foreach) (by min): {'met' if ok else 'NOT met'}")


def descend(rule: BatchedRule, w0: torch.Tensor, steps: int, sync: bool = True) -> None:
    """``steps`` steps of ``rule`` on |w|^2 / 2 (its gradient is w), from ``w0``."""
    w = w0.clone()
    state = rule.init(w)
    for _ in range(steps):
        d, state = rule.update(state, w, w)
        w = w - 1e-3 * d
    if sync and w.device.type == "cuda":
        torch.cuda.synchronize()


def batched_vs_loop(n_rules: int, n_params: int, steps: int, depth: int, device: str) -> tuple[float, float]:
    programs = Masker(get_space("full"), depth).sample_many(n_rules, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    w0 = torch.randn(n_rules, n_params, device=device)

    def run_batched():
        descend(BatchedRule(programs, generator=gen), w0, steps)

    def run_loop():
        for i, p in enumerate(programs):
            descend(BatchedRule([p], generator=gen), w0[i : i + 1], steps, sync=False)
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


def fused_batched_table(n_rules: int, sizes: list[int], steps: int, rounds: int, depth: int, device: str) -> None:
    """Part (c): BatchedRule fused vs today's executor, interleaved rounds of ``steps`` steps."""
    programs = Masker(get_space("full"), depth).sample_many(n_rules, seed=0)
    print(f"\n(c) BatchedRule fused vs today's executor: {n_rules} random depth-{depth} rules ('full' space, "
          f"{sum(p.stochastic for p in programs)} stochastic), float32, {device}, {torch.get_num_threads()} threads, "
          f"{rounds} interleaved rounds of {steps} steps", flush=True)
    print(f"{'params/rule':>11} {'fused min ms':>12} {'med':>7} {'today min ms':>12} {'med':>7} "
          f"{'speed-up min':>12} {'med':>5} {'1st use s':>9}")

    for n_params in sizes:
        w0 = torch.randn(n_rules, n_params, device=device, generator=torch.Generator(device=device).manual_seed(0))
        rules = {"fused": BatchedRule(programs, seed=0, fused=True), "today": BatchedRule(programs, seed=0, fused=False)}
        start = time.perf_counter()
        descend(rules["fused"], w0, 1)  # compiles (or loads inductor's cached build)
        first = time.perf_counter() - start
        descend(rules["today"], w0, 2)
        descend(rules["fused"], w0, 2)
        samples = {k: [] for k in rules}
        for r in range(rounds):
            for k in (("fused", "today") if r % 2 == 0 else ("today", "fused")):
                gc.collect()
                start = time.perf_counter()
                descend(rules[k], w0, steps)
                samples[k].append((time.perf_counter() - start) / steps)
        f, t = samples["fused"], samples["today"]
        print(f"{n_params:>11,} {min(f) * 1e3:>12.3f} {statistics.median(f) * 1e3:>7.3f} {min(t) * 1e3:>12.3f} "
              f"{statistics.median(t) * 1e3:>7.3f} {min(t) / min(f):>11.2f}x {statistics.median(t) / statistics.median(f):>4.2f}x "
              f"{first:>9.1f}", flush=True)
    print(f"goal: >= 2x at 1,000 parameters per rule (fused=True was used; fused=None picks it for rows of >= "
          f"{FUSED_MIN_WIDTH}\nnumbers in batches of >= {FUSED_MIN_NUMEL:,} entries, where a compile of seconds pays back)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch CPU threads; several values run one process each (default: torch's)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds in (a) (default 15; 5 quick)")
    parser.add_argument("--params", type=int, default=None, help="parameters in (a) (default 10M; 500k quick)")
    parser.add_argument("--no-table1", action="store_true", help="(a) without the Table 1 rows")
    parser.add_argument("--skip-batched", action="store_true", help="without part (b)")
    parser.add_argument("--skip-steps", action="store_true", help="part (b) only")
    parser.add_argument("--skip-fused-batched", action="store_true", help="without part (c)")
    args = parser.parse_args()
    if args.threads and len(args.threads) > 1:  # one process per thread count: nothing carries over
        rest = sys.argv[1:]
        i = rest.index("--threads")
        j = i + 1
        while j < len(rest) and not rest[j].startswith("--"):
            j += 1
        rest = rest[:i] + rest[j:]
        for n in args.threads:
            subprocess.run([sys.executable, __file__, "--threads", str(n), *rest], check=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads[0])
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device}", flush=True)
    if not args.skip_steps:
        optimizer_steps(args.params or (500_000 if args.quick else 10_000_000),
                        rounds=args.rounds or (5 if args.quick else 15), device=args.device,
                        with_table1=not args.no_table1)
    if not args.skip_batched:
        batched_table(64 if args.quick else 1024, [2, 100] if args.quick else [2, 100, 1000],
                      10 if args.quick else 50, 2, args.device)
    if not args.skip_fused_batched:
        fused_batched_table(64 if args.quick else 1024, [2, 100] if args.quick else [2, 100, 1000],
                            10 if args.quick else 20, 3 if args.quick else 7, 2, args.device)


if __name__ == "__main__":
    main()
