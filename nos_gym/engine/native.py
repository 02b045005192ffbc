"""The native Rosenbrock kernel: the task's whole run in one C++ call, built on first use.

The Rosenbrock task trains ~12,000 independent rows of 2 numbers for 4,000 steps. Torch's
executors (``BatchedRule``, fused or not) run each step as one or more passes over all rows,
so a step has a fixed cost however little work it holds, and every element of the fused
kernel computes every branch. Here (``nos_gym/engine/csrc/rosenbrock_native.cpp``) the time loop
runs *inside* the kernel: a work item (a rule at up to 4 learning rates; a stochastic
rule's draws packed side by side) keeps its state in L1 for all 4,000 steps and is
interpreted from its opcode table (``nos_gym.engine.fused_batched``'s numbering) once per step for
all its lanes, computing only what the rule reads. ``rule_tables`` builds the tables,
``rosenbrock_run`` runs them; ``RosenbrockTask(executor="native")`` is the user.

**Build.** On first use the source is compiled with the system's C++ compiler (``$CXX``,
else ``c++``/``g++``/``clang++``) into a shared library, loaded with ``ctypes`` (no torch
headers, no ninja: ~2 s), and cached under ``$NOS_GYM_CACHE_DIR`` (default
``~/.cache/nos_gym``), keyed by the source, the flags, the compiler and the CPU's
features; concurrent processes build to private names and rename atomically. Flags:
``FLAGS`` and ``-march=native``; never ``-ffast-math``.

**Numbers.** ``+ - * / sqrt``, compares and selects are exactly rounded IEEE operations,
nothing is contracted or reassociated (the multiply-adds that torch's vectorised kernels
fuse are explicit ``std::fma``), and ``exp``/``log`` are the kernel's own (Cody-Waite and
a polynomial, integer bit moves for the exponent; within 1 and 2 ulp), so a rule gets
**the same bits on every x86-64 CPU and vector width** (tests/test_native.py builds the
kernel for SSE2, AVX2 and the host and compares). Torch's executors differ from it (and
from each other between ``ATEN_CPU_CAPABILITY`` builds) in the last ulp of exp, log and
sqrt, which chaotic trajectories amplify, so the Rosenbrock task's fingerprint names its
executor and scores never mix; rules without those functions follow ``BatchedRule``
bit for bit on AVX2/AVX-512 machines. Random draws follow ``nos_gym.engine.random_streams``
operation for operation (drop masks bit-identical; noise too, except where torch's sqrt
is 1 ulp off).

**Fallback.** ``NOS_GYM_NATIVE=0`` turns it off; where building fails (no compiler) the
first use warns once (``NativeUnavailableWarning``) and ``available()`` is False: the task
then runs ``BatchedRule`` (under that executor's fingerprint).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["FLAGS", "NativeLibrary", "NativeUnavailableWarning", "RosenbrockArgs", "available", "build", "cache_dir",
           "library",
           "bias_corrections", "rosenbrock_run", "rule_tables"]

SOURCE = Path(__file__).parent / "csrc" / "rosenbrock_native.cpp"
#: compiler flags besides ``-march``: exact IEEE arithmetic (no contraction, no fast-math)
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared", "-std=c++17", "-pthread")
ABI_VERSION = 1


class NativeUnavailableWarning(RuntimeWarning):
    """The native Rosenbrock kernel could not be built here; torch's executor runs instead."""


class RosenbrockArgs(ctypes.Structure):
    """The kernel's argument block (``Args`` in the C++ source, field for field)."""

    _fields_ = [
        ("groups", ctypes.c_int64), ("lrs_per_group", ctypes.c_int64), ("depth", ctypes.c_int64),
        ("steps", ctypes.c_int64),
        ("lrs", ctypes.c_void_p), ("codes", ctypes.c_void_p), ("level", ctypes.c_void_p), ("rate", ctypes.c_void_p),
        ("drop_keys", ctypes.c_void_p), ("noise_keys", ctypes.c_void_p), ("corrections", ctypes.c_void_p),
        ("checkpoints", ctypes.c_void_p), ("n_checkpoints", ctypes.c_int64),
        ("beta1", ctypes.c_double), ("beta2", ctypes.c_double), ("beta3", ctypes.c_double), ("eps", ctypes.c_double),
        ("noise_std", ctypes.c_double), ("bias_correction", ctypes.c_int64),
        ("start_x", ctypes.c_double), ("start_y", ctypes.c_double), ("a", ctypes.c_double), ("b", ctypes.c_double),
        ("out", ctypes.c_void_p), ("trace", ctypes.c_void_p),
    ]


def cache_dir() -> Path:
    """Where built libraries are kept: ``$NOS_GYM_CACHE_DIR``, else ``$XDG_CACHE_HOME/nos_gym``
    or ``~/.cache/nos_gym``."""
    env = os.environ.get("NOS_GYM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nos_gym"


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_features() -> str:
    """The host's CPU feature flags (a -march=native build is only valid on such a CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(arch: str = "native", directory: Path | None = None, source: Path = SOURCE,
          extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` (default: the Rosenbrock kernel) for ``-march=arch`` with ``FLAGS`` and
    ``extra_flags`` (cached) and return the library's path.

    Raises ``RuntimeError`` with the compiler's message when there is no compiler or the
    build fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"{cxx} --version failed: {err}") from err
    flags = (*FLAGS, *extra_flags, f"-march={arch}")
    key = hashlib.sha256("\0".join([source.read_text(), *flags, version, platform.machine(),
                                    _cpu_features() if arch == "native" else ""]).encode()).hexdigest()[:16]
    directory = cache_dir() if directory is None else Path(directory)
    target = directory / f"{source.stem}-{arch}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=directory)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building {source.name} failed ({cxx}):\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent process sees a whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class NativeLibrary:
    """A C++ source file, built for ``-march=arch`` on first use and loaded with
    ctypes (``setup`` checks its ABI and declares its functions): ``self(arch)`` is the library,
    or None where it cannot be built (``warning`` is issued once, with ``fallback`` saying what
    runs instead) or ``NOS_GYM_NATIVE=0``. Other ``arch`` values than "native" are for tests,
    and raise where they cannot be built."""

    def __init__(self, source: Path, setup: Callable[[ctypes.CDLL, Path], None], warning: type[Warning],
                 fallback: str, extra_flags: tuple[str, ...] = ()):
        self.source, self.setup, self.warning, self.fallback = source, setup, warning, fallback
        self.extra_flags = extra_flags
        self._lock = threading.Lock()
        self._libraries: dict[str, ctypes.CDLL] = {}
        self._unavailable: str | None = None

    def __call__(self, arch: str = "native") -> ctypes.CDLL | None:
        if os.environ.get("NOS_GYM_NATIVE", "1") == "0":
            return None
        with self._lock:
            lib = self._libraries.get(arch)
            if lib is not None:
                return lib
            if self._unavailable is not None and arch == "native":
                return None
            try:
                path = build(arch, source=self.source, extra_flags=self.extra_flags)
                lib = ctypes.CDLL(str(path))
                self.setup(lib, path)
                self._libraries[arch] = lib
            except Exception as err:  # no compiler, a failed build, an unloadable library: fall back
                if arch != "native":
                    raise
                self._unavailable = str(err)
                warnings.warn(f"nos_gym: {self.source.name} is unavailable ({err}); {self.fallback}", self.warning,
                              stacklevel=3)
                return None
        return lib


def _setup_rosenbrock(lib: ctypes.CDLL, path: Path) -> None:
    if lib.nos_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.nos_abi_version()}, expected {ABI_VERSION}")
    lib.nos_rosenbrock_run.argtypes = [ctypes.POINTER(RosenbrockArgs), ctypes.c_int, ctypes.c_int]
    lib.nos_rosenbrock_run.restype = ctypes.c_int
    for name in ("nos_exp", "nos_log"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.nos_normal.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
    lib.nos_hash.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]


#: the Rosenbrock kernel: ``library(arch)``
library = NativeLibrary(SOURCE, _setup_rosenbrock, NativeUnavailableWarning,
                        "the Rosenbrock task runs torch's BatchedRule instead (about 10x slower, under another "
                        "fingerprint)")


def available() -> bool:
    """Whether the native kernel can run here (builds it on first call)."""
    return library() is not None


@functools.lru_cache(maxsize=8)
def bias_corrections(hyper, steps: int) -> np.ndarray:
    """``1 - beta^t`` for beta1, beta2, beta3 and t = 1..steps, (steps, 3), as the torch
    executors compute them (Python floats): the kernel divides by these. Cached (one task
    runs the same steps every batch); read-only."""
    out = np.array([[1.0 - hyper.beta1 ** t, 1.0 - hyper.beta2 ** t, 1.0 - hyper.beta3 ** t]
                    for t in range(1, steps + 1)], dtype=np.float64).reshape(steps, 3)
    out.setflags(write=False)
    return out


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def rosenbrock_run(tables: dict[str, np.ndarray], learning_rates: Sequence[float], steps: int, *,
                   start: tuple[float, float], a: float, b: float, hyper, corrections: np.ndarray,
                   checkpoints: Sequence[int] = (), dtype: str = "float64", threads: int = 1,
                   record: bool = False, lib: ctypes.CDLL | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Run every rule instance (row of ``tables``) at every learning rate for ``steps`` steps.

    ``tables``: ``codes`` (G, 5 depth) int64, ``level`` (G, 2 depth) float64, ``rate``
    float32, ``drop_keys`` and ``noise_keys`` int64 (the site keys ``H(seed, site)``);
    ``corrections``: (steps, 3) float64, ``1 - beta^t`` for t = 1..steps. Returns the final
    parameters (G, L, 2) (NaN where a row was not finite at the end or at a checkpoint) and,
    with ``record``, every iterate (steps + 1, G, L, 2)."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError("the native Rosenbrock kernel is unavailable here (see NativeUnavailableWarning)")
    codes = np.ascontiguousarray(tables["codes"], dtype=np.int64)
    G, width = codes.shape
    depth = width // 5
    L = len(learning_rates)
    arrays = {
        "lrs": np.ascontiguousarray(learning_rates, dtype=np.float64), "codes": codes,
        "level": np.ascontiguousarray(tables["level"], dtype=np.float64),
        "rate": np.ascontiguousarray(tables["rate"], dtype=np.float32),
        "drop_keys": np.ascontiguousarray(tables["drop_keys"], dtype=np.int64),
        "noise_keys": np.ascontiguousarray(tables["noise_keys"], dtype=np.int64),
        "corrections": np.ascontiguousarray(corrections, dtype=np.float64),
        "checkpoints": np.ascontiguousarray(sorted(checkpoints) or [-1], dtype=np.int64),
    }
    for name in ("level", "rate", "drop_keys", "noise_keys"):
        if arrays[name].shape != (G, 2 * depth):
            raise ValueError(f"table {name} has shape {arrays[name].shape}, expected {(G, 2 * depth)}")
    if arrays["corrections"].shape != (steps, 3):
        raise ValueError(f"corrections has shape {arrays['corrections'].shape}, expected {(steps, 3)}")
    out = np.empty((G, L, 2), dtype=np.float64)
    trace = np.empty((steps + 1, G, L, 2), dtype=np.float64) if record else None
    args = RosenbrockArgs(G, L, depth, int(steps), *(_ptr(arrays[k]) for k in
                                                     ("lrs", "codes", "level", "rate", "drop_keys", "noise_keys",
                                                      "corrections", "checkpoints")),
                          len(checkpoints), hyper.beta1, hyper.beta2, hyper.beta3, hyper.eps, hyper.noise_std,
                          int(hyper.bias_correction), float(start[0]), float(start[1]), float(a), float(b),
                          _ptr(out), _ptr(trace) if trace is not None else None)
    if G:
        rc = lib.nos_rosenbrock_run(ctypes.byref(args), {"float64": 64, "float32": 32}[dtype], int(threads))
        if rc != 0:
            raise RuntimeError(f"nos_rosenbrock_run rejected its arguments (code {rc})")
    return out, trace


def rule_tables(programs: Sequence, seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """The kernel's per-instance tables for ``programs`` (one rule instance each) with
    stream seeds ``seeds``: the opcodes of ``nos_gym.engine.fused_batched`` (the same numbering),
    each drop's and each noise read's site key ``H(seed, site)``."""
    from nos_gym.engine.fused_batched import opcode_row
    from nos_gym.engine.random_streams import hash64

    depth = max(p.depth for p in programs)
    rows = [opcode_row(p, depth) for p in programs]
    drop_keys = np.zeros((len(programs), 2 * depth), dtype=np.int64)
    noise_keys = np.zeros_like(drop_keys)
    for i, ((_, _, _, drop_site, noise_site), seed) in enumerate(zip(rows, seeds, strict=True)):
        for keys, sites in ((drop_keys, drop_site), (noise_keys, noise_site)):
            for j, site in enumerate(sites):
                if site >= 0:
                    key = hash64(int(seed), site)
                    keys[i, j] = key - (1 << 64) if key >> 63 else key
    return {"codes": np.array([r[0] for r in rows], dtype=np.int64), "level": np.array([r[1] for r in rows]),
            "rate": np.array([r[2] for r in rows], dtype=np.float32), "drop_keys": drop_keys, "noise_keys": noise_keys}
