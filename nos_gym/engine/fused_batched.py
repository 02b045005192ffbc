"""A fused step for ``BatchedRule``: B different rules in one compiled kernel, the tokens as data.

``BatchedRule``'s default executor (``nos_gym.engine.rules._Executor``) runs a step as a fixed
number of kernels per distinct token: ~65 for a batch of random depth-2 rules, each a pass
over the rows. Compiling each batch's rules as code (``nos_gym.engine.fused``) would cost seconds
per batch, more than a Rosenbrock evaluation. Here the rules are *data*: each row carries
per-group opcodes (its operands, unaries, binaries) and constants (clip levels, drop rates,
the drop sites' stream keys) in small integer and float tables, and one generated function,
compiled once, computes every row's update from them:

- every operand a row may read (g, g^2, g^3, the bias-corrected averages, sign(g), sign(m),
  1, the scaled weights, ADAM, RMSProp; ``noise`` gathered from the step's normals) is
  computed once per element; each side of each group selects its operand by its opcode
  (a chain of ``torch.where`` over the vocabulary), applies every unary and selects one
  (``drop``'s uniform is computed in the kernel from the row's key: the splitmix64 hash of
  ``nos_gym.engine.random_streams``, integer ops, bit-exact), then the group's binary is selected
  the same way. inductor fuses the whole step -- the running averages too -- into one loop
  over the elements: the operands are read once, the direction and the averages written
  once. Arithmetic is ``nos_gym.engine.rules``' op for op, so rows get today's numbers (see
  ``tests/test_fused_batched.py``).
- **Compiled once per shape of the code**, not per batch: the key is (depth, the averages
  kept, whether any row reads ``noise``, whether any row drops, dtype, device); the batch
  size and row width are dynamic. Every batch of random depth-2 rules of the 'full' space
  shares one kernel, and ``BatchedRule.select`` keeps its parent's shape (dropping rows
  never compiles). Rows narrower than 16 numbers take a second layout (``flat``: tables
  per entry, so the vector units run across rows), a second compile. Cost (2-core EPYC,
  gcc 12, torch 2.14, both cores busy with other work): ``BATCHED_COMPILE_NOTE``. A step
  run under ``torch.inference_mode`` compiles one more graph (inference tensors have
  other dispatch keys), once.
- ``noise``'s normals are not computed in the kernel (inductor rounds the Box-Muller
  polynomial differently, see ``nos_gym.engine.fused``): the existing generator fills a block of
  steps (``nos_gym.engine.rules._Streams``) and the kernel gathers each slot's row.
- **Threads**: inductor's CPU kernel runs an OpenMP team whatever the size; on the
  loaded 2-core machine a team of 2 stalled small steps for ~10 ms, so ``BatchedRule``
  runs steps of fewer than 2^16 entries on one thread (``rules.FUSED_PARALLEL_FROM``).
  The thread count is part of dynamo's guards: each count used compiles its own graph,
  once (``BatchedCode.ready`` probes it).
- **Fallback**: compile failures go through ``nos_gym.engine.fused``'s machinery (one
  ``FusedUnavailableWarning`` per process, then ``available()`` is False and ``BatchedRule``
  runs its default executor).

Every element computes every operand and every unary of every side (exp, log, sqrt and,
if any row drops, two 64-bit hashes per side), and selects: the step is bound by that
arithmetic, not by memory or kernel launches. So it gains most on wide rows and little
where the default executor's kernels are long and compute only what each row needs, as on
the Rosenbrock task (``BatchedRule``'s ``fused`` argument; the measurements are in
docs/results.md, "The rule engine").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from nos_gym.dsl.program import Program
from nos_gym.dsl.vocabulary import (
    BASE_OPERANDS,
    CLIP_LEVELS,
    DROP_RATES,
    GROUP_SIZE,
    WEIGHT_SCALES,
    is_result_operand,
    result_index,
)
from nos_gym.engine import fused as _fused
from nos_gym.engine.random_streams import GAMMA, hash64
from nos_gym.engine.step_plan import Draw, draw_sites, pad_program

__all__ = ["BATCHED_COMPILE_NOTE", "BatchedCode", "BatchedTables", "batched_step", "opcode_row"]

#: measured on the loaded 2-core machine, per code shape and dtype
BATCHED_COMPILE_NOTE = "10-65 s cold (inductor's first build), 0.1-3 s from inductor's disk cache"

#: operand opcodes: the base operands in vocabulary order, then r1, r2, ...
OPERAND_CODES: dict[str, int] = {name: i for i, name in enumerate(BASE_OPERANDS)}
#: unary opcodes: the clip levels and the drop rates are one opcode each, with a per-row constant
UNARY_CODES: dict[str, int] = {"id": 0, "neg": 1, "exp": 2, "log_abs": 3, "sign": 4, "sqrt_abs": 5,
                               **{name: 6 for name in CLIP_LEVELS}, **{name: 7 for name in DROP_RATES}}
BINARY_CODES: dict[str, int] = {"add": 0, "sub": 1, "mul": 2, "div": 3, "keep": 4}

# columns of the per-row tables, per group k: codes[:, 5k + c] (c: op1, op2, u1, u2, b);
# per side j = 2k + s: level[:, j] (clip), rate[:, j] (drop, float32), keys[:, j] (drop's site key),
# nidx[:, j] (the row of the step's normals that a noise read takes)


def _signed(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >> 63 else x


_MIX = f"""\
def _mix(z):
    z = z ^ ((z >> 30) & {(1 << 34) - 1})
    z = z * {_signed(0xBF58476D1CE4E5B9)}
    z = z ^ ((z >> 27) & {(1 << 37) - 1})
    z = z * {_signed(0x94D049BB133111EB)}
    return z ^ ((z >> 31) & {(1 << 33) - 1})
"""


def batched_source(depth: int, averages: tuple[str, ...], noise: bool, drop: bool, hyper, flat: bool = False) -> str:
    """Python source of the opcode step for programs of ``depth`` groups.

    ``step(g, w, m, v, y, s, codes, level, rate, keys, tg, normals, nidx)`` returns
    ``(d, m, v, y)``: the direction and the averages one step on (None where not kept).
    ``s``: ``[1 - beta1^t, 1 - beta2^t, 1 - beta3^t]`` (``g``'s dtype); ``tg``: ``(t + 1) * GAMMA``
    as an int64 tensor of one entry; ``codes`` ... ``nidx``: the per-row tables.

    ``cnt``: the drop counters ``(column + 1) * GAMMA`` (int64, wrapped), ``(1, D)``; they
    come in as data: computed in the kernel from the loop index, gcc may transform the
    wrapping (signed overflow) product and the scalar build (``ATEN_CPU_CAPABILITY=default``)
    then drew other masks.

    ``flat``: the tensors are 1-D over all B * D entries and the tables are per *entry*,
    transposed (``codes[c]`` is column c of every entry, ``cnt``: each entry's counter,
    ``nidx[j]``: each entry's index into the flattened normals): for short rows, where a
    loop over a row's few entries cannot use the vector units.
    """
    h = hyper
    lines: list[str] = []
    emit = lines.append
    # the running averages, as nos_gym.engine.rules.advance_averages computes them
    if "m" in averages:
        emit(f"m = torch.lerp(m, g, {1.0 - h.beta1!r})")
    if "v" in averages:
        emit(f"v = torch.mul(v, {h.beta2!r}).addcmul(g, g, value={1.0 - h.beta2!r})")
    emit("g2 = g * g")
    emit("g3 = g2 * g")
    if "y" in averages:
        emit(f"y = torch.mul(y, {h.beta3!r}).add(g3, alpha={1.0 - h.beta3!r})")
    bc = h.bias_correction
    ops: dict[str, str] = {"g": "g", "g2": "g2", "g3": "g3", "sign_g": "torch.sign(g)",
                           "one": "torch.ones_like(g)"}
    if "m" in averages:
        emit("mh = m / s[0]" if bc else "mh = m")
        ops["m"] = "mh"
        ops["sign_m"] = "torch.sign(m)"
    if "v" in averages:
        emit("vh = v / s[1]" if bc else "vh = v")
        emit(f"den = torch.sqrt(vh) + {h.eps!r}")
        ops["v"] = "vh"
        ops["rmsprop"] = "g / den"
        if "m" in averages:
            ops["adam"] = "mh / den"
    if "y" in averages:
        emit("yh = y / s[2]" if bc else "yh = y")
        ops["y"] = "yh"
    for name, scale in WEIGHT_SCALES.items():
        ops[name] = f"w * {scale!r}"
    # each operand a variable, computed once
    names: dict[int, str] = {}
    for name, expr in ops.items():
        var = "o_" + "".join(ch if ch.isalnum() else "_" for ch in name)
        emit(f"{var} = {expr}")
        names[OPERAND_CODES[name]] = var

    def col(table: str, c: int) -> str:
        return f"{table}[{c}]" if flat else f"{table}[:, {c}:{c + 1}]"

    def select(code: str, choices: list[tuple[int, str]]) -> str:
        """``torch.where`` chain: the value of the choice whose opcode ``code`` holds (the last one otherwise)."""
        expr = choices[-1][1]
        for c, value in reversed(choices[:-1]):
            expr = f"torch.where({code} == {c}, {value}, {expr})"
        return expr

    for k in range(depth):
        for s in range(2):
            j = 2 * k + s
            emit(f"op = {col('codes', GROUP_SIZE * k + s)}")
            choices = list(names.items())
            if noise:
                emit(f"nz = normals.view(-1)[nidx[{j}]]" if flat else f"nz = normals[nidx[:, {j}]]")
                choices.append((OPERAND_CODES["noise"], "nz"))
            choices += [(len(BASE_OPERANDS) + i - 1, f"r{i}") for i in range(1, k + 1)]
            emit(f"x = {select('op', choices)}")
            emit(f"u = {col('codes', GROUP_SIZE * k + 2 + s)}")
            un = [(0, "x"), (1, "(-x)"), (2, "torch.exp(x)"), (3, "torch.log(torch.abs(x))"), (4, "torch.sign(x)"),
                  (5, "torch.sqrt(torch.abs(x))"),
                  (6, f"torch.clamp(x, -{col('level', j)}, {col('level', j)})")]
            if drop:
                emit(f"bits = _mix(_mix({col('keys', j)} + tg) + cnt)")
                emit(f"unif = ((bits >> 40) & {(1 << 24) - 1}).to(torch.float32) * {2.0 ** -24!r}")
                un.append((7, f"torch.where(unif < {col('rate', j)}, 0.0, x)"))
            emit(f"a{s} = {select('u', un)}")
        emit(f"b = {col('codes', GROUP_SIZE * k + 4)}")
        emit(f"r{k + 1} = " + select("b", [(0, "a0 + a1"), (1, "a0 - a1"), (2, "a0 * a1"),
                                             (3, f"a0 / (a1 + {h.eps!r})"), (4, "a0")]))
    ret = ", ".join(["r" + str(depth)] + [n if n in averages else "None" for n in ("m", "v", "y")])
    emit(f"return {ret}")
    head = "def step(g, w, m, v, y, s, codes, level, rate, keys, tg, normals, nidx, cnt):\n"
    return (_MIX if drop else "") + head + "".join(f"    {line}\n" for line in lines)


class BatchedCode:
    """The opcode step of one code shape (see ``batched_source``), compiled lazily per (dtype, device)."""

    def __init__(self, depth: int, averages: tuple[str, ...], noise: bool, drop: bool, hyper, flat: bool):
        self.depth, self.averages, self.noise, self.drop, self.flat = depth, averages, noise, drop, flat
        src = batched_source(depth, averages, noise, drop, hyper, flat)
        namespace: dict[str, Any] = {"torch": torch}
        name = (f"batched depth {depth} {''.join(averages)}{' noise' if noise else ''}{' drop' if drop else ''}"
                f"{' flat' if flat else ''}")
        exec(compile(src, f"<nos_gym.engine.fused_batched {name}>", "exec"), namespace)  # noqa: S102 -- generated here
        self.fn: Callable = namespace["step"]
        self.source = src
        self._compiled: Callable | None = None
        self._ready: set[tuple[torch.dtype, torch.device, int]] = set()

    def ready(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Compile for (dtype, device) if not yet done (on dummies of sizes no real batch
        is likely to share); False where compiling fails (warned once, by ``nos_gym.engine.fused``).

        The thread count is part of dynamo's guards: after ``torch.set_num_threads`` the
        step compiles again (its graph, once per count), here on the dummies."""
        key = (dtype, device, torch.get_num_threads())
        if key in self._ready:
            return True
        if not _fused.available():
            return False
        with _lock:
            try:
                if self._compiled is None:
                    self._compiled = _fused._compile(self.fn)
                args = self._dummy_args(dtype, device)
                with torch.no_grad():
                    _, m, v, y = self._compiled(*args)
                    # a second step on the first one's averages, as real runs go on (their
                    # guards differ from fresh tensors'): nothing compiles once training runs
                    self._compiled(*args[:2], m, v, y, *args[5:])
            except Exception as err:  # no compiler, unsupported platform, ...: fall back
                _fused._mark_unavailable(err)
                return False
            self._ready.add(key)
        return True

    def _dummy_args(self, dtype: torch.dtype, device: torch.device) -> tuple:
        # sizes no real batch is likely to share, so that no size is specialised (see nos_gym.engine.fused)
        B, D, n = 67, 37, 5
        shape = (B * D,) if self.flat else (B, D)
        g, w = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
        avg = {k: torch.zeros(shape, dtype=dtype, device=device) for k in self.averages}
        K = self.depth
        per = (lambda c, dt: torch.zeros(c, B * D, dtype=dt, device=device)) if self.flat else \
            (lambda c, dt: torch.zeros(B, c, dtype=dt, device=device))
        args = (g, w, avg.get("m"), avg.get("v"), avg.get("y"), torch.ones(3, dtype=dtype, device=device),
                per(GROUP_SIZE * K, torch.int64), per(2 * K, dtype).add_(1.0), per(2 * K, torch.float32),
                per(2 * K, torch.int64), torch.zeros(1, dtype=torch.int64, device=device),
                torch.zeros(n, D, dtype=dtype, device=device) if self.noise else None, per(2 * K, torch.int64))
        return (*args, torch.zeros((B * D,) if self.flat else (1, D), dtype=torch.int64, device=device))

    def __call__(self, *args) -> tuple:
        with torch.no_grad():  # as compiled (grad mode is part of dynamo's guards)
            return self._compiled(*args)


_lock = threading.Lock()
_codes: dict[Any, BatchedCode] = {}


def batched_step(depth: int, averages: tuple[str, ...], noise: bool, drop: bool, hyper, flat: bool) -> BatchedCode:
    """The opcode step of this code shape (built once per process, then shared)."""
    key = (depth, tuple(averages), bool(noise), bool(drop), hyper, bool(flat))
    with _lock:
        code = _codes.get(key)
        if code is None:
            code = _codes[key] = BatchedCode(depth, tuple(averages), bool(noise), bool(drop), hyper, bool(flat))
    return code


def opcode_row(program: Program, depth: int) -> tuple[list[int], list[float], list[float], list[int], list[int]]:
    """One program's opcode row, padded to ``depth`` groups: the codes (5 per group), per
    side j = 2k + s its clip level (1 where none) and drop rate (0 where none), and the draw
    site of its drop and of its noise read (-1: none; the right side of a keep group draws
    nothing, it is never read). Kept with the Program object, per depth (as its other cached
    properties are): ``BatchedTables`` and the native kernel's tables (``nos_gym.engine.native``)
    are both made of these rows."""
    cache = program.__dict__.setdefault("_opcode_rows", {})
    row = cache.get(depth)
    if row is None:
        sites = draw_sites(program)
        codes, level, rate = [0] * (GROUP_SIZE * depth), [1.0] * (2 * depth), [0.0] * (2 * depth)
        drop_site, noise_site = [-1] * (2 * depth), [-1] * (2 * depth)
        for k, (op1, op2, u1, u2, b) in enumerate(pad_program(program, depth).groups):
            codes[GROUP_SIZE * k + 4] = BINARY_CODES[b]
            for s, (op, u) in enumerate(((op1, u1), (op2, u2))):
                j = 2 * k + s
                codes[GROUP_SIZE * k + s] = (len(BASE_OPERANDS) + result_index(op) - 1 if is_result_operand(op)
                                             else OPERAND_CODES[op])
                codes[GROUP_SIZE * k + 2 + s] = UNARY_CODES[u]
                if s == 1 and b == "keep":
                    continue  # never read: no draws
                if op == "noise":
                    noise_site[j] = sites[GROUP_SIZE * k + s]
                if u in CLIP_LEVELS:
                    level[j] = CLIP_LEVELS[u]
                if u in DROP_RATES:
                    rate[j] = DROP_RATES[u]
                    drop_site[j] = sites[GROUP_SIZE * k + 2 + s]
        row = cache[depth] = (codes, level, rate, drop_site, noise_site)
    return row


class BatchedTables:
    """The per-row opcode tables of a batch of programs (see ``batched_source``), bound to
    rows of ``width`` numbers of ``dtype`` on ``device``; ``flat``: per entry, transposed.

    ``noise_draws``: the ``Draw(row, site)`` of every noise read, in the order of the rows
    of the step's normals (``nidx`` points into them).
    """

    def __init__(self, programs: Sequence[Program], seeds: Sequence[int], width: int, dtype: torch.dtype,
                 device: torch.device, flat: bool, depth: int = 0):
        depth = max(depth, *(p.depth for p in programs))
        B = len(programs)
        rows = [opcode_row(p, depth) for p in programs]
        codes, level, rate = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        keys = [[0] * (2 * depth) for _ in range(B)]
        nidx = [[0] * (2 * depth) for _ in range(B)]
        noise_draws: list[Draw] = []
        for r, (_, _, _, drop_site, noise_site) in enumerate(rows):
            for j in range(2 * depth):
                if noise_site[j] >= 0:
                    nidx[r][j] = len(noise_draws)
                    noise_draws.append(Draw(r, noise_site[j]))
                if drop_site[j] >= 0:
                    keys[r][j] = _signed(hash64(int(seeds[r]), drop_site[j]))
        drop = any(site >= 0 for row in rows for site in row[3])
        self.depth, self.rows, self.flat = depth, B, flat
        self.drop, self.noise_draws = drop, tuple(noise_draws)

        def table(values: list, dt: torch.dtype) -> Tensor:
            t = torch.tensor(values, dtype=dt, device=device)
            # flat: entry i of row r is entry r * width + i: each column repeated width times, transposed
            return t.repeat_interleave(width, 0).t().contiguous() if flat else t

        self.codes = table(codes, torch.int64)
        self.level = table(level, dtype)
        self.rate = table(rate, torch.float32)  # compared with float32 uniforms
        self.keys = table(keys, torch.int64)
        self.nidx = table(nidx, torch.int64)
        column = torch.arange(width, dtype=torch.int64, device=device)
        if flat:
            column = column.repeat(B)
            self.nidx = self.nidx * width + column  # an index into the flattened normals
        # the drop counters: column j -> (j + 1) * GAMMA (wrapping), per column or per entry
        self.cnt = (column + 1).mul_(_signed(GAMMA)) if flat else (column + 1).mul_(_signed(GAMMA)).view(1, -1)

    def args(self) -> tuple:
        """The tables, in the step's argument order after ``tg`` and ``normals``."""
        return (self.nidx, self.cnt)


def step_count_key(step: int) -> Tensor:
    """``(step + 1) * GAMMA`` as an int64 tensor of one entry (the kernel adds it to the site keys)."""
    return torch.tensor([_signed((int(step) + 1) * GAMMA)], dtype=torch.int64)
