"""How the convnet task scores a rule: the ``Protocol`` (the paper's section 4.2 and the
smaller presets), its multi-fidelity fields (successive halving of the rate sweep, hurdles)
and their validation. Plain data: no torch, so a protocol can be built and checked anywhere."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["DRAWS", "PAPER_LRS", "PRESETS", "SCHEDULES", "Protocol", "auto_rungs", "check_fidelity",
           "resolve_protocol", "rung_plan"]

SCHEDULES = ("fixed", "halving")


# ----------------------------------------------------------------------------- schedule
def auto_rungs(n_rates: int, eta: int) -> int:
    """Rungs of a halving sweep when ``rungs`` is None: halve while at least 2 rates would remain."""
    k = 1
    while math.ceil(n_rates / eta ** k) >= 2:
        k += 1
    return k


def rung_plan(n_rates: int, sweep_steps: int, schedule: str = "fixed", eta: int = 3,
              rungs: int | None = None) -> list[tuple[int, int]]:
    """(rates kept per rule, minibatches trained to) of each sweep rung; the last ends at ``sweep_steps``.

    >>> rung_plan(5, 50, "halving", 3)
    [(5, 17), (2, 50)]
    >>> rung_plan(7, 100, "fixed")
    [(7, 100)]
    """
    if schedule == "fixed":
        return [(n_rates, sweep_steps)]
    k = rungs if rungs is not None else auto_rungs(n_rates, eta)
    return [(max(1, math.ceil(n_rates / eta ** r)), math.ceil(sweep_steps / eta ** (k - 1 - r))) for r in range(k)]


def check_fidelity(p: Protocol) -> None:
    """Validate (and normalise) the multi-fidelity fields of ``p``; ValueError names the bad one."""
    if p.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {p.schedule!r}")
    for name, low in (("eta", 2), ("rungs", 1), ("hurdle_warmup", 0)):
        value = getattr(p, name)
        if name == "rungs" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, lo, hi in (("hurdle", 0.0, 1.0), ("hurdle_quantile", 0.0, 1.0)):
        value = getattr(p, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= float(value) <= hi):
            raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}] or None, got {value!r}")
        object.__setattr__(p, name, float(value))
    if p.final_hurdle is not None:
        value = p.final_hurdle
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
            raise ValueError(f"final_hurdle must be a number in [0, 1] (the validation accuracy a rule needs at the "
                             f"final training's checkpoint) or None, got {value!r}")
        object.__setattr__(p, "final_hurdle", float(value))
    if p.final_rung is not None:
        if p.final_hurdle is None:
            raise ValueError("final_rung (the final training's checkpoint) applies with final_hurdle only")
        value = p.final_rung
        if isinstance(value, bool) or not isinstance(value, int) or value < p.batch_size or value % p.batch_size:
            raise ValueError(f"final_rung must be a whole number of minibatches of the final training, in images: "
                             f"a positive multiple of batch_size {p.batch_size}, got {value!r}")
    if p.final_hurdle is not None and p.final_rung_images >= p.final_images:
        raise ValueError(f"final_rung must be fewer images than the final training's {p.final_images:,}, got "
                         f"{p.final_rung_images:,}" + ("" if p.final_rung is not None else
                                                       " (the default: final images / eta); set final_rung"))
    if p.hurdle is not None and p.hurdle_quantile is not None:
        raise ValueError("set hurdle (a fixed threshold) or hurdle_quantile (a rolling one), not both")
    if p.schedule == "fixed" and p.rungs is not None:
        raise ValueError("rungs applies to schedule='halving' only")
    steps = (p.sweep_examples // p.batch_size) * p.sweep_epochs
    plan = rung_plan(len(p.lrs), steps, p.schedule, p.eta, p.rungs)
    stops = [s for _, s in plan]
    if any(b <= a for a, b in zip(stops, stops[1:])):
        raise ValueError(f"the sweep ({steps} minibatches) is too short for {len(plan)} rungs with eta {p.eta}: "
                         f"rung ends {stops}; use fewer rungs or a longer sweep")


# ------------------------------------------------------------------------- protocol
PAPER_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: runs of the protocol a stochastic rule's reward averages (chosen by measurement: docs/guarantees.md)
DRAWS = 1


@dataclass(frozen=True)
class Protocol:
    """How a rule is scored. The defaults are the paper's (section 4.2); see ``PRESETS``.

    Attributes:
        lrs: the learning rates of the sweep.
        sweep_examples: training examples each rate is tried on.
        sweep_epochs: epochs over them per rate.
        train_examples: training examples of the final run at the best rate (45,000 = all).
        train_epochs: epochs of the final run.
        val_examples: held-out validation images for rate selection and the reward.
        batch_size: minibatch size of every run.
        filters: filters of both convolutions.
        seed: initial weights, minibatch order and drop/noise draws.
        split_seed: the seed of the 45k/5k train/validation split.

    Multi-fidelity (``nos_gym.tasks.convnet.fidelity``; all off by default, and then absent from
    ``to_dict()``, so the fixed protocols keep their fingerprints):

        schedule: "fixed" (every rate for the whole sweep, the paper's) or "halving":
            successive halving over the rates -- all rates briefly, the best ``1/eta`` of a
            rule's rates trained on, ..., the last rung ending at the full sweep.
        eta: the fraction kept at each rung (``ceil(n / eta)`` of ``n`` rates) and the ratio
            of successive rung lengths.
        rungs: sweep rungs of "halving"; None: as many as keep at least 2 rates in the last.
        hurdle: the sweep accuracy a rule needs to get the final training; a rule below it
            scores its sweep accuracy (``metrics["fidelity"] == "sweep"``). A fixed number,
            so a score depends on the task and the rule only. None: no fixed hurdle.
        hurdle_quantile: a rolling hurdle instead (AutoML-Zero's): this quantile of the sweep
            accuracies of the rules this task object scored before. Order-dependent: a
            rule's score then depends on what was scored before it (see ``fidelity``).
        hurdle_warmup: rules the rolling hurdle lets through before it applies.
        final_hurdle: successive halving of the final training, per rule, with a fixed
            threshold: the final training stops at a checkpoint (``final_rung``) and
            validates; a rule whose validation accuracy there is below ``final_hurdle`` (or
            that diverged) stops and scores that accuracy (``metrics["fidelity"] ==
            "final-rung"``, ``child_images`` counting only what it trained). A rule at or
            above it trains on from the checkpoint on the same trajectory (weights, batch
            norm, rule state, minibatches), so it scores exactly what it scores without
            ``final_hurdle`` (with one rule per group, the CPU default; in a larger group the
            survivors go on as a smaller one, which changes scores only by float rounding).
            A fixed number, so a score depends on the task and the rule only. None
            (default): no checkpoint.
        final_rung: images of the final training at the checkpoint (counted over all its
            epochs, a whole number of minibatches, fewer than the final training's); None:
            the final training's images divided by ``eta``, rounded down to whole minibatches.
            Only with ``final_hurdle``.
    """

    lrs: tuple[float, ...] = PAPER_LRS
    sweep_examples: int = 10_000
    sweep_epochs: int = 1
    train_examples: int = 45_000
    train_epochs: int = 5
    val_examples: int = 5_000
    batch_size: int = 100
    filters: int = 32
    seed: int = 0
    split_seed: int = 0
    schedule: str = "fixed"
    eta: int = 3
    rungs: int | None = None
    hurdle: float | None = None
    hurdle_quantile: float | None = None
    hurdle_warmup: int = 20
    final_hurdle: float | None = None
    final_rung: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(float(x) for x in self.lrs))
        if not self.lrs or any(not (math.isfinite(x) and x > 0) for x in self.lrs):
            raise ValueError(f"lrs must be a non-empty list of positive numbers, got {self.lrs}")
        for name in ("sweep_examples", "sweep_epochs", "train_examples", "train_epochs",
                     "val_examples", "batch_size", "filters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size > min(self.sweep_examples, self.train_examples):
            raise ValueError(f"batch_size {self.batch_size} is larger than the training sets "
                             f"({self.sweep_examples} sweep / {self.train_examples} final examples)")
        if self.train_examples > 45_000 or self.sweep_examples > 45_000:
            raise ValueError("the training split has 45,000 images: sweep_examples and train_examples must not exceed it")
        if self.val_examples > 5_000:
            raise ValueError("the validation split has 5,000 images: val_examples must not exceed it")
        check_fidelity(self)  # the multi-fidelity fields; raises ValueError

    @property
    def child_images(self) -> int:
        """Images one candidate's children are trained on (whole minibatches): 295,000 for "paper"."""
        def run(n: int, epochs: int) -> int:
            return (n // self.batch_size) * self.batch_size * epochs
        return len(self.lrs) * run(self.sweep_examples, self.sweep_epochs) + run(self.train_examples, self.train_epochs)

    @property
    def final_images(self) -> int:
        """Images of the final training at the best rate (whole minibatches): 225,000 for "paper"."""
        return (self.train_examples // self.batch_size) * self.batch_size * self.train_epochs

    @property
    def final_rung_images(self) -> int | None:
        """Images of the final training at its checkpoint (``final_rung`` or its default); None without
        ``final_hurdle``."""
        if self.final_hurdle is None:
            return None
        if self.final_rung is not None:
            return self.final_rung
        return max(1, self.final_images // self.eta // self.batch_size) * self.batch_size

    @property
    def multi_fidelity(self) -> bool:
        """Whether a multi-fidelity field is set (halving, a hurdle): scored by ``nos_gym.tasks.convnet.fidelity``."""
        return any(getattr(self, k) != v for k, v in {**_FIDELITY_DEFAULTS, **_FINAL_HURDLE_DEFAULTS}.items())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lrs"] = list(self.lrs)
        if not any(getattr(self, k) != v for k, v in _FIDELITY_DEFAULTS.items()):
            for k in _FIDELITY_DEFAULTS:  # the fixed protocols' dicts (and fingerprints) as before these fields
                del d[k]
        if self.final_hurdle is None:  # every dict (and fingerprint) as before the final hurdle
            for k in _FINAL_HURDLE_DEFAULTS:
                del d[k]
        return d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Protocol:
        """A named preset ("paper", "fast", "ci") with some fields changed."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name].to_dict(), **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Protocol:
        """From a mapping of field values; a ``"preset"`` key names the preset the others change."""
        d = dict(d)
        base = d.pop("preset", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown protocol fields {unknown}; the fields are {sorted(known)}")
        if base is not None:
            return cls.preset(base, **d)
        return cls(**d)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> Protocol:
        """From a YAML file (or YAML text) holding a mapping, e.g. ``{preset: fast, train_epochs: 3}``."""
        import yaml

        path = Path(str(source))
        is_file = path.suffix in (".yaml", ".yml") or ("\n" not in str(source) and path.is_file())
        text = path.read_text() if is_file else str(source)
        d = yaml.safe_load(text)
        if not isinstance(d, Mapping):
            raise ValueError(f"a protocol in YAML is a mapping of fields, got {type(d).__name__}")
        return cls.from_dict(d)


_FIDELITY_DEFAULTS = {f.name: f.default for f in fields(Protocol)
                      if f.name in ("schedule", "eta", "rungs", "hurdle", "hurdle_quantile", "hurdle_warmup")}
# added later: left out of every dict while off, so no earlier protocol's fingerprint changes
_FINAL_HURDLE_DEFAULTS = {f.name: f.default for f in fields(Protocol) if f.name in ("final_hurdle", "final_rung")}

PRESETS: dict[str, Protocol] = {
    # section 4.2 exactly: 295,000 child-images per candidate
    "paper": Protocol(),
    # one GPU in minutes: 5 rates on 5,000 examples, 2 epochs on 20,000 (65,000 child-images)
    "fast": Protocol(lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), sweep_examples=5_000, train_examples=20_000,
                     train_epochs=2),
    # two CPU cores: fast's 5 rates on 1,000 examples, ONE epoch of 16,000 at the best, 2,000 for
    # validation, batch 50: 21,000 child-images (a third of "fast"). Chosen by measurement: of the
    # CPU-sized candidates it ranks rules most like "fast" (benchmarks/fidelity_quality.py --part preset;
    # the study is in docs/results.md, "The cpu preset of the child task"). One pass over more distinct
    # images ranks like fast better than more epochs over fewer, which favour Adam-like rules over the
    # sign rules. Seed noise bounds what any small protocol can show, as the good rules lie close together:
    # "cpu" separates working rules from the rest reliably and orders near-equals by chance; promote its
    # leaders to "fast" (nos-gym promote RUN --preset fast). Multi-fidelity form for searches:
    # {preset: cpu, schedule: halving, hurdle: 0.277}, about a third of the child-images (nos_gym.tasks.convnet.fidelity).
    "cpu": Protocol(lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), sweep_examples=1_000, train_examples=16_000, train_epochs=1,
                    val_examples=2_000, batch_size=50),
    # seconds on a CPU: 2 rates on 1,000 examples, 2 epochs of 1,000 at the best, 500 for validation
    "ci": Protocol(lrs=(1e-3, 1e-1), sweep_examples=1_000, train_examples=1_000, train_epochs=2,
                   val_examples=500, batch_size=50),
}


def resolve_protocol(preset: str | Protocol | Mapping[str, Any] | os.PathLike, overrides: Mapping[str, Any]) -> Protocol:
    if isinstance(preset, Protocol):
        base = preset
    elif isinstance(preset, Mapping):
        base = Protocol.from_dict(preset)
    elif isinstance(preset, (str, os.PathLike)) and Path(str(preset)).suffix in (".yaml", ".yml"):
        base = Protocol.from_yaml(preset)
    elif isinstance(preset, str):
        base = Protocol.preset(preset)
    else:
        raise TypeError(f"preset must be a preset name, a Protocol, a dict or a YAML path; got {type(preset).__name__}")
    return Protocol.from_dict({**base.to_dict(), **overrides}) if overrides else base
