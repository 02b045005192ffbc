"""The probe: a rule's behaviour on fixed inputs, as a fingerprint and a screen verdict.

Before a rule is trained, the Evaluator runs it for ``STEPS`` steps on fixed inputs (the
"probe") and keeps two things (DESIGN.md, "The evaluator's funnel"):

- a **behaviour fingerprint**: the hash of its update directions on the probe, rounded to
  ``MANTISSA_BITS`` bits (about 9 significant digits). Two rules with one fingerprint
  compute the same numbers on every probe input, so they share one score (AutoML-Zero's
  functional-equivalence check; ENOS's probe). The canonical key (``nos_gym.dsl.canonical``)
  already merges exact rewrites (``--g``, ``sign(sign(g))``, ``x * y`` vs ``y * x``); the
  fingerprint also merges what no rewrite rule names: ``g * 1`` and ``g``,
  ``sign(g) * sign(g)`` and ``1``, ``drop(g, 0.1) * exp(log|1|)`` and ``drop(g, 0.1)``.
- a **screen**: whether the rule is degenerate on the probe (``SCREENS``): its update is
  NaN/inf on every probe problem, identically zero, the same for two different gradient
  sequences at the same weights (it ignores the gradient), or never a descent direction
  (``d . g <= 0`` at every step of every problem, for the language's ``w <- w - lr * d``).
  A screened rule gets its task's ``screen_score()`` without being trained.

The probe (``PROBE_VERSION`` 1) is an open loop: ``STEPS`` = 10 fixed pairs ``(w_t, g_t)``
fed to the rule (its running averages m, v, y advance as in training), on nine problems
laid side by side in one row of ``D`` = 56 numbers (the language is elementwise):

    quadratic     16  g = h (w - w*) + noise, curvatures h from 1e-3 to 10, w -> w*
    rosenbrock 1-4 2  each: the gradient of Rosenbrock along a path (|g| up to ~1e3)
    small         12  random-sign gradients of scale 1e-7 .. 1e-3 (around the clip levels)
    large         12  random-sign gradients of scale 1e-2 .. 3, weights from 1e-2 to 10
    vanishing      4  gradients shrinking 10-100x a step (g/sqrt(v) then falls below the clip levels)
    crossing       4  m nearly cancels at step 2 (ADAM from 6e-6 to 6e-3 there, across the clip levels)

Scales span the regimes where the language's functions differ (the clip levels, exp's
overflow, log|x| on both sides of 1, the weight operands against g); signs flip between
steps so that m, sign(m) and g differ from step 2 on. Every input is generated from
integers (splitmix64) and written with 6 significant digits, so the probe is the same
bits on every machine. Each rule runs twice, on gradient sequences A and B at the same
weights (B multiplies each entry of A by a random factor in [0.4, 2.5] and a random sign),
both with the same draws for ``drop``/``noise``; the fingerprint hashes both runs.

Random draws: the probe gives every stochastic rule the same stream seed (``PROBE_SEED``,
not one derived from its canonical key as a task does), so two stochastic rules merge when
they compute the same numbers from the same draws: ``BatchedRule(seeds=...)`` gives row i
numbers that depend on (its seed, the step, the draw site, the column) only, so all rules
run as one batch and a rule's fingerprint never depends on the others (about 1,000-3,000
rules a second on one busy CPU core, whatever the mix). (With a
``BatchedRule`` that draws from one generator per batch, ``PER_ROW_SEEDS`` is False and
each stochastic rule runs alone, with the generator reseeded for each run.)

Float rounding: the update is computed in float64 and rounded to ``MANTISSA_BITS`` = 30
bits of mantissa (a relative step of 1e-9) before hashing, so rules that differ only by
float reassociation (1e-16) share a fingerprint, except with a probability of about 1e-4
per pair, while ``g / 1`` (that is ``g / (1 + 1e-8)``) and ``g`` do not merge.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from nos_gym.dsl import Program
from nos_gym.engine.rules import BatchedRule, Hyper

__all__ = ["D", "MANTISSA_BITS", "PER_ROW_SEEDS", "PROBE_SEED", "PROBE_VERSION", "PROBLEMS", "SCREENS", "STEPS",
           "ProbeInputs", "ProbeResult", "fingerprints", "probe", "probe_inputs", "run_probe"]

#: bump when the probe's inputs, rounding or screens change (fingerprints then differ)
PROBE_VERSION = 1
STEPS = 10
PROBE_SEED = 20170601
MANTISSA_BITS = 30
#: Whether ``BatchedRule`` gives each row its own stream (``seeds=``): then every rule runs
#: in one batch, each row's stream seeded with ``PROBE_SEED``. With a single generator per
#: batch (False) each stochastic rule runs alone from a generator seeded with ``PROBE_SEED``.
PER_ROW_SEEDS = "seeds" in inspect.signature(BatchedRule).parameters
#: probe rules in batches of this many (2 rows each: gradients A and B)
CHUNK = 512

#: screen code -> what it means (``ProbeResult.screen`` is one of the codes, or None)
SCREENS: dict[str, str] = {
    "non_finite": "the update is NaN or inf on every probe problem",
    "zero": "the update is identically zero",
    "ignores_gradient": "the update is the same for two different gradient sequences at the same weights",
    "never_descent": "update . gradient <= 0 at every probe step (never a descent direction for w <- w - lr * d)",
}

# name -> number of columns, in row order
PROBLEMS: tuple[tuple[str, int], ...] = (("quadratic", 16), ("rosenbrock-1", 2), ("rosenbrock-2", 2),
                                         ("rosenbrock-3", 2), ("rosenbrock-4", 2), ("small", 12), ("large", 12),
                                         ("vanishing", 4), ("crossing", 4))
D = sum(n for _, n in PROBLEMS)
_HYPER = Hyper()


class ProbeInputs(NamedTuple):
    """The probe's fixed inputs, each ``(STEPS, D)`` float64: weights and two gradient sequences."""

    w: torch.Tensor
    g_a: torch.Tensor
    g_b: torch.Tensor
    #: (start, stop) columns of each problem of ``PROBLEMS``
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ProbeResult:
    """What the probe says about one rule."""

    #: ``"p<PROBE_VERSION>-<hex>"``: equal for rules that compute the same numbers on the probe
    fingerprint: str
    #: None, or a key of ``SCREENS``: why the rule is degenerate
    screen: str | None = None

    @property
    def reason(self) -> str | None:
        """The screen in words (None when the rule passed)."""
        return None if self.screen is None else f"{self.screen}: {SCREENS[self.screen]}"


# ------------------------------------------------------------------------------ inputs
def _splitmix64(seed: int):
    """Uniform floats in [0, 1) from integers only (k / 2^53): the same bits everywhere."""
    mask = (1 << 64) - 1
    x = seed & mask
    while True:
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        yield (z >> 11) / float(1 << 53)


def _fix(x: float) -> float:
    """6 significant digits, through Python's correctly rounded decimal conversion."""
    return float(f"{x:.6g}")


@lru_cache(maxsize=1)
def probe_inputs() -> ProbeInputs:
    """The fixed probe (see the module doc); built once per process."""
    u = _splitmix64(PROBE_SEED)
    T = STEPS
    w = [[0.0] * D for _ in range(T)]
    g = [[0.0] * D for _ in range(T)]
    spans, col = [], 0
    for name, n in PROBLEMS:
        spans.append((col, col + n))
        cols = range(col, col + n)
        if name == "quadratic":
            for k, c in enumerate(cols):
                h = 10.0 ** (-3 + 4 * k / (n - 1))
                w_star = 2 * next(u) - 1 + (0.5 if k % 2 else -0.5)
                for t in range(T):
                    wt = w_star * (1 - 0.7 ** (t + 1))
                    w[t][c] = wt
                    g[t][c] = h * (wt - w_star) + 0.01 * (2 * next(u) - 1)
        elif name.startswith("rosenbrock"):
            x0, y0 = -1.5 + 3 * next(u), -0.5 + 2.5 * next(u)
            x1, y1 = -1.5 + 3 * next(u), -0.5 + 2.5 * next(u)
            for t in range(T):
                s = t / (T - 1)
                x = x0 + s * (x1 - x0) + 0.05 * (2 * next(u) - 1)
                y = y0 + s * (y1 - y0) + 0.05 * (2 * next(u) - 1)
                w[t][col], w[t][col + 1] = x, y
                r = y - x * x
                g[t][col], g[t][col + 1] = 2 * (x - 1) - 400 * x * r, 200 * r
        elif name == "crossing":
            # g2 = -0.9 g1 (1 + delta): m's average nearly cancels at step 2, so ADAM there is
            # about -delta / 2, from 6e-6 to 6e-3 (across the clip levels); random after that
            for k, c in enumerate(cols):
                w0 = -1.0 + 2 * next(u)
                for t in range(T):
                    w[t][c] = w0 + 0.01 * t
                    g[t][c] = (1.0, (-0.90001, -0.9001, -0.901, -0.91)[k])[t] if t < 2 else 2 * next(u) - 1
        elif name == "vanishing":
            for k, c in enumerate(cols):
                w0, sign = 0.5 + next(u), (1 if k % 2 else -1)
                for t in range(T):
                    w[t][c] = w0 * (1 - 0.05 * t)
                    g[t][c] = sign * (0.5 + next(u)) * 10.0 ** (-(k + 2) * t / 2)
        else:
            lo, hi = (-7.0, -3.0) if name == "small" else (-2.0, 0.5)
            for k, c in enumerate(cols):
                scale = 10.0 ** (lo + (hi - lo) * k / (n - 1))
                w0 = (1 if next(u) < 0.5 else -1) * 10.0 ** (-2 + 3 * next(u))
                for t in range(T):
                    w[t][c] = w0 * (1 + 0.1 * t * (2 * next(u) - 1))
                    # mostly one sign with flips: the averages m, v, y differ from g
                    sign = 1 if next(u) < (0.75 if k % 2 else 0.25) else -1
                    g[t][c] = sign * scale * (0.2 + next(u))
        col += n
    g_b = [[gi * (0.4 + 2.1 * next(u)) * (1 if next(u) < 0.5 else -1) for gi in row] for row in g]

    def tensor(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor([[_fix(v) for v in row] for row in rows], dtype=torch.float64)

    return ProbeInputs(tensor(w), tensor(g), tensor(g_b), tuple(spans))


# ------------------------------------------------------------------------------ running
def _rule(programs: list[Program]) -> BatchedRule:
    """A BatchedRule whose every row draws as a rule alone seeded with PROBE_SEED would."""
    if PER_ROW_SEEDS:
        return BatchedRule(programs, _HYPER, seeds=[PROBE_SEED] * len(programs), fused=False)  # type: ignore[call-arg]
    return BatchedRule(programs, _HYPER, generator=torch.Generator().manual_seed(PROBE_SEED))


def _directions(programs: list[Program], grads: list[torch.Tensor], inp: ProbeInputs) -> torch.Tensor:
    """``(len(grads), B, STEPS, D)`` updates of ``programs`` on each gradient sequence."""
    B = len(programs)
    if PER_ROW_SEEDS:  # one batch: rows [A of every rule, B of every rule, ...], every row the same seed
        k = len(grads)
        rule = _rule(programs * k)
        w = inp.w.unsqueeze(1).expand(STEPS, k * B, D)
        g = torch.cat([gs.unsqueeze(1).expand(STEPS, B, D) for gs in grads], dim=1)
        state = rule.init(w[0].contiguous())
        out = torch.empty(STEPS, k * B, D, dtype=torch.float64)
        for t in range(STEPS):
            out[t], state = rule.update(state, g[t].contiguous(), w[t].contiguous())
        return out.view(STEPS, k, B, D).permute(1, 2, 0, 3)
    out = torch.empty(len(grads), B, STEPS, D, dtype=torch.float64)
    rule = _rule(programs)
    for j, gs in enumerate(grads):
        rule.generator.manual_seed(PROBE_SEED)  # type: ignore[attr-defined]  # the same draws for A and B
        w = inp.w.unsqueeze(1).expand(STEPS, B, D)
        g = gs.unsqueeze(1).expand(STEPS, B, D)
        state = rule.init(w[0].contiguous())
        for t in range(STEPS):
            d, state = rule.update(state, g[t].contiguous(), w[t].contiguous())
            out[j, :, t] = d
    return out


@torch.inference_mode()
def run_probe(programs: Sequence[Program]) -> torch.Tensor:
    """The raw probe outputs: ``(B, 2, STEPS, D)`` float64 updates on gradients A and B.

    Deterministic rules run in batches of ``CHUNK``; stochastic ones alone (unless
    ``PER_ROW_SEEDS``), so that a rule's numbers never depend on the other rules.
    """
    programs = list(programs)
    inp = probe_inputs()
    out = torch.empty(len(programs), 2, STEPS, D, dtype=torch.float64)
    if PER_ROW_SEEDS:
        groups = [list(range(s, min(s + CHUNK, len(programs)))) for s in range(0, len(programs), CHUNK)]
    else:
        det = [i for i, p in enumerate(programs) if not p.stochastic]
        groups = [det[s:s + CHUNK] for s in range(0, len(det), CHUNK)]
        groups += [[i] for i, p in enumerate(programs) if p.stochastic]
    # small kernels: torch's thread pool costs more than it gives (20x slower on a busy 2-core machine)
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        for rows in groups:
            if rows:
                d = _directions([programs[i] for i in rows], [inp.g_a, inp.g_b], inp)
                out[rows] = d.transpose(0, 1)
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
    return out


def _quantize(x: np.ndarray) -> np.ndarray:
    """Round to ``MANTISSA_BITS`` bits of mantissa; one bit pattern for NaN and for zero."""
    x = x + 0.0  # -0.0 -> +0.0
    finite = np.isfinite(x)
    m, e = np.frexp(np.where(finite, x, 0.0))
    q = np.ldexp(np.round(np.ldexp(m, MANTISSA_BITS)), e - MANTISSA_BITS)
    q = np.where(finite, q, np.where(np.isnan(x), np.nan, x)) + 0.0
    return np.ascontiguousarray(q, dtype="<f8")


def _hash(q: np.ndarray) -> str:
    return f"p{PROBE_VERSION}-" + hashlib.blake2b(q.tobytes(), digest_size=12).hexdigest()


def _screens(out: torch.Tensor, q: np.ndarray, inp: ProbeInputs) -> list[str | None]:
    """The screen code of each row of ``out`` ``(B, 2, STEPS, D)`` (``q``: its rounded form)."""
    B = out.shape[0]
    grads = torch.stack([inp.g_a, inp.g_b])  # (2, STEPS, D)
    finite = torch.isfinite(out)
    nonfinite_everywhere = torch.ones(B, dtype=torch.bool)
    descends = torch.zeros(B, dtype=torch.bool)
    for lo, hi in inp.spans:
        nonfinite_everywhere &= ~finite[..., lo:hi].flatten(1).all(1)
        dots = (out[..., lo:hi] * grads[..., lo:hi]).sum(-1)  # (B, 2, STEPS); NaN > 0 is False
        descends |= (dots > 0).flatten(1).any(1)
    zero = (out == 0).flatten(1).all(1)
    ab_equal = np.array([np.array_equal(q[i, 0], q[i, 1], equal_nan=True) for i in range(B)], dtype=bool)
    codes: list[str | None] = []
    for i in range(B):
        if nonfinite_everywhere[i]:
            codes.append("non_finite")
        elif zero[i]:
            codes.append("zero")
        elif ab_equal[i]:
            codes.append("ignores_gradient")
        elif not descends[i]:
            codes.append("never_descent")
        else:
            codes.append(None)
    return codes


def probe(programs: Sequence[Program]) -> list[ProbeResult]:
    """Fingerprint and screen verdict of each program, in order (a batch is as good as one by one)."""
    programs = list(programs)
    if not programs:
        return []
    out = run_probe(programs)
    q = _quantize(out.numpy())
    codes = _screens(out, q, probe_inputs())
    return [ProbeResult(_hash(q[i]), codes[i]) for i in range(len(programs))]


def fingerprints(programs: Sequence[Program]) -> list[str]:
    """The behaviour fingerprint of each program (``probe`` without the screens' verdicts)."""
    return [r.fingerprint for r in probe(programs)]
