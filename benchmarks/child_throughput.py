"""Speed of child training, side by side in one run (issue 4).

(a) trainer: child-images per second and the derived seconds per candidate of the
    "paper" protocol (7 rates x 10,000 + 5 x 45,000 = 295,000 child-images), for
    - the naive loop: one ``ChildNet`` at a time with ``NOSOptimizer`` (plain PyTorch, fp32);
    - the batched trainer: B children as one grouped network (``train_children``), the
      children being whole learning-rate sweeps (B = 7 x rules), bf16 + channels_last on GPU.
    GPU goals: >= 25x the naive loop and <= 0.3 s per candidate.
(b) pool (CPU): candidates per second of the "ci" protocol, serial (this process, with
    one torch thread and with torch's default threads) vs the process pool (one worker per
    core, one torch thread each), all warm. CPU goal: the pool >= 1.8x the better serial.

On CPU, (a) runs with one torch thread (``--threads``): small convolutions scale badly
over threads, and the pool's workers use one each.

    python benchmarks/child_throughput.py --quick            # CPU, about a minute
    python benchmarks/child_throughput.py                    # bigger sizes; on a GPU it uses it
    python benchmarks/child_throughput.py --device cuda --groups 7 112 448 896
    python benchmarks/child_throughput.py --device cuda --random-data --only trainer   # no data there
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from nos_gym.data import load_cifar10, synthetic_cifar10
from nos_gym.dsl import parse
from nos_gym.evaluation import Evaluator
from nos_gym.evaluation.backends import cpu_count
from nos_gym.optim import table1
from nos_gym.tasks.convnet import PAPER_LRS, PRESETS, train_child
from nos_gym.tasks.grouped import train_children

PAPER_IMAGES = PRESETS["paper"].child_images  # 295,000
# deterministic Table 1 rules: a realistic mix of operands for the batched rule compiler
RULES = [parse(table1()[name]) for name in ("sgd", "adam", "rmsprop", "powersign", "m_expv", "adam_expm",
                                             "g_minus_clipg2", "optimizer_1")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_rate(data, device: torch.device, children: int, images: int) -> float:
    """Child-images/s of the one-child-at-a-time loop over ``children`` (rule, rate) pairs."""
    train, val = data.train.take(images), data.val.take(100)
    train_child(RULES[0], 1e-3, train.take(200), val, epochs=1, batch_size=100)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for i in range(children):
        train_child(RULES[i % len(RULES)], PAPER_LRS[i % 7], train, val, epochs=1, batch_size=100)
    _sync(device)
    return children * (images // 100) * 100 / (time.perf_counter() - t0)


def batched_rate(data, device: torch.device, children: int, images: int, precision: str) -> float:
    """Child-images/s of one grouped network of ``children`` = whole sweeps of 7 rates per rule."""
    rules = [RULES[(i // 7) % len(RULES)] for i in range(children)]
    lrs = [PAPER_LRS[i % 7] for i in range(children)]
    train, val = data.train.take(images), data.val.take(100)
    train_children(rules, lrs, train.take(200), val, epochs=1, batch_size=100, precision=precision)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    res = train_children(rules, lrs, train, val, epochs=1, batch_size=100, precision=precision)
    _sync(device)
    return res.child_images / (time.perf_counter() - t0)


def serial_rate(timed: list, warm: list, threads: int) -> float:
    torch.set_num_threads(threads)
    with Evaluator("convnet-cifar10", backend="serial", preset="ci", device="cpu") as ev:
        ev.evaluate(warm[:1])
        t0 = time.perf_counter()
        ev.evaluate(timed)
        return len(timed) / (time.perf_counter() - t0)


def pool_rates(candidates: int, workers: int, default_threads: int) -> tuple[float, float, float, float]:
    """Candidates/s of the "ci" protocol on the same Table 1 rules: serial vs a warm process pool.

    Each side warms up on other rules (data loaded, workers started), then times
    ``candidates`` rules it has not seen. Returns serial (1 thread), serial (default
    threads), pool candidates/s, and the pool's start-up seconds.
    """
    rules = [parse(rule) for rule in table1().values()]
    if candidates + workers > len(rules):
        raise ValueError(f"at most {len(rules) - workers} candidates (Table 1 has {len(rules)} distinct rules)")
    timed, warm = rules[:candidates], rules[candidates:candidates + workers]
    serial1 = serial_rate(timed, warm, 1)
    serial_n = serial_rate(timed, warm, default_threads)
    with Evaluator("convnet-cifar10", backend="process", workers=workers, preset="ci", device="cpu") as ev:
        t0 = time.perf_counter()
        ev.evaluate(warm)  # one per worker
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev.evaluate(timed)
        pool = candidates / (time.perf_counter() - t0)
    return serial1, serial_n, pool, startup


def trainer_table(device: torch.device, images: int, naive_children: int, groups: list[int], precision: str,
                  data_dir: str | None = None, random_data: bool = False) -> None:
    # random pixels train exactly as fast as real ones: a machine without the data can time it
    data = (synthetic_cifar10(device, train=max(images, 200), val=100, test=1) if random_data
            else load_cifar10(data_dir, device=device))
    if random_data:
        print("data: random images of CIFAR-10's shapes (--random-data): speed only")
    naive = naive_rate(data, device, naive_children, images)
    rows = [("naive loop: ChildNet + NOSOptimizer (fp32)", 1, naive)]
    for b in groups:
        rows.append((f"batched: grouped net ({precision}, channels_last)", b,
                     batched_rate(data, device, b, images, precision)))
    print(f"\n(a) child training, {images:,} images per child, batch 100, {device}")
    print(f"{'trainer':<48} {'children':>8} {'child-img/s':>12} {'x naive':>8} {'s/candidate':>12}")
    for label, b, rate in rows:
        print(f"{label:<48} {b:>8} {rate:>12,.0f} {rate / naive:>7.1f}x {PAPER_IMAGES / rate:>12.2f}")
    print(f"s/candidate = {PAPER_IMAGES:,} child-images of the paper protocol / rate "
          f"(GPU goals: >= 25x naive, <= 0.3 s)")


def pool_table(candidates: int, default_threads: int) -> None:
    workers = cpu_count()
    serial1, serial_n, pool, startup = pool_rates(candidates, workers, default_threads)
    best = max(serial1, serial_n)
    ci = PRESETS["ci"].child_images
    print(f"\n(b) evaluation pool, 'ci' protocol ({ci:,} child-images per candidate), {candidates} candidates, warm")
    print(f"{'backend':<48} {'cand/s':>8} {'child-img/s':>12} {'x serial':>9} {'s/candidate':>12}")
    for label, rate in [("serial (1 torch thread)", serial1),
                        (f"serial ({default_threads} torch threads, torch's default)", serial_n),
                        (f"process pool ({workers} workers x 1 thread)", pool)]:
        print(f"{label:<48} {rate:>8.3f} {rate * ci:>12,.0f} {rate / best:>8.2f}x {PAPER_IMAGES / (rate * ci):>12.1f}")
    print(f"x serial: against the faster serial row. Pool start-up (spawn, import, data) with its first "
          f"{workers} candidates: {startup:.1f}s. CPU goal: pool >= 1.8x serial.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small CPU settings (about a minute)")
    ap.add_argument("--images", type=int, help="training images per child in (a)")
    ap.add_argument("--naive-children", type=int, help="children trained one by one in (a)")
    ap.add_argument("--groups", type=int, nargs="+", help="children per grouped network in (a)")
    ap.add_argument("--candidates", type=int, help="candidates per side in (b) (CPU only)")
    ap.add_argument("--threads", type=int, help="torch threads for (a) (default: 1 on CPU)")
    ap.add_argument("--only", choices=["trainer", "pool"], help="run only (a) or only (b)")
    ap.add_argument("--data-dir", help="CIFAR-10 root (default: nos_gym.data's search path)")
    ap.add_argument("--random-data", action="store_true",
                    help="(a) on random images of CIFAR-10's shapes: for a machine without the data")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    images = args.images or (500 if args.quick else (5_000 if gpu else 2_000))
    naive_children = args.naive_children or (3 if args.quick else (21 if gpu else 7))
    groups = args.groups or ([7, 896] if args.quick and gpu else [7, 112, 448, 896] if gpu else
                             [7, 14] if args.quick else [7, 14, 28])
    candidates = args.candidates or (6 if args.quick else 12)
    precision = "bf16" if gpu else "fp32"
    default_threads = torch.get_num_threads()
    threads = args.threads or (default_threads if gpu else 1)
    torch.set_num_threads(threads)
    name = (torch.cuda.get_device_name(device) if gpu else
            f"{platform.machine()} CPU ({default_threads} cores visible to torch), (a) at {threads} torch thread(s)")
    print(f"machine: {name}; torch {torch.__version__}; device {device}; "
          f"load average at start {os.getloadavg()[0]:.1f} (other work on the machine slows every row)")

    if args.only != "pool":
        trainer_table(device, images, naive_children, groups, precision, args.data_dir, args.random_data)
    if not gpu and args.only != "trainer":
        pool_table(candidates, default_threads)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
