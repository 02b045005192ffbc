"""Speed of the child's real scoring path: a profile, and this code against an older commit.

What is timed is ``ConvNetTask.evaluate([rule])`` -- sweep, rate choice, final training and
validation, everything a rule's score costs after the Evaluator's cache and probe -- for one
rule (Adam), one process, one torch thread, on the protocols the project scores with:

- ``cpu``: ``{preset: cpu, schedule: halving}``, the search and NOS-Bench protocol;
- ``fast``: the ``fast`` preset (fixed sweep), the promotion and seed-check protocol.

Parts (``--only`` picks one):

1. ``profile``: where one evaluation's time goes -- data (minibatches gathered from inputs
   normalised once per worker; in the old code, uint8 to float and normalisation per minibatch),
   forward, backward, the rule's update (``BatchedRule``, the child's weights at every rate),
   validation, and the rest (Python, bookkeeping, minibatch indexing) -- for the old and the
   new code, with the convolutions' share of forward and backward (torch.profiler), the
   FLOPs per image (from the layer shapes) and this core's measured matmul peak.
2. ``compare``: child-images per second per core, old code vs new (fp32, and bf16 where
   asked), interleaved: each round runs every variant once, in turn, in its own warm worker
   process (the old code is ``git archive``d from ``--baseline`` into a temporary folder).
   Prints min and median over the rounds and the ratios to the old code. ``--also REV`` adds
   commit REV at the same precisions, to isolate what the changes since REV gained.
3. ``pool``: the same with two worker processes per variant running at once, as the
   Evaluator's process pool does on two cores; images per second per core.
4. ``block``: the native batch-norm/pool block alone (this code), fp32 against bf16, at both
   of the child's block sizes (batch 50, 32 channels, 32x32 and 16x16), forward and forward +
   backward, interleaved: what the block gains from bf16 storage.
5. ``trainer``: the GPU table (``--device cuda``): grouped children per second against the
   naive one-child loop (``benchmarks/device_check.sh`` runs it).

    python benchmarks/child_throughput.py                          # parts 1-3 on the CPU (~20 min)
    python benchmarks/child_throughput.py --only compare --rounds 5 --presets cpu
    python benchmarks/child_throughput.py --only compare --presets cpu --also HEAD~3   # + what HEAD~3 ran at
    python benchmarks/child_throughput.py --quick                  # "ci" protocol, 2 rounds: does it run
    python benchmarks/child_throughput.py --only block            # the block alone, fp32 vs bf16 (~1 min)
    python benchmarks/child_throughput.py --only trainer --device cuda --random-data

Run it on a quiet machine: it prints the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the commit before the child-speed work (issue 20): the default "old code"
BASELINE = "2fb49df"
RULE = "ADAM"
PROTOCOLS = {"cpu": ("cpu", {"schedule": "halving"}), "fast": ("fast", {}), "ci": ("ci", {})}


# ----------------------------------------------------------------------------- FLOPs
def flops_per_image(filters: int = 32) -> tuple[int, int]:
    """(training, validation) FLOPs of one child-image: multiply-adds x 2 of the convolutions and
    the linear layer, forward (and backward: conv1's weight gradient only, since the images need
    none; conv2's and the linear layer's input and weight gradients). Batch norm, pooling, ReLU and
    the loss are a few FLOPs per activation and left out."""
    f = filters
    conv1 = 2 * f * 3 * 9 * 32 * 32
    conv2 = 2 * f * f * 9 * 16 * 16
    fc = 2 * f * 8 * 8 * 10
    forward = conv1 + conv2 + fc
    backward = conv1 + 2 * conv2 + 2 * fc
    return forward + backward, forward


def matmul_peak(dtype_name: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n matmul on this process's torch threads: the core's practical peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ----------------------------------------------------------------------------- worker side
def _task(spec: dict):
    from nos_gym.tasks.convnet import ConvNetTask

    preset, overrides = PROTOCOLS[spec["protocol"]]
    return ConvNetTask(preset, device="cpu", precision=spec["precision"], **overrides)


def _profile(task, rule) -> dict:
    """Phase times of one ``task.evaluate([rule])`` (wall-clock timers around the pieces) and the
    convolutions' share of forward + backward (torch.profiler, a second evaluation)."""
    import importlib

    import torch

    def module(*names):  # the first that imports: the old code (--baseline) has the flat layout
        for name in names:
            try:
                return importlib.import_module(name)
            except ImportError:
                continue
        raise ImportError(f"none of {names} imports from this code")

    rules = module("nos_gym.engine.rules", "nos_gym.rules")
    grouped = module("nos_gym.tasks.convnet.grouped", "nos_gym.tasks.grouped")

    times = {k: 0.0 for k in ("data", "forward", "backward", "rule update", "validation")}
    counts = {"validation images": 0}
    state = {"in_validation": False}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if state["in_validation"] and name != "validation":
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            if name == "validation":
                state["in_validation"] = True
                counts["validation images"] += args[0].children_count * len(args[1])
            try:
                return fn(*args, **kwargs)
            finally:
                if name == "validation":
                    state["in_validation"] = False
                times[name] += time.perf_counter() - t0
        return wrapper

    # data: the gather from inputs prepared once (this code), or the uint8 minibatch's conversion (old code)
    data_fn = "input_batch" if hasattr(grouped, "input_batch") else "normalize"
    patches = [(grouped, data_fn, timed("data", getattr(grouped, data_fn))),
               (grouped, "evaluate_children", timed("validation", grouped.evaluate_children)),
               (grouped.GroupedConvNet, "forward", timed("forward", grouped.GroupedConvNet.forward)),
               (rules.BatchedRule, "update", timed("rule update", rules.BatchedRule.update)),
               (torch.Tensor, "backward", timed("backward", torch.Tensor.backward))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    try:
        t0 = time.perf_counter()
        result = task.evaluate([rule])[0]
        total = time.perf_counter() - t0
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    times["other"] = total - sum(times.values())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        task.evaluate([rule])
    conv = sum(e.self_cpu_time_total for e in prof.key_averages() if "convolution" in e.key)
    # the native batch-norm/pool block's autograd Function, forward and backward (none in code before it)
    block = sum(e.self_cpu_time_total for e in prof.key_averages() if "BNReluPool" in e.key)
    every = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {"total": total, "phases": times, "train images": result.metrics["child_images"],
            "validation images": counts["validation images"], "conv share of op time": conv / every,
            "block share of op time": block / every}


def worker(spec_json: str) -> None:
    """A warm worker: reads commands ("run", "profile", "quit") on stdin, answers JSON lines."""
    import torch

    torch.set_num_threads(1)
    import nos_gym
    from nos_gym.dsl import parse

    spec = json.loads(spec_json)
    task, rule = _task(spec), parse(spec["rule"])
    task.evaluate([parse("g")])  # warm: data, kernels built, caches filled
    print(json.dumps({"ready": True, "nos_gym": str(Path(nos_gym.__file__).parent)}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "profile":
            print(json.dumps(_profile(task, rule)), flush=True)
            continue
        t0 = time.perf_counter()
        res = task.evaluate([rule])[0]
        print(json.dumps({"seconds": time.perf_counter() - t0, "images": res.metrics["child_images"],
                          "reward": res.reward}), flush=True)


# ----------------------------------------------------------------------------- driver side
class Worker:
    """One warm worker process running ``code`` (a folder holding ``nos_gym``) with ``spec``."""

    def __init__(self, code: Path, spec: dict):
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "NOS_GYM_DATA": _data_root()}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(code))
        self.hello = self.read()
        if Path(self.hello["nos_gym"]).resolve().parent != code.resolve():
            raise RuntimeError(f"the worker imported nos_gym from {self.hello['nos_gym']}, not from {code}")

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: str) -> dict:
        self.send(cmd)
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            self.proc.wait(timeout=60)


def _data_root() -> str:
    """Where this checkout finds CIFAR-10, for workers whose code lives elsewhere (the old code's copy)."""
    from nos_gym.data import find_cifar10

    return str(find_cifar10(None))


def baseline_code(rev: str, into: Path) -> Path:
    """The ``nos_gym`` package of commit ``rev`` (``git archive``), unpacked under ``into``."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "nos_gym"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"error: cannot read commit {rev!r} of {ROOT} with git ({err}); run this from a clone of "
                         "nos-gym, or pass --baseline REV") from err
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _stats(xs: list[float]) -> str:
    return f"{min(xs):>8,.0f} {statistics.median(xs):>8,.0f}"


def compare(variants: dict[str, tuple[Path, str]], protocols: list[str], rounds: int, per_variant: int = 1) -> dict:
    """Child-images/s per core of each variant on each protocol, ``rounds`` interleaved rounds;
    ``per_variant`` workers of a variant run at once (2: the process pool on two cores)."""
    out = {}
    for protocol in protocols:
        workers = {name: [Worker(code, {"protocol": protocol, "precision": precision, "rule": RULE})
                          for _ in range(per_variant)] for name, (code, precision) in variants.items()}
        rates: dict[str, list[float]] = {name: [] for name in variants}
        rewards: dict[str, float] = {}
        try:
            for r in range(rounds):
                for name, ws in workers.items():
                    t0 = time.perf_counter()
                    for w in ws:
                        w.send("run")
                    answers = [w.read() for w in ws]
                    wall = time.perf_counter() - t0
                    images = sum(a["images"] for a in answers)
                    rates[name].append(images / wall / per_variant)
                    rewards[name] = answers[0]["reward"]
                print(f"  {protocol} round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()),
                      flush=True)
        finally:
            for ws in workers.values():
                for w in ws:
                    w.close()
        out[protocol] = {"rates": rates, "rewards": rewards}
    return out


def print_compare(title: str, results: dict, old: str) -> None:
    print(f"\n{title}")
    print(f"{'protocol':<6} {'variant':<12} {'min img/s':>9} {'median':>8} {'x old (min)':>11} {'x old (median)':>14} "
          f"{'reward':>7}")
    for protocol, res in results.items():
        rates, base = res["rates"], res["rates"][old]
        for name, xs in rates.items():
            print(f"{protocol:<6} {name:<12} {_stats(xs)} {min(xs) / min(base):>10.2f}x "
                  f"{statistics.median(xs) / statistics.median(base):>13.2f}x {res['rewards'][name]:>7.4f}")


def print_profiles(profiles: dict[str, dict], peak32: float, peak16: float | None) -> None:
    train_flops, val_flops = flops_per_image()
    print(f"\n(1) profile: one evaluation of {RULE}, one process, one thread (wall-clock timers around each piece)")
    print(f"FLOPs per child-image: {train_flops / 1e6:.2f} M training (forward + backward), "
          f"{val_flops / 1e6:.2f} M validation (forward); this core's matmul peak: {peak32:.0f} GFLOP/s fp32"
          + (f", {peak16:.0f} GFLOP/s bf16" if peak16 else ""))
    phases = ["data", "forward", "backward", "rule update", "validation", "other"]
    print(f"{'variant':<20} {'total s':>7} " + " ".join(f"{p:>11}" for p in phases) + f" {'conv share':>10} "
          f"{'block share':>11} {'GFLOP/s':>8} {'of peak':>7}")
    for name, p in profiles.items():
        t = p["total"]
        gflops = (p["train images"] * train_flops + p["validation images"] * val_flops) / t / 1e9
        peak = peak16 if "bf16" in name and peak16 else peak32
        print(f"{name:<20} {t:>7.2f} " + " ".join(f"{p['phases'][k] / t:>10.0%} " for k in phases)
              + f"{p['conv share of op time']:>10.0%} {p.get('block share of op time', 0.0):>11.0%} "
              f"{gflops:>8.1f} {gflops / peak:>7.0%}")
    print("Shares of the total wall time; 'other' is the rest (Python, the sweep's bookkeeping, minibatch "
          "indexing, loss); conv share: the convolutions' part of all torch operator time (torch.profiler); block share: the "
          "native batch-norm/pool block's part (forward and backward). "
          "GFLOP/s counts training and validation images.")


def block_table(rounds: int = 7, reps: int = 30, batch: int = 50, channels: int = 32) -> None:
    """The native block alone: fp32 against bf16 storage, interleaved, one thread; medians in ms."""
    import torch

    from nos_gym.tasks.convnet.native import available, bn_relu_pool

    if not available():
        raise SystemExit("error: the native block is not built on this machine (see ChildKernelUnavailableWarning)")
    torch.set_num_threads(1)
    cases = {}
    for name, hw in (("block 1 (32x32)", 32), ("block 2 (16x16)", 16)):
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            z = torch.randn(batch, channels, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
            z = z.to(dtype).requires_grad_(True)
            gamma, beta = torch.ones(channels, requires_grad=True), torch.zeros(channels, requires_grad=True)
            mean, var = torch.zeros(channels), torch.ones(channels)
            grad = torch.randn(batch, channels, hw // 2, hw // 2, generator=gen)
            grad = grad.contiguous(memory_format=torch.channels_last).to(dtype)

            def forward(z=z, gamma=gamma, beta=beta, mean=mean, var=var):
                return bn_relu_pool(z, gamma, beta, mean, var, training=True, native=True)

            def both(forward=forward, z=z, gamma=gamma, beta=beta, grad=grad):
                torch.autograd.grad(forward(), (z, gamma, beta), grad)

            cases[(name, str(dtype).removeprefix("torch."))] = (forward, both)
    times = {key: ([], []) for key in cases}
    for _forward, both in cases.values():  # warm
        for _ in range(5):
            both()
    for _ in range(rounds):
        for key, (forward, both) in cases.items():
            for i, fn in enumerate((forward, both)):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times[key][i].append((time.perf_counter() - t0) / reps * 1e3)
    print(f"\n(4) block: the native batch-norm/pool block alone, batch {batch}, {channels} channels, one thread, "
          f"{rounds} interleaved rounds of {reps} calls (training mode; median ms per call)")
    print(f"{'block':<16} {'storage':<9} {'forward':>8} {'fwd+bwd':>8} {'backward':>9}")
    for (name, dtype), (fwd, both) in times.items():
        f, b = statistics.median(fwd), statistics.median(both)
        print(f"{name:<16} {dtype:<9} {f:>8.3f} {b:>8.3f} {b - f:>9.3f}")
    for name in dict.fromkeys(n for n, _ in times):
        f32, b16 = times[(name, "float32")], times[(name, "bfloat16")]
        print(f"{name}: bf16 is {statistics.median(f32[0]) / statistics.median(b16[0]):.2f}x fp32's speed "
              f"forward, {statistics.median(f32[1]) / statistics.median(b16[1]):.2f}x forward + backward")


def trainer_table(args: argparse.Namespace) -> None:
    """The GPU table: grouped children per second against the naive one-child loop."""
    import torch

    from nos_gym.data import load_cifar10, synthetic_cifar10
    from nos_gym.dsl import parse
    from nos_gym.optim import table1
    from nos_gym.tasks.convnet import PAPER_LRS, PRESETS, train_child
    from nos_gym.tasks.convnet.grouped import train_children

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    rules = [parse(table1()[n]) for n in ("sgd", "adam", "rmsprop", "powersign", "m_expv", "adam_expm")]
    images = args.images or (5_000 if gpu else 500 if args.quick else 1_000)
    data = (synthetic_cifar10(device, train=max(images, 200), val=100, test=1) if args.random_data
            else load_cifar10(args.data_dir, device=device))
    precision = "bf16" if gpu else "fp32"
    train, val = data.train.take(images), data.val.take(100)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    train_child(rules[0], 1e-3, train.take(200), val, epochs=1, batch_size=100)
    sync()
    t0 = time.perf_counter()
    naive_children = 3 if args.quick and not gpu else args.naive_children
    for i in range(naive_children):
        train_child(rules[i % len(rules)], PAPER_LRS[i % 7], train, val, epochs=1, batch_size=100)
    sync()
    naive = naive_children * (images // 100) * 100 / (time.perf_counter() - t0)
    paper = PRESETS["paper"].child_images
    print(f"\n(4) trainer: {images:,} images per child, batch 100, {device}, {precision}")
    print(f"{'trainer':<40} {'children':>8} {'child-img/s':>12} {'x naive':>8} {'s/candidate (paper)':>20}")
    print(f"{'naive loop (ChildNet + NOSOptimizer)':<40} {1:>8} {naive:>12,.0f} {1.0:>7.1f}x {paper / naive:>20.2f}")
    for b in args.groups or ([7, 112, 448, 896] if gpu else [7, 14]):
        progs = [rules[(i // 7) % len(rules)] for i in range(b)]
        lrs = [PAPER_LRS[i % 7] for i in range(b)]
        train_children(progs, lrs, train.take(200), val, epochs=1, batch_size=100, precision=precision)
        sync()
        t0 = time.perf_counter()
        res = train_children(progs, lrs, train, val, epochs=1, batch_size=100, precision=precision)
        sync()
        rate = res.child_images / (time.perf_counter() - t0)
        print(f"{'grouped network':<40} {b:>8} {rate:>12,.0f} {rate / naive:>7.1f}x {paper / rate:>20.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["profile", "compare", "pool", "block", "trainer"], help="run one part")
    ap.add_argument("--baseline", default=BASELINE, help=f"the old code: a commit of this clone (default {BASELINE})")
    ap.add_argument("--also", metavar="REV", help="another commit to run beside the new code, at its precisions "
                    "(what the changes since REV gained)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of compare and pool (default 5)")
    ap.add_argument("--presets", nargs="+", choices=list(PROTOCOLS), help="protocols (default: cpu fast)")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                    help="precisions of the new code (the old code runs fp32)")
    ap.add_argument("--quick", action="store_true", help="the 'ci' protocol, 2 rounds, fp32: a check that it runs")
    ap.add_argument("--device", default="cpu", help="trainer part only: cpu or cuda")
    ap.add_argument("--images", type=int, help="trainer part: training images per child")
    ap.add_argument("--naive-children", type=int, default=7, help="trainer part: children of the naive loop")
    ap.add_argument("--groups", type=int, nargs="+", help="trainer part: children per grouped network")
    ap.add_argument("--random-data", action="store_true", help="trainer part: random CIFAR-shaped images")
    ap.add_argument("--data-dir", help="trainer part: CIFAR-10 root")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    from nos_gym.evaluation.provenance import git_commit

    load0 = os.getloadavg()[0]
    print(f"machine: {platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores); python "
          f"{platform.python_version()}; load average at start {load0:.2f}; "
          f"commit {(git_commit()[0] or 'unknown')[:7]}")
    if args.only == "trainer":
        trainer_table(args)
        return
    if args.only == "block":
        block_table()
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (at the start: {load0:.2f})")
        return
    if args.quick:
        args.presets, args.rounds, args.precisions = args.presets or ["ci"], min(args.rounds, 2), ["fp32"]
    presets = args.presets or ["cpu", "fast"]
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="nos_gym_baseline_") as tmp:
        old_code = baseline_code(args.baseline, Path(tmp))
        variants = {f"old {args.baseline}": (old_code, "fp32")}
        also = baseline_code(args.also, Path(tmp) / "also") if args.also else None
        for precision in args.precisions:
            if also is not None:
                variants[f"{args.also} {precision}"] = (also, precision)
            variants[f"new {precision}"] = (ROOT, precision)
        old = f"old {args.baseline}"
        if args.only in (None, "profile"):
            import torch

            torch.set_num_threads(1)
            from nos_gym.tasks.convnet.native import cpu_has_bf16_units

            peak32 = matmul_peak("float32")
            peak16 = matmul_peak("bfloat16") if "bf16" in args.precisions else None
            profiles = {}
            for protocol in presets:
                for name, (code, precision) in variants.items():
                    w = Worker(code, {"protocol": protocol, "precision": precision, "rule": RULE})
                    try:
                        profiles[f"{protocol} {name}"] = w.ask("profile")
                    finally:
                        w.close()
            print_profiles(profiles, peak32, peak16)
            print(f"bf16 units on this CPU (AVX512-BF16/AMX): {'yes' if cpu_has_bf16_units() else 'no'}")
        if args.only in (None, "compare"):
            print(f"\n(2) compare: {RULE}, one process per variant, one thread, {args.rounds} interleaved rounds")
            results = compare(variants, presets, args.rounds)
            print_compare("child-images per second per core (training images; validation is extra work)", results, old)
        if args.only in (None, "pool"):
            print(f"\n(3) pool: two processes per variant at once (the process pool on two cores), "
                  f"{args.rounds} interleaved rounds")
            pool_presets = [p for p in presets if p != "fast"] or presets
            results = compare(variants, pool_presets, args.rounds, per_variant=2)
            print_compare("child-images per second per core, two workers at once", results, old)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (at the start: {load0:.2f})")


if __name__ == "__main__":
    main()
