"""Drop-in ``torch.optim`` optimizers: any rule of the language, PowerSign, AddSign, Table 1.

>>> opt = NOSOptimizer(model.parameters(), rule="g * exp(sign(g) * sign(m))", lr=1e-3)
>>> opt = PowerSign(model.parameters(), lr=1e-3, sign_decay="cosine", decay_steps=10_000)
>>> table1()["optimizer_2"]   # 'drop(m, 0.3) * exp(1e-3 * w)'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from nos_gym import fused as _fused
from nos_gym.dsl import Program
from nos_gym.dsl.table1 import TABLE1, get_rule, table1  # re-exported: the optimizers' names for rules
from nos_gym.random_streams import stream_seed
from nos_gym.rules import Draws, Hyper, Inputs, apply_rule, needed_averages, update_averages

__all__ = ["AddSign", "NOSOptimizer", "PowerSign", "SIGN_DECAYS", "TABLE1", "cosine_decay", "get_rule",
           "linear_decay", "restart_decay", "table1"]


# --------------------------------------------------------------------- NOSOptimizer
class NOSOptimizer(torch.optim.Optimizer):
    """Any update rule of the language as a ``torch.optim.Optimizer``.

    ``w <- w - lr * rule(g, m, v, y, w)``, computed with ``torch._foreach_*`` kernels over
    all parameters of a group at once. Only the running averages the rule reads are kept.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        rule: a rule in paper notation, a Table 1 name (``table1()``) or a ``Program``.
        lr: learning rate.
        hyper: betas, eps, bias correction and noise scale of the language (section 4.2).
        seed: seeds ``drop`` and ``noise``. Their numbers come from the rule's counter-based
            stream (``nos_gym.random_streams``) with stream seed
            ``stream_seed(seed, rule.canonical_key, draw)`` (``self.stream_seed``): the value
            at step t, draw site s and element index i is a fixed function of (stream seed,
            t, s, i). The element index of entry j of a parameter is j plus the number of
            entries of the parameters before it (all groups, in the order given, whether
            or not they have gradients): the parameters laid end to end, as a row of
            ``BatchedRule`` lays a ``ChildNet`` out (``nos_gym.tasks.child.layout``). So
            ``NOSOptimizer(params, rule, seed=s, draw=j)`` draws what
            ``BatchedRule([rule], seeds=[stream_seed(s, key, j)])`` draws on the flat row,
            and what a task with seed s draws for the rule's draw j.
        draw: which of the rule's draws under ``seed`` (0, 1, ...; see ``stream_seed``).
        fused: the fused path (``nos_gym.fused``): the rule's whole per-parameter step
            compiled by ``torch.compile`` into one kernel, several times faster than the
            foreach path on large models (3x at 10M parameters on CPU), at a one-off
            compile cost (~9 s for the first rule in a process, 1-2 s for each further one;
            ~2 s and ~0.1 s when inductor's on-disk cache has them). ``None`` (default): fused
            when the optimizer holds at least ``nos_gym.fused.FUSED_MIN_NUMEL`` (2^20)
            entries on CPU or CUDA, else foreach; ``True``: fused whatever the size;
            ``False``: foreach. Where compiling fails (no C++ compiler, unsupported
            platform), ``None`` and ``True`` warn once (``FusedUnavailableWarning``) and
            use the foreach path. Both paths compute the same arithmetic and draw the same
            random numbers; results agree to float rounding (the compiled kernel may
            contract or reorder float ops), not bit for bit.

    ``state_dict()`` carries the rule (tokens, paper notation, canonical key), ``hyper`` and
    the draws' seed; ``load_state_dict`` raises ``ValueError`` for a state of another rule
    (one with a different canonical key) and restores the saved ``hyper``, as torch's
    optimizers restore their saved hyper-parameters.
    """

    def __init__(self, params: Iterable[Any], rule: str | Program = "powersign", lr: float = 1e-3,
                 hyper: Hyper = Hyper(), seed: int = 0, draw: int = 0, fused: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}: it must be >= 0")
        self.program = get_rule(rule)
        self.hyper = hyper
        self._needs = sorted(needed_averages([self.program]))
        self._seed, self._draw = int(seed), int(draw)
        self.stream_seed = stream_seed(self._seed, self.program.canonical_key, self._draw)
        self._offsets: dict[Tensor, int] = {}  # parameter -> element index of its first entry
        self._numel = 0
        self._fused_arg = fused
        self._fused_on: bool | None = None  # decided at the first step (it depends on the sizes)
        super().__init__(params, dict(lr=lr))

    @property
    def fused(self) -> bool | None:
        """Whether steps take the fused path (None before the first step decides)."""
        if self._fused_on is None:
            return None
        return self._fused_on and _fused.available()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:  # laid end to end, in the order given
            self._offsets[p] = self._numel
            self._numel += p.numel()

    def __repr__(self) -> str:
        return f"NOSOptimizer(rule={str(self.program)!r}, lr={self.param_groups[0]['lr']})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Parameters that share a step count are updated together (normally all).
            buckets: dict[tuple[int, torch.device], list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NOSOptimizer does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for k in self._needs:
                        state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buckets.setdefault((state["step"], p.device), []).append(p)
            if self._fused_on is None:
                self._fused_on = _fused.use_fused(
                    self._fused_arg, [p for g in self.param_groups for p in g["params"]])
            for (step, _), params in buckets.items():
                grads = [p.grad for p in params]
                avgs = {k: [self.state[p][k] for p in params] for k in self._needs}
                if self._fused_on and self._fused_step(params, grads, avgs, step + 1, group["lr"]):
                    for p in params:
                        self.state[p]["step"] = step + 1
                    continue
                update_averages(avgs, grads, self.hyper)
                draws = Draws(self.stream_seed, step + 1, [self._offsets[p] for p in params])
                inp = Inputs(grads, params, avgs.get("m"), avgs.get("v"), avgs.get("y"), step + 1, self.hyper, draws)
                direction = apply_rule(self.program, inp)
                torch._foreach_add_(params, direction, alpha=-group["lr"])
                for p in params:
                    self.state[p]["step"] = step + 1
        return loss

    def _fused_step(self, params: list[Tensor], grads: list[Tensor], avgs: dict[str, list[Tensor]],
                    step: int, lr: float) -> bool:
        """One fused step of ``params`` (the averages advanced too); False: not available, nothing done."""
        fs = _fused.rule_step(self.program, self.hyper)
        if not all(fs.ready(dt, dev) for dt, dev in {(p.dtype, p.device) for p in params}):
            return False
        h = self.hyper
        scalars = [lr, 1.0 - h.beta1 ** step, 1.0 - h.beta2 ** step, 1.0 - h.beta3 ** step]
        offsets = [self._offsets[p] for p in params]
        keys = _fused.step_keys(self.stream_seed, step, fs.drop_sites)

        def noise(k: int, site: int) -> Tensor:  # the normals, from the existing generator
            return Draws(self.stream_seed, step, [offsets[k]]).noise(site, [grads[k]], h.noise_std)[0]

        fs.run(params, grads, avgs, scalars, offsets, keys, noise)
        return True

    def _rule_record(self) -> dict[str, Any]:
        p = self.program
        return {"tokens": list(p.tokens), "notation": str(p), "canonical_key": p.canonical_key}

    def state_dict(self) -> dict[str, Any]:
        # the draws need no generator state: they are a function of the step (in ``state``)
        sd = super().state_dict()
        sd["stream"] = {"seed": self._seed, "draw": self._draw}
        sd["rule"] = self._rule_record()
        sd["hyper"] = dataclasses.asdict(self.hyper)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        stream = state_dict.pop("stream", None)
        rule = state_dict.pop("rule", None)
        hyper = state_dict.pop("hyper", None)
        state_dict.pop("generator_states", None)  # written before semantics version 3; nothing to restore
        if rule is not None and rule["canonical_key"] != self.program.canonical_key:
            raise ValueError(f"this state_dict is of rule {rule['notation']!r} (canonical key "
                             f"{rule['canonical_key']!r}), not this optimizer's rule {str(self.program)!r} "
                             f"(canonical key {self.program.canonical_key!r})")
        super().load_state_dict(state_dict)
        if hyper is not None:
            self.hyper = Hyper(**hyper)
        if stream is not None:
            self._seed, self._draw = int(stream["seed"]), int(stream["draw"])
            self.stream_seed = stream_seed(self._seed, self.program.canonical_key, self._draw)


# ------------------------------------------------------------- sign decay schedules
# As in TensorFlow's released tf.contrib.opt sign_decay.py; ``step`` counts from 0.
def linear_decay(decay_steps: int) -> Callable[[int], float]:
    """max(0, (decay_steps - step) / decay_steps)."""
    def fn(step: int) -> float:
        return max(0.0, (decay_steps - min(step, decay_steps)) / decay_steps)
    return fn


def cosine_decay(decay_steps: int, num_periods: float = 0.5, zero_after: float | None = None) -> Callable[[int], float]:
    """0.5 * (1 + cos(2 pi num_periods step / decay_steps)); 0 once the fraction passes zero_after."""
    def fn(step: int) -> float:
        fraction = 2.0 * num_periods * min(step, decay_steps) / decay_steps
        if zero_after is not None and fraction >= 2 * zero_after:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * fraction))
    return fn


def restart_decay(decay_steps: int, num_periods: float = 1, zero_after: float | None = None) -> Callable[[int], float]:
    """0.5 * (1 + cos(pi * ((num_periods * step) mod decay_steps) / decay_steps))."""
    def fn(step: int) -> float:
        step = min(step, decay_steps)
        if zero_after is not None and num_periods * step / decay_steps >= zero_after:
            return 0.0
        fraction = math.fmod(num_periods * step, decay_steps) / decay_steps
        return 0.5 * (1.0 + math.cos(math.pi * fraction))
    return fn


SIGN_DECAYS = {"linear": linear_decay, "cosine": cosine_decay, "restart": restart_decay}


def _sign_decay_fn(sign_decay: str | Callable[[int], float] | None, decay_steps: int | None) -> Callable[[int], float] | None:
    if sign_decay is None or callable(sign_decay):
        return sign_decay
    if sign_decay not in SIGN_DECAYS:
        raise ValueError(f"unknown sign_decay {sign_decay!r}; choose from {sorted(SIGN_DECAYS)}, a callable or None")
    if not decay_steps or decay_steps < 1:
        raise ValueError(f"sign_decay={sign_decay!r} needs decay_steps >= 1 (the length of training)")
    return SIGN_DECAYS[sign_decay](decay_steps)


class _SignOptimizer(torch.optim.Optimizer):
    """Shared loop of PowerSign and AddSign: m = beta m + (1 - beta) g, s = sign(g) sign(m)."""

    def __init__(self, params, lr: float, beta: float, sign_decay, decay_steps: int | None,
                 fused: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}: it must be >= 0")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"invalid beta {beta}: it must be in [0, 1)")
        self._decay_fn = _sign_decay_fn(sign_decay, decay_steps)
        self._fused_arg = fused
        self._fused_on: bool | None = None
        super().__init__(params, dict(lr=lr, beta=beta))

    @property
    def fused(self) -> bool | None:
        """Whether steps take the fused path (None before the first step decides)."""
        if self._fused_on is None:
            return None
        return self._fused_on and _fused.available()

    def _multiplier(self, s: list[Tensor], decay: float, group: dict) -> list[Tensor]:
        raise NotImplementedError

    def _fused_kernel(self, decay: float) -> tuple[Any, float, float]:
        """The fused step, the scale of sign(g) sign(m) and alpha."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["step"] = 0
                    self.state[p]["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads = [p.grad for p in params]
            ms = [self.state[p]["m"] for p in params]
            step = self.state[params[0]]["step"]
            decay = 1.0 if self._decay_fn is None else float(self._decay_fn(step))
            if self._fused_on is None:
                self._fused_on = _fused.use_fused(self._fused_arg, [p for g in self.param_groups for p in g["params"]])
            if self._fused_on:
                fs, scale, alpha = self._fused_kernel(decay)
                if all(fs.ready(dt, dev) for dt, dev in {(p.dtype, p.device) for p in params}):
                    fs.run(params, grads, {"m": ms}, [group["lr"], 1.0 - group["beta"], scale, alpha])
                    for p in params:
                        self.state[p]["step"] = step + 1
                    continue
            torch._foreach_lerp_(ms, grads, 1.0 - group["beta"])
            s = torch._foreach_sign(grads)
            torch._foreach_mul_(s, torch._foreach_sign(ms))
            mult = self._multiplier(s, decay, group)
            torch._foreach_mul_(mult, grads)
            torch._foreach_add_(params, mult, alpha=-group["lr"])
            for p in params:
                self.state[p]["step"] = step + 1
        return loss


class PowerSign(_SignOptimizer):
    """PowerSign (Bello et al. 2017): ``w <- w - lr * base^(decay(t) * sign(g) * sign(m)) * g``.

    With ``base=e`` and no decay this is the paper's ``g * exp(sign(g) * sign(m))``.
    ``sign_decay`` is None, "linear", "cosine", "restart" (TensorFlow's released
    schedules, over ``decay_steps``) or a callable of the 0-based step. ``fused``: as for
    ``NOSOptimizer`` (one compiled kernel per step; the decay is a tensor input, so a
    schedule never recompiles).
    """

    def __init__(self, params, lr: float = 0.1, base: float = math.e, beta: float = 0.9,
                 sign_decay: str | Callable[[int], float] | None = None, decay_steps: int | None = None,
                 fused: bool | None = None):
        if not base > 0:
            raise ValueError(f"invalid base {base}: it must be > 0")
        self.base = base
        super().__init__(params, lr, beta, sign_decay, decay_steps, fused)

    def _fused_kernel(self, decay):
        return _fused.powersign_step(), decay * math.log(self.base), 0.0

    def _multiplier(self, s, decay, group):
        torch._foreach_mul_(s, decay * math.log(self.base))
        torch._foreach_exp_(s)
        return s


class AddSign(_SignOptimizer):
    """AddSign (Bello et al. 2017): ``w <- w - lr * (alpha + decay(t) * sign(g) * sign(m)) * g``."""

    def __init__(self, params, lr: float = 0.1, alpha: float = 1.0, beta: float = 0.9,
                 sign_decay: str | Callable[[int], float] | None = None, decay_steps: int | None = None,
                 fused: bool | None = None):
        self.alpha = alpha
        super().__init__(params, lr, beta, sign_decay, decay_steps, fused)

    def _fused_kernel(self, decay):
        return _fused.addsign_step(), decay, self.alpha

    def _multiplier(self, s, decay, group):
        torch._foreach_mul_(s, decay)
        torch._foreach_add_(s, self.alpha)
        return s
