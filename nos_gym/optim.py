"""Drop-in ``torch.optim`` optimizers: any rule of the language, PowerSign, AddSign, Table 1.

>>> opt = NOSOptimizer(model.parameters(), rule="g * exp(sign(g) * sign(m))", lr=1e-3)
>>> opt = PowerSign(model.parameters(), lr=1e-3, sign_decay="cosine", decay_steps=10_000)
>>> table1()["optimizer_2"]   # 'drop(m, 0.3) * exp(1e-3 * w)'

They follow ``torch.optim``'s conventions: every hyper-parameter is a param-group option
(its constructor argument is the default, a group may set its own, and ``state_dict``
saves and restores each group's), ``weight_decay`` is decoupled as in ``torch.optim.AdamW``
and ``maximize`` ascends the objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from nos_gym.dsl import Program
from nos_gym.dsl.table1 import TABLE1, get_rule, table1  # re-exported: the optimizers' names for rules
from nos_gym.engine import fused as _fused
from nos_gym.engine.random_streams import stream_seed
from nos_gym.engine.rules import Draws, Hyper, Inputs, apply_rule, needed_averages, update_averages

__all__ = ["AddSign", "NOSOptimizer", "PowerSign", "SIGN_DECAYS", "TABLE1", "cosine_decay", "get_rule",
           "linear_decay", "restart_decay", "table1"]


# ------------------------------------------------------------------ the shared loop
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class _Optimizer(torch.optim.Optimizer):
    """The step loop of NOSOptimizer, PowerSign and AddSign.

    Steps are counted per parameter, in ``state[p]["step"]`` (0 before the first step), as
    torch's optimizers count them. A step updates the parameters of a group that have a
    gradient together, in buckets of those that share a step count and a device (normally
    one bucket). For each bucket: the gradients are negated if ``maximize``; the weights are
    multiplied by ``1 - lr * weight_decay`` if ``weight_decay`` (decoupled weight decay, as
    ``torch.optim.AdamW`` applies it: before the update, so a rule that reads ``w`` reads the
    decayed weights); then the subclass's update runs and the step counts advance by one.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], fused: bool | None):
        self._fused_arg = fused
        self._fused_on: bool | None = None  # decided at the first step (it depends on the sizes)
        super().__init__(params, defaults)

    @property
    def fused(self) -> bool | None:
        """Whether steps take the fused path (None before the first step decides)."""
        if self._fused_on is None:
            return None
        return self._fused_on and _fused.available()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim.Optimizer`` does), its options checked first."""
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError, in one line, for an option out of range."""
        _check(group["lr"] >= 0.0, f"invalid learning rate {group['lr']}: it must be >= 0")
        _check(group["weight_decay"] >= 0.0, f"invalid weight_decay {group['weight_decay']}: it must be >= 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved before an option existed take this optimizer's default
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """The state of ``p`` before its first step, besides the step count."""
        raise NotImplementedError

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], step: int) -> None:
        """Update ``params`` (and their state) at 0-based step ``step`` from ``grads``."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step of every parameter that has a gradient; returns ``closure()``'s loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._fused_on is None:
            self._fused_on = _fused.use_fused(self._fused_arg, [p for g in self.param_groups for p in g["params"]])
        for group in self.param_groups:
            buckets: dict[tuple[int, torch.device], list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    self._init_state(p, state)
                buckets.setdefault((state["step"], p.device), []).append(p)
            for (step, _), params in buckets.items():
                grads = [p.grad for p in params]
                if group["maximize"]:
                    grads = torch._foreach_neg(grads)
                if group["weight_decay"] != 0:
                    torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
                self._update(group, params, grads, step)
                for p in params:
                    self.state[p]["step"] = step + 1
        return loss


# --------------------------------------------------------------------- NOSOptimizer
def _group_hyper(group: dict[str, Any]) -> Hyper:
    b1, b2, b3 = group["betas"]
    return Hyper(beta1=b1, beta2=b2, beta3=b3, eps=group["eps"], bias_correction=group["bias_correction"],
                 noise_std=group["noise_std"])


class NOSOptimizer(_Optimizer):
    """Any update rule of the language as a ``torch.optim.Optimizer``.

    ``w <- w - lr * rule(g, m, v, y, w)``, computed with ``torch._foreach_*`` kernels over
    all parameters of a group at once. Only the running averages the rule reads are kept.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        rule: a rule in paper notation, a Table 1 name (``table1()``) or a ``Program``.
        lr: learning rate.
        hyper: all of ``betas``, ``eps``, ``bias_correction`` and ``noise_std`` at once (default
            ``Hyper()``, the language's constants); ``betas``, ``eps``, ``bias_correction`` or
            ``noise_std`` given as well takes precedence over its field.
        seed: seeds ``drop`` and ``noise``. Their numbers come from the rule's counter-based
            stream (``nos_gym.engine.random_streams``) with stream seed
            ``stream_seed(seed, rule.canonical_key, draw)`` (``self.stream_seed``): the value
            at step t, draw site s and element index i is a fixed function of (stream seed,
            t, s, i). The element index of entry j of a parameter is j plus the number of
            entries of the parameters before it (all groups, in the order given, whether
            or not they have gradients): the parameters laid end to end, as a row of
            ``BatchedRule`` lays a ``ChildNet`` out (``nos_gym.tasks.convnet.network.layout``). So
            ``NOSOptimizer(params, rule, seed=s, draw=j)`` draws what
            ``BatchedRule([rule], seeds=[stream_seed(s, key, j)])`` draws on the flat row,
            and what a task with seed s draws for the rule's draw j.
        draw: which of the rule's draws under ``seed`` (0, 1, ...; see ``stream_seed``).
        fused: the fused path (``nos_gym.engine.fused``): the rule's whole per-parameter step
            compiled by ``torch.compile`` into one kernel, with a one-off compile cost per
            rule (inductor's on-disk cache shortens later ones). ``None`` (default): fused
            when the optimizer holds at least ``nos_gym.engine.fused.FUSED_MIN_NUMEL`` (2^20)
            entries on CPU or CUDA, else foreach; ``True``: fused whatever the size;
            ``False``: foreach. Where compiling fails (no C++ compiler, unsupported
            platform), ``None`` and ``True`` warn once (``FusedUnavailableWarning``) and
            use the foreach path. Both paths compute the same arithmetic and draw the same
            random numbers; results agree to float rounding (the compiled kernel may
            contract or reorder float ops), not bit for bit.
        betas (keyword-only, as all below): decay rates of the running averages ``m``,
            ``v`` and ``y`` (section 4.2); a pair, as ``torch.optim.Adam`` takes, sets those
            of ``m`` and ``v`` and keeps ``y``'s.
        eps: the ``eps`` of the language's divisions and of ``ADAM``/``RMSProp``.
        bias_correction: whether the running averages are bias-corrected.
        noise_std: the standard deviation of the operand ``noise``.
        weight_decay: decoupled weight decay, as ``torch.optim.AdamW``'s: each step first
            multiplies the weights by ``1 - lr * weight_decay``, then takes the rule's step
            (a rule that reads ``w`` reads the decayed weights).
        maximize: ascend the objective (the rule sees ``-g``: the same steps as minimizing
            the negated loss).

    ``lr``, ``betas``, ``eps``, ``bias_correction``, ``noise_std``, ``weight_decay`` and
    ``maximize`` are param-group options: a group may set its own. ``state_dict()`` carries
    them per group (as torch's optimizers do), the rule (tokens, paper notation, canonical
    key) and the draws' seed; ``load_state_dict`` raises ``ValueError`` for a state of another
    rule (one with a different canonical key) and restores the saved groups' options.
    """

    def __init__(self, params: Iterable[Any], rule: str | Program = "powersign", lr: float = 1e-3,
                 hyper: Hyper | None = None, seed: int = 0, draw: int = 0, fused: bool | None = None, *,
                 betas: tuple[float, ...] | None = None, eps: float | None = None,
                 bias_correction: bool | None = None, noise_std: float | None = None,
                 weight_decay: float = 0.0, maximize: bool = False):
        h = Hyper() if hyper is None else hyper
        defaults = dict(lr=lr, betas=(h.beta1, h.beta2, h.beta3), eps=h.eps if eps is None else eps,
                        bias_correction=h.bias_correction if bias_correction is None else bias_correction,
                        noise_std=h.noise_std if noise_std is None else noise_std,
                        weight_decay=weight_decay, maximize=maximize)
        if betas is not None:
            defaults["betas"] = self._betas(betas, h.beta3)
        self.program = get_rule(rule)
        self._needs = sorted(needed_averages([self.program]))
        self._seed, self._draw = int(seed), int(draw)
        self.stream_seed = stream_seed(self._seed, self.program.canonical_key, self._draw)
        self._offsets: dict[Tensor, int] = {}  # parameter -> element index of its first entry
        self._numel = 0
        super().__init__(params, defaults, fused)

    @staticmethod
    def _betas(betas: Any, beta3: float) -> tuple[float, float, float]:
        betas = tuple(betas)
        _check(len(betas) in (2, 3), f"betas must be (beta1, beta2) or (beta1, beta2, beta3), not {betas!r}")
        return betas if len(betas) == 3 else (*betas, beta3)

    @property
    def hyper(self) -> Hyper:
        """The first param group's betas, eps, bias correction and noise scale (all groups' unless set per group)."""
        return _group_hyper(self.param_groups[0])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim.Optimizer`` does); its entries continue the element index."""
        if "betas" in param_group:
            param_group = {**param_group, "betas": self._betas(param_group["betas"], self.defaults["betas"][2])}
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:  # laid end to end, in the order given
            self._offsets[p] = self._numel
            self._numel += p.numel()

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        for i, beta in enumerate(group["betas"]):
            _check(0.0 <= beta < 1.0, f"invalid beta{i + 1} {beta}: it must be in [0, 1)")
        _check(group["eps"] >= 0.0, f"invalid eps {group['eps']}: it must be >= 0")
        _check(group["noise_std"] >= 0.0, f"invalid noise_std {group['noise_std']}: it must be >= 0")

    def __repr__(self) -> str:
        return f"NOSOptimizer(rule={str(self.program)!r}, lr={self.param_groups[0]['lr']})"

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        for k in self._needs:
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], step: int) -> None:
        hyper = _group_hyper(group)
        avgs = {k: [self.state[p][k] for p in params] for k in self._needs}
        if self._fused_on and self._fused_step(params, grads, avgs, step + 1, group["lr"], hyper):
            return
        update_averages(avgs, grads, hyper)
        draws = Draws(self.stream_seed, step + 1, [self._offsets[p] for p in params])
        inp = Inputs(grads, params, avgs.get("m"), avgs.get("v"), avgs.get("y"), step + 1, hyper, draws)
        direction = apply_rule(self.program, inp)
        torch._foreach_add_(params, direction, alpha=-group["lr"])

    def _fused_step(self, params: list[Tensor], grads: list[Tensor], avgs: dict[str, list[Tensor]],
                    step: int, lr: float, h: Hyper) -> bool:
        """One fused step of ``params`` (the averages advanced too); False: not available, nothing done."""
        fs = _fused.rule_step(self.program, h)
        if not all(fs.ready(dt, dev) for dt, dev in {(p.dtype, p.device) for p in params}):
            return False
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
        """torch's state (per-parameter state, param groups with their options), the draws' stream and the rule."""
        # the draws need no generator state: they are a function of the step (in ``state``)
        sd = super().state_dict()
        sd["stream"] = {"seed": self._seed, "draw": self._draw}
        sd["rule"] = self._rule_record()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (also one saved before the options were per group)."""
        state_dict = dict(state_dict)
        stream = state_dict.pop("stream", None)
        rule = state_dict.pop("rule", None)
        hyper = state_dict.pop("hyper", None)  # one Hyper for all groups: written before the options were per group
        state_dict.pop("generator_states", None)  # written before semantics version 3; nothing to restore
        if rule is not None and rule["canonical_key"] != self.program.canonical_key:
            raise ValueError(f"this state_dict is of rule {rule['notation']!r} (canonical key "
                             f"{rule['canonical_key']!r}), not this optimizer's rule {str(self.program)!r} "
                             f"(canonical key {self.program.canonical_key!r})")
        if hyper is not None:
            h = Hyper(**hyper)
            legacy = dict(betas=(h.beta1, h.beta2, h.beta3), eps=h.eps, bias_correction=h.bias_correction,
                          noise_std=h.noise_std)
            state_dict["param_groups"] = [{**legacy, **g} for g in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
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


class _SignOptimizer(_Optimizer):
    """Shared update of PowerSign and AddSign: m = beta m + (1 - beta) g, s = sign(g) sign(m)."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], fused: bool | None):
        self._decay_fns: dict[tuple[str, int | None], Callable[[int], float]] = {}
        super().__init__(params, defaults, fused)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        _check(0.0 <= group["beta"] < 1.0, f"invalid beta {group['beta']}: it must be in [0, 1)")
        self._decay_fn(group)  # raises for an unknown schedule or a missing decay_steps

    def _decay_fn(self, group: dict[str, Any]) -> Callable[[int], float] | None:
        """The group's schedule: ``sign_decay`` itself if None or a callable, else the named one (built once)."""
        if group["sign_decay"] is None or callable(group["sign_decay"]):
            return _sign_decay_fn(group["sign_decay"], group["decay_steps"])
        key = (group["sign_decay"], group["decay_steps"])
        if key not in self._decay_fns:
            self._decay_fns[key] = _sign_decay_fn(*key)
        return self._decay_fns[key]

    def _multiplier(self, s: list[Tensor], decay: float, group: dict[str, Any]) -> list[Tensor]:
        raise NotImplementedError

    def _fused_kernel(self, decay: float, group: dict[str, Any]) -> tuple[Any, float, float]:
        """The fused step, the scale of sign(g) sign(m) and alpha."""
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], step: int) -> None:
        ms = [self.state[p]["m"] for p in params]
        decay_fn = self._decay_fn(group)
        decay = 1.0 if decay_fn is None else float(decay_fn(step))
        if self._fused_on:
            fs, scale, alpha = self._fused_kernel(decay, group)
            if all(fs.ready(dt, dev) for dt, dev in {(p.dtype, p.device) for p in params}):
                fs.run(params, grads, {"m": ms}, [group["lr"], 1.0 - group["beta"], scale, alpha])
                return
        torch._foreach_lerp_(ms, grads, 1.0 - group["beta"])
        s = torch._foreach_sign(grads)
        torch._foreach_mul_(s, torch._foreach_sign(ms))
        mult = self._multiplier(s, decay, group)
        torch._foreach_mul_(mult, grads)
        torch._foreach_add_(params, mult, alpha=-group["lr"])


class PowerSign(_SignOptimizer):
    """PowerSign (Bello et al. 2017): ``w <- w - lr * base^(decay(t) * sign(g) * sign(m)) * g``.

    With ``base=e`` and no decay this is the paper's ``g * exp(sign(g) * sign(m))``.
    ``sign_decay`` is None, "linear", "cosine", "restart" (TensorFlow's released schedules,
    over ``decay_steps``) or a callable of the 0-based step (a state_dict then holds the
    callable: name a schedule for one that ``torch.load(weights_only=True)`` reads).
    ``weight_decay`` is decoupled, as ``torch.optim.AdamW``'s: each step first multiplies
    the weights by ``1 - lr * weight_decay``. ``maximize`` ascends the objective (the
    steps of minimizing the negated loss). ``fused``: as for ``NOSOptimizer`` (one compiled
    kernel per step; the decay is a tensor input, so a schedule never recompiles).

    ``lr``, ``base``, ``beta``, ``sign_decay``, ``decay_steps``, ``weight_decay`` and
    ``maximize`` are param-group options: a group may set its own, and ``state_dict`` saves
    each group's. Steps are counted per parameter; the decay is that of the 0-based step.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, base: float = math.e, beta: float = 0.9,
                 sign_decay: str | Callable[[int], float] | None = None, decay_steps: int | None = None,
                 fused: bool | None = None, *, weight_decay: float = 0.0, maximize: bool = False):
        defaults = dict(lr=lr, base=base, beta=beta, sign_decay=sign_decay, decay_steps=decay_steps,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, fused)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check(group["base"] > 0, f"invalid base {group['base']}: it must be > 0")
        super()._check_group(group)

    def _fused_kernel(self, decay: float, group: dict[str, Any]) -> tuple[Any, float, float]:
        return _fused.powersign_step(), decay * math.log(group["base"]), 0.0

    def _multiplier(self, s: list[Tensor], decay: float, group: dict[str, Any]) -> list[Tensor]:
        torch._foreach_mul_(s, decay * math.log(group["base"]))
        torch._foreach_exp_(s)
        return s


class AddSign(_SignOptimizer):
    """AddSign (Bello et al. 2017): ``w <- w - lr * (alpha + decay(t) * sign(g) * sign(m)) * g``.

    The other arguments and the param-group options are PowerSign's, with ``alpha`` in
    place of ``base``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, alpha: float = 1.0, beta: float = 0.9,
                 sign_decay: str | Callable[[int], float] | None = None, decay_steps: int | None = None,
                 fused: bool | None = None, *, weight_decay: float = 0.0, maximize: bool = False):
        defaults = dict(lr=lr, alpha=alpha, beta=beta, sign_decay=sign_decay, decay_steps=decay_steps,
                        weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, fused)

    def _fused_kernel(self, decay: float, group: dict[str, Any]) -> tuple[Any, float, float]:
        return _fused.addsign_step(), decay, group["alpha"]

    def _multiplier(self, s: list[Tensor], decay: float, group: dict[str, Any]) -> list[Tensor]:
        torch._foreach_mul_(s, decay)
        torch._foreach_add_(s, group["alpha"])
        return s
