"""Drop-in ``torch.optim`` optimizers: any rule of the language, PowerSign, AddSign, Table 1.

>>> opt = NOSOptimizer(model.parameters(), rule="g * exp(sign(g) * sign(m))", lr=1e-3)
>>> opt = PowerSign(model.parameters(), lr=1e-3, sign_decay="cosine", decay_steps=10_000)
>>> table1()["optimizer_2"]   # 'drop(m, 0.3) * exp(1e-3 * w)'
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from nos_gym.dsl import Program
from nos_gym.dsl.table1 import TABLE1, get_rule, table1  # re-exported: the optimizers' names for rules
from nos_gym.rules import Hyper, Inputs, apply_rule, needed_averages, update_averages

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
        seed: seeds the generator used by ``drop`` and ``noise``.
    """

    def __init__(self, params: Iterable[Any], rule: str | Program = "powersign", lr: float = 1e-3,
                 hyper: Hyper = Hyper(), seed: int = 0):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}: it must be >= 0")
        self.program = get_rule(rule)
        self.hyper = hyper
        self._needs = sorted(needed_averages([self.program]))
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        super().__init__(params, dict(lr=lr))

    def __repr__(self) -> str:
        return f"NOSOptimizer(rule={str(self.program)!r}, lr={self.param_groups[0]['lr']})"

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return gen

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
            for (step, device), params in buckets.items():
                grads = [p.grad for p in params]
                avgs = {k: [self.state[p][k] for p in params] for k in self._needs}
                update_averages(avgs, grads, self.hyper)
                inp = Inputs(grads, params, avgs.get("m"), avgs.get("v"), avgs.get("y"),
                             step + 1, self.hyper, self._generator(device))
                direction = apply_rule(self.program, inp)
                torch._foreach_add_(params, direction, alpha=-group["lr"])
                for p in params:
                    self.state[p]["step"] = step + 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["generator_states"] = {str(d): g.get_state() for d, g in self._generators.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gens = state_dict.pop("generator_states", {})
        super().load_state_dict(state_dict)
        for device, gstate in gens.items():
            self._generator(torch.device(device)).set_state(gstate)


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

    def __init__(self, params, lr: float, beta: float, sign_decay, decay_steps: int | None):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}: it must be >= 0")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"invalid beta {beta}: it must be in [0, 1)")
        self._decay_fn = _sign_decay_fn(sign_decay, decay_steps)
        super().__init__(params, dict(lr=lr, beta=beta))

    def _multiplier(self, s: list[Tensor], decay: float, group: dict) -> list[Tensor]:
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
            torch._foreach_lerp_(ms, grads, 1.0 - group["beta"])
            step = self.state[params[0]]["step"]
            decay = 1.0 if self._decay_fn is None else float(self._decay_fn(step))
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
    schedules, over ``decay_steps``) or a callable of the 0-based step.
    """

    def __init__(self, params, lr: float = 0.1, base: float = math.e, beta: float = 0.9,
                 sign_decay: str | Callable[[int], float] | None = None, decay_steps: int | None = None):
        if not base > 0:
            raise ValueError(f"invalid base {base}: it must be > 0")
        self.base = base
        super().__init__(params, lr, beta, sign_decay, decay_steps)

    def _multiplier(self, s, decay, group):
        torch._foreach_mul_(s, decay * math.log(self.base))
        torch._foreach_exp_(s)
        return s


class AddSign(_SignOptimizer):
    """AddSign (Bello et al. 2017): ``w <- w - lr * (alpha + decay(t) * sign(g) * sign(m)) * g``."""

    def __init__(self, params, lr: float = 0.1, alpha: float = 1.0, beta: float = 0.9,
                 sign_decay: str | Callable[[int], float] | None = None, decay_steps: int | None = None):
        self.alpha = alpha
        super().__init__(params, lr, beta, sign_decay, decay_steps)

    def _multiplier(self, s, decay, group):
        torch._foreach_mul_(s, decay)
        torch._foreach_add_(s, self.alpha)
        return s
