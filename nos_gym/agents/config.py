"""Agent settings: one dataclass per agent, filled from defaults, a YAML file and flags.

Every agent script declares ``@dataclass class Args(RunArgs)`` with its own settings on
top of the ones every run shares (``RunArgs``). ``parse_args(Args, argv)`` hands the
dataclass to tyro (https://brentyi.github.io/tyro/), so every setting is a flag
(``--max-kl 0.02``, ``--no-progress``; ``--max_kl`` too) whose help is the field's docstring,
and ``--config configs/NAME.yaml`` loads a file first (flags given as well win).

Precedence: dataclass defaults < ``--preset`` (a named bundle of an agent's settings, its ``PRESETS``;
named by a flag or by the file) < ``--config`` file < flags. With ``--resume RUN_DIR`` the
run's saved ``config.yaml`` replaces the defaults and the file; only ``RESUME_OVERRIDABLE``
settings (the budget, the progress bar, threads, top-k, the evaluation time limit, the Ray
address) may be changed by flags. Files are read with ``yaml.safe_load`` (plain data, never
objects), and mappings and lists on the command line are YAML/JSON text read the same way.

A bad setting stops at once with a ``ConfigError`` that names the key and what is allowed:
an unknown key (with the closest known one), a wrong type (a bool is not an int, a string
is not a bool), a non-finite float (nan, inf), a value out of range, an unknown task,
search space or agent, task options the task rejects. ``RunArgs.validate()`` checks all of
it, types included (so settings built in Python are checked too), before a run directory
exists. tyro checks only what it must to read a flag (``--depth 2.5`` is no int): everything
else is checked here, for flags and files alike, so that both get the same messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import math
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, TypeVar

import tyro
import yaml

__all__ = [
    "CONTROLLER_PRESETS", "ConfigError", "MAX_DEPTH", "MAX_SEED", "RESUME_OVERRIDABLE", "ResumeDir", "RunArgs", "args_to_dict",
    "check_agent", "check_types", "load_yaml", "parse_args", "args_from_dict", "preset_args",
]


#: the built-in agents (modules ``nos_gym.agents.NAME``), in the order tables list them
AGENTS: tuple[str, ...] = ("trpo_lstm", "reinforce_lstm", "random_search", "evolution", "maskable_ppo")


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range."""


#: deepest rule a run may search. The paper searches depth 1 to 3 (the full space already
#: holds 9e13 strings at depth 3); the vocabulary, the masks and every compiled rule grow
#: with the depth, and depth 1000 takes about 2 GB and minutes before the first rule.
MAX_DEPTH = 10
#: seeds are 0 <= seed <= MAX_SEED: NumPy's legacy seeding (``np.random.seed``, used by runs
#: and by stable-baselines3) takes 32-bit seeds; torch and ``default_rng`` take these too.
MAX_SEED = 2**32 - 1


class ResumeDir(str):
    """The run directory of ``--resume`` (a ``str``); ``rebuild`` is True with ``--rebuild``."""

    rebuild: bool = False

    def __new__(cls, path: str, rebuild: bool = False) -> ResumeDir:
        obj = super().__new__(cls, path)
        obj.rebuild = bool(rebuild)
        return obj


@dataclass
class RunArgs:
    """Settings shared by every agent (each agent adds its own in a subclass)."""

    # --- what is searched -------------------------------------------------------------
    task: str = "rosenbrock"
    """task scoring each rule (``nos_gym.tasks.available()``)"""
    task_options: dict = field(default_factory=dict)
    """options passed to ``nos_gym.tasks.make(task, **task_options)``"""
    space: str = "full"
    """search space preset (``nos_gym.dsl.SPACES``)"""
    depth: int = 2
    """groups per rule: strings of 5 * depth tokens"""
    distinct_operands: bool = True
    """constraint: the two operands of a group differ"""
    no_final_addition: bool = True
    """constraint: addition is not the final binary"""
    reuse_result: bool = True
    """constraint: each later group reuses an earlier result"""
    # --- budget and batching ------------------------------------------------------------
    total_rules: int = 3000
    """budget: number of rules sampled (and scored) in the whole run"""
    num_envs: int = 100
    """rules sampled per batch; the vector env scores them as one batch"""
    seed: int = 1
    # --- where results go -------------------------------------------------------------
    run_dir: str = ""
    """run directory; empty: a new one under runs_root"""
    runs_root: str = "runs"
    store: str = "runs/store.sqlite"
    """SQLite result store every scored rule is recorded in (shared by runs; cache hits skip scoring)"""
    backend: str = "auto"
    """evaluation backend: auto (serial for cheap tasks, processes for networks), serial, process, ray"""
    eval_timeout: float | None = 3600.0
    """seconds one rule's evaluation may take before its worker is stopped and it scores 0 (process and
    ray backends; the serial backend cannot stop a rule); null/none: no limit"""
    ray_address: str = ""
    """Ray cluster to evaluate on (backend ray), e.g. auto or ray://host:10001; empty: $RAY_ADDRESS, else a
    local Ray"""
    fingerprints: bool = True
    """evaluator funnel: a deterministic rule whose behaviour on a fixed probe equals a scored rule's
    shares its score (nos_gym/evaluation/probe.py)"""
    screen: bool = True
    """evaluator funnel: a rule degenerate on the probe (non-finite, zero, blind to the gradient,
    never a descent direction) gets the task's floor score untrained"""
    top_k: int = 10
    promote: dict = field(default_factory=dict)
    """at the end of the run, re-score its best rules at a higher fidelity and save
    promoted-PRESET.txt/.json in the run directory (``nos_gym.evaluation.promotion``), e.g. {preset: fast, top: 10}
    (keys: preset, top, task_options, backend); {}: no promotion"""
    # --- this process -------------------------------------------------------------------
    torch_threads: int = 1
    """torch threads of this process (``torch.set_num_threads``)"""
    progress: bool = True
    """show a tqdm progress bar"""

    def validate(self) -> None:
        """Check types and values; subclasses extend it (calling this first). Raises ``ConfigError``.

        It also builds the task from ``task_options`` once, so options the task rejects stop
        here, before a run directory exists.
        """
        from nos_gym.dsl import SPACES
        from nos_gym.tasks import available

        check_types(self)
        if self.task not in available():
            raise ConfigError(f"config key 'task': unknown task {self.task!r}; allowed values: {available()}")
        if self.space not in SPACES:
            raise ConfigError(f"config key 'space': unknown search space {self.space!r}; "
                              f"allowed values: {sorted(SPACES)}")
        for key in ("depth", "total_rules", "num_envs", "top_k", "torch_threads"):
            _positive(self, key)
        if self.depth > MAX_DEPTH:
            raise ConfigError(f"config key 'depth' must be in [1, {MAX_DEPTH}], got {self.depth!r} (the paper searches "
                              f"depth 1 to 3; masks and compiled rules grow with the depth, and depth 1000 takes "
                              f"about 2 GB and minutes to set up)")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"config key 'seed' must be in [0, 2**32 - 1 = {MAX_SEED}], got {self.seed!r} "
                              f"(NumPy's seeding, used by runs and stable-baselines3, takes 32-bit seeds)")
        if self.backend not in ("auto", "serial", "process", "ray"):
            raise ConfigError(f"config key 'backend': unknown backend {self.backend!r}; "
                              f"allowed values: ['auto', 'serial', 'process', 'ray']")
        if self.eval_timeout is not None and not self.eval_timeout > 0:
            raise ConfigError(f"config key 'eval_timeout' must be > 0 seconds or null (no limit), "
                              f"got {self.eval_timeout!r}")
        if self.ray_address and self.backend != "ray":
            raise ConfigError(f"config key 'ray_address' ({self.ray_address!r}) is only used by the ray backend, "
                              f"but backend is {self.backend!r}; set backend: ray, or leave ray_address empty")
        if self.backend == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise ConfigError("config key 'backend': 'ray' needs Ray, which is not installed: "
                                  "pip install 'nos-gym[ray]'; or choose backend serial or process")
        check_task_options(self.task, self.task_options)
        check_promote(self.promote, self.task)


def check_promote(setting: Any, task: str) -> None:
    """Check the run setting ``promote`` (``{}``: none); ``ConfigError`` naming what is wrong."""
    from nos_gym.evaluation.promotion import PROMOTE_KEYS, promotion_options

    if not isinstance(setting, dict):
        raise ConfigError(f"config key 'promote' must be a mapping such as {{preset: fast, top: 10}} "
                          f"(or {{}} for none), got {setting!r}")
    if not setting:
        return
    unknown = sorted(set(setting) - set(PROMOTE_KEYS))
    if unknown:
        raise ConfigError(f"config key 'promote': unknown keys {unknown}; allowed keys: {list(PROMOTE_KEYS)}")
    if setting.get("preset") is None and not setting.get("task_options"):
        raise ConfigError("config key 'promote': say which fidelity to promote to, e.g. {preset: fast, top: 10}")
    top = setting.get("top", 10)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"config key 'promote': top must be an integer >= 1, got {top!r}")
    if setting.get("backend", "auto") not in ("auto", "serial", "process", "ray"):
        raise ConfigError(f"config key 'promote': unknown backend {setting['backend']!r}; "
                          f"allowed values: ['auto', 'serial', 'process', 'ray']")
    seeds = setting.get("seeds", [])
    if (not isinstance(seeds, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"config key 'promote': seeds must be a list of distinct integers >= 0 (the task seeds "
                          f"each rule is scored with, its reward their mean), got {seeds!r}")
    overrides = setting.get("task_options", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"config key 'promote': task_options must be a mapping, got {overrides!r}")
    check_task_options(task, promotion_options(task, {}, setting.get("preset"),
                                               {**overrides, **({"seed": seeds[0]} if seeds else {})}))


def check_task_options(task: str, options: dict) -> None:
    """Build ``task`` with ``options`` once; ``ConfigError`` (naming the options) if the task rejects them."""
    from nos_gym.tasks import make

    bad_keys = [k for k in options if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"config key 'task_options': option names are strings, got {bad_keys!r}")
    try:
        make(task, **options)
    except Exception as e:  # noqa: BLE001 - a task's own check: TypeError for a bad name, ValueError for a value
        reason = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, TypeError) and "unexpected keyword argument" in reason:
            import inspect

            from nos_gym.tasks import registry

            factory = registry._FACTORIES.get(task)
            try:
                names = [n for n, p in inspect.signature(factory).parameters.items()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
                reason += f"; the options of task {task!r} are {names}"
            except (TypeError, ValueError):
                pass
        raise ConfigError(f"config key 'task_options': task {task!r} rejects {options!r}: {reason}") from None


def check_types(args: Any) -> None:
    """Check (and normalise: ints given for floats become floats) every field of a settings dataclass."""
    hints = _hints(type(args))
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        try:
            checked = _check_value(f.name, value, hints[f.name])
        except TypeError:  # a field type this loader does not know (an agent's own): its validate() checks it
            continue
        if checked is not value:
            setattr(args, f.name, checked)


def _positive(args: Any, key: str, allow_zero: bool = False) -> None:
    value = getattr(args, key)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config key {key!r} must be {bound}, got {value!r}")


def check_range(args: Any, key: str, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ``ConfigError`` unless ``low <= args.key <= high`` (``low < ...`` with ``low_open``); NaN never passes."""
    value = getattr(args, key)
    if (value != value or (low is not None and (value < low or (low_open and value == low)))
            or (high is not None and value > high)):
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        raise ConfigError(f"config key {key!r} must be in {'(' if low_open else '['}{lo}, {hi}], got {value!r}")


#: ``--preset`` bundles every LSTM controller agent shares (each agent adds its own keys, e.g. TRPO's max_kl):
#:
#: - paper: the paper's network, entropy bonus and EMA baseline (section 4.2), no queue, no guided evolution;
#: - pqt: priority-queue training at the literature's settings, a queue of 10 (dso's pqt_k, brain_coder's
#:   topk) on top of the risk-seeking gradient (dso's combination);
#: - hybrid: pqt plus neural-guided evolution, half of each batch the population's children (a population
#:   of 100 and tournaments of 25: agents/evolution.py's defaults).
CONTROLLER_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"hidden_size": 150, "init_scale": 0.08, "entropy_coef": 0.0015, "baseline": "ema",
              "baseline_decay": 0.9, "risk_epsilon": 0.05, "distinct_in_batch": False, "pqt_k": 0, "pqt_weight": 1.0,
              "pqt_policy_gradient": True, "evolution_fraction": 0.0, "evolution_population": 100,
              "evolution_tournament": 25, "evolution_mutations": 1},
}
CONTROLLER_PRESETS["pqt"] = {**CONTROLLER_PRESETS["paper"], "baseline": "risk_seeking", "risk_epsilon": 0.1,
                             "pqt_k": 10, "pqt_weight": 1.0}
CONTROLLER_PRESETS["hybrid"] = {**CONTROLLER_PRESETS["pqt"], "evolution_fraction": 0.5}


@dataclass
class ControllerArgs(RunArgs):
    """Settings of the LSTM controller agents (``trpo_lstm``, ``reinforce_lstm``): the network
    (section 4.2), the entropy bonus and the baseline (``nos_gym.agents.advantage``)."""

    hidden_size: int = 150
    """LSTM hidden state size (section 4.2)"""
    init_scale: float = 0.08
    """weights start uniform in [-init_scale, init_scale] (section 4.2)"""
    entropy_coef: float = 0.0015
    """weight of the entropy bonus in the objective (section 4.2's entropy penalty)"""
    baseline: str = "ema"
    """ema: the paper's R - EMA of rewards, every rule counts; risk_seeking: only the batch's top
    risk_epsilon fraction counts, with the (1 - risk_epsilon) reward quantile as baseline (dso)"""
    baseline_decay: float = 0.9
    """EMA baseline: b <- decay * b + (1 - decay) * mean batch reward"""
    risk_epsilon: float = 0.05
    """risk_seeking: the fraction of each batch the update learns from (dso's default 0.05)"""
    distinct_in_batch: bool = False
    """count each distinct rule of a batch once in the update (a biased gradient that resists
    collapse onto one rule; see nos_gym/agents/advantage.py first_occurrences)"""
    # --- what the controller learns from besides its batch (nos_gym/agents/guidance.py) ----
    pqt_k: int = 0
    """priority-queue training (Abolafia et al. 2018): keep the best pqt_k distinct rules sampled so far
    and add pqt_weight * their mean log-likelihood to every update's objective; 0: off (the paper)"""
    pqt_weight: float = 1.0
    """weight of the queue's mean log-likelihood in the objective (pqt_k > 0)"""
    pqt_policy_gradient: bool = True
    """with pqt_k > 0, keep the policy-gradient term of the batch; false: learn from the queue and the
    entropy bonus alone (dso's pqt_use_pg false)"""
    evolution_fraction: float = 0.0
    """neural-guided evolution (dso's hybrid): round(evolution_fraction * num_envs) rules of each batch are
    children of a regularized-evolution population that the controller's samples join; the controller
    trains on the whole batch (and, with pqt_k, on the best rules of both); 0: off (the paper)"""
    evolution_population: int = 100
    """evolution_fraction > 0: rules alive in the guided population (the newest; the oldest leave)"""
    evolution_tournament: int = 25
    """evolution_fraction > 0: members drawn per tournament; the best is mutated"""
    evolution_mutations: int = 1
    """evolution_fraction > 0: token mutations per child"""
    preset: str = ""
    """a named bundle of the controller's settings applied under the config file and the flags
    (the agent's PRESETS: paper, pqt, hybrid); empty: none"""

    @property
    def evolution_children(self) -> int:
        """Rules of each batch that guided evolution writes: ``round(evolution_fraction * num_envs)``."""
        return int(round(self.evolution_fraction * self.num_envs))

    #: named bundles of settings (``--preset NAME``, ``CONTROLLER_PRESETS``); each agent adds its own keys
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = CONTROLLER_PRESETS

    def validate(self) -> None:
        super().validate()
        from nos_gym.agents.advantage import BASELINES

        check_range(self, "hidden_size", 1)
        check_range(self, "init_scale", 0.0, low_open=True)
        check_range(self, "entropy_coef", 0.0)
        if self.baseline not in BASELINES:
            raise ConfigError(f"config key 'baseline': unknown baseline {self.baseline!r}; allowed values: "
                              f"{list(BASELINES)}")
        check_range(self, "baseline_decay", 0.0, 1.0)
        check_range(self, "risk_epsilon", 0.0, 1.0, low_open=True)
        check_range(self, "pqt_k", 0)
        check_range(self, "pqt_weight", 0.0)
        check_range(self, "evolution_fraction", 0.0, 1.0)
        check_range(self, "evolution_population", 2)
        check_range(self, "evolution_tournament", 1)
        check_range(self, "evolution_mutations", 1)
        if self.evolution_children >= self.num_envs:
            raise ConfigError(f"config key 'evolution_fraction' ({self.evolution_fraction}) leaves no rule of a "
                              f"batch of {self.num_envs} to the controller (round(fraction * num_envs) = "
                              f"{self.evolution_children}); choose a smaller fraction")
        if self.evolution_tournament > self.evolution_population:
            raise ConfigError(f"config key 'evolution_tournament' ({self.evolution_tournament}) must be <= "
                              f"evolution_population ({self.evolution_population})")
        if self.pqt_k == 0 and not self.pqt_policy_gradient:
            raise ConfigError("config key 'pqt_policy_gradient' is false but pqt_k is 0: the update would learn "
                              "from nothing; set pqt_k > 0 or pqt_policy_gradient: true")
        if self.preset and self.preset not in self.PRESETS:
            raise ConfigError(f"config key 'preset': unknown preset {self.preset!r}; allowed values: "
                              f"{sorted(self.PRESETS)} (or empty for none)")


#: settings a resumed run may change (anything else would make it a different run)
RESUME_OVERRIDABLE = frozenset({"total_rules", "progress", "torch_threads", "top_k", "eval_timeout", "ray_address"})

A = TypeVar("A", bound=RunArgs)

# keys a config file may carry that are not settings of the agent itself
_META_KEYS = ("agent",)


# ----------------------------------------------------------------------------- types
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` if it is of that type (ints are floats), else ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1 and type(None) in options:  # X | None: X's own message, plus "or null"
            raise ConfigError(f"{errors[0]} (or null)")
        raise ConfigError(f"config key {key!r} expects {_type_name(hint)}, got {type(value).__name__} ({value!r})")
    base = origin or hint
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
        if not ok:  # a string ("no", "false") or a number is not a bool: say what is
            raise ConfigError(f"config key {key!r} expects bool, got {type(value).__name__} ({value!r}); "
                              f"allowed values: true, false (on the command line: --{key.replace('_', '-')} "
                              f"or --no-{key.replace('_', '-')})")
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string: accept what float() reads
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                value = math.inf
            if not math.isfinite(value):
                raise ConfigError(f"config key {key!r} expects a finite number, got {value!r}")
    elif base is str:
        ok = isinstance(value, str)
    elif base is dict:
        ok = isinstance(value, dict)
        if ok:
            value = dict(value)
    elif base in (list, tuple):
        ok = isinstance(value, (list, tuple))
        if ok:
            (item,) = typing.get_args(hint)[:1] or (Any,)
            if item is not Any and item is not Ellipsis:
                value = [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
            value = list(value) if base is list else tuple(value)
    else:  # pragma: no cover - a field type this loader does not know
        raise TypeError(f"config field {key!r} has an unsupported type {hint!r}")
    if not ok:
        allowed = {int: "whole numbers" + (" (true/false is not a number)" if isinstance(value, bool) else ""),
                   float: "finite numbers" + (" (true/false is not a number)" if isinstance(value, bool) else ""),
                   str: "text", dict: "a mapping such as {name: value}",
                   list: "a list such as [1, 2]", tuple: "a list such as [1, 2]"}.get(base)
        extra = f"; allowed values: {allowed}" if allowed else ""
        raise ConfigError(f"config key {key!r} expects {_type_name(hint)}, got {type(value).__name__} ({value!r}){extra}")
    return value


def _unknown_key(key: str, cls: type, where: str) -> ConfigError:
    allowed = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; allowed keys: {', '.join(allowed)}")


def args_from_dict(cls: type[A], values: dict[str, Any], where: str = "the config",
                   base: A | None = None) -> A:
    """``cls`` built from ``base`` (or its defaults) with ``values`` applied, type-checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of setting: value, got {type(values).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in _META_KEYS:
            continue
        if key not in names:
            raise _unknown_key(str(key), cls, where)
        checked[key] = _check_value(key, value, hints[key])
    args = dataclasses.replace(base, **checked) if base is not None else cls(**checked)
    return args


def args_to_dict(args: RunArgs) -> dict[str, Any]:
    return dataclasses.asdict(args)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a dict (``yaml.safe_load``); a clear error if it is missing, unreadable or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"cannot read config file {str(p)!r}: {reason}; check that it is a readable "
                          f"text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of setting: value, got {type(data).__name__}")
    return data


def check_agent(data: dict[str, Any], agent: str, where: str) -> None:
    """A config file naming another agent is a mistake: say so."""
    named = data.get("agent")
    if named is None:
        return
    if named not in AGENTS:
        raise ConfigError(f"config key 'agent' in {where}: unknown agent {named!r}; allowed values: {sorted(AGENTS)}")
    if named != agent:
        raise ConfigError(f"config key 'agent' in {where} is {named!r}, but this is the {agent!r} agent; "
                          f"run agents/{named}.py or `nos-gym search --config {where}`")


# ------------------------------------------------------------------- the command line (tyro)
def _optional_of(hint: Any) -> Any:
    """``X`` for a hint ``X | None`` (else None)."""
    options = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 2 and type(None) in options:
        return next(o for o in options if o is not type(None))
    return None


def _yaml_flag(texts: list[str]) -> Any:
    try:
        return yaml.safe_load(texts[0])
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML/JSON: {' '.join(str(e).split())}") from None


_FLAGS = tyro.constructors.ConstructorRegistry()


@_FLAGS.primitive_rule
def _flag_rule(info: tyro.constructors.PrimitiveTypeInfo) -> tyro.constructors.PrimitiveConstructorSpec | None:
    """Flags that read as the config file does: ``none``/``null``/``~`` for an optional number, and
    YAML/JSON text for a mapping or a list (checked by ``check_types`` with a file's values, so both get
    the same messages). Every other type is tyro's."""
    number = _optional_of(info.type)
    if number in (int, float):
        def parse(texts: list[str]) -> Any:
            return None if texts[0].strip().lower() in ("none", "null", "~") else number(texts[0])
        metavar, show = f"{number.__name__.upper()}|none", str
    elif (typing.get_origin(info.type) or info.type) in (dict, list, tuple) or info.type is Any:
        parse, metavar = _yaml_flag, "YAML"
        def show(value: Any) -> str:
            return yaml.safe_dump(value, default_flow_style=True).strip()
    else:
        return None
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar=metavar, instance_from_str=parse, is_instance=lambda value: True,
        str_from_instance=lambda value: [show(value)])


@dataclass
class _CommandLine(Generic[A]):
    """An agent's command line: its settings (``--task``, ``--max-kl``, ...) and these."""

    settings: tyro.conf.OmitArgPrefixes[A]
    config: Annotated[str | None, tyro.conf.arg(metavar="FILE.yaml")] = None
    """load settings from a YAML file (flags win)"""
    resume: Annotated[str | None, tyro.conf.arg(metavar="RUN_DIR")] = None
    """continue the run in RUN_DIR where it stopped"""
    rebuild: Annotated[bool, tyro.conf.FlagCreatePairsOff] = False
    """with --resume, when the run's checkpoint is missing or damaged: continue the run from its log
    (every record kept; the agent's state restarts from its seed)"""


class _Unset(str):
    """The default of ``preset`` on the first pass: tyro hands this very object back unless a
    ``--preset`` flag was given (even an empty one)."""


def preset_args(cls: type[A], name: Any) -> A | None:
    """``cls`` built from its defaults with the preset ``name`` (``cls.PRESETS[name]``) applied, and
    ``preset`` set to ``name``; None for no preset (an empty name). ``ConfigError`` for an unknown name."""
    if not name:
        return None
    presets = getattr(cls, "PRESETS", {})
    if not isinstance(name, str) or name not in presets:
        allowed = sorted(presets) if presets else "none (this agent has no presets)"
        raise ConfigError(f"config key 'preset': unknown preset {name!r}; allowed values: {allowed}")
    return args_from_dict(cls, {**presets[name], "preset": name}, where=f"preset {name!r}")


_BOX = "│╭╮╰╯─┃━┏┓┗┛"


def tyro_error_line(message: str, prog: str) -> str:
    """tyro's boxed error message as one line: its title and first paragraph, then where the help is.
    A message of another shape is returned whole, so nothing is lost if tyro changes its layout."""
    lines = [line.strip().strip(_BOX).strip() for line in message.splitlines()]
    if not lines or not message.lstrip().startswith("╭"):
        return message.rstrip()
    paragraphs: list[list[str]] = [[]]
    for line in lines[1:]:
        if line and set(line) <= set(_BOX + " "):
            paragraphs.append([])
        elif line:
            paragraphs[-1].append(line)
    text = " ".join(paragraphs[0]) or lines[0].strip(_BOX + " ")
    guesses = [line.split()[0] for para in paragraphs[1:] if para and para[0].startswith("Perhaps you meant")
               for line in para[1:] if line.startswith("-")]
    if guesses:
        text += f"; did you mean {' or '.join(dict.fromkeys(guesses))}?"
    return f"{prog}: error: {text} (see {prog} --help)"


def parse_args(cls: type[A], argv: Sequence[str] | None = None, agent: str | None = None,
               description: str | None = None) -> tuple[A, str | None]:
    """Settings from defaults, ``--config FILE`` and flags; ``(args, resume_dir_or_None)``.

    tyro reads the command line twice: first over the dataclass defaults (a malformed flag or
    ``--help`` stops there, before any file is read; it names the preset and the files), then
    over the defaults, the preset and the file, so that flags win wherever they stand. With
    ``--resume RUN_DIR`` the run's own ``config.yaml`` is the base and only the settings in
    ``RESUME_OVERRIDABLE`` may be changed; the resume directory comes back as a ``ResumeDir``
    (a ``str`` whose ``rebuild`` says whether ``--rebuild`` was given). Raises ``ConfigError``
    for a bad setting (tyro itself exits with status 2 and a message for a malformed flag).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"agents/{agent}.py" if agent else Path(sys.argv[0]).name

    def read(settings: A) -> _CommandLine[A]:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                line = tyro.cli(_CommandLine[cls], args=argv, default=_CommandLine(settings), registry=_FLAGS,
                                prog=prog, description=description)
        except SystemExit as e:
            if e.code:  # a malformed flag: tyro's boxed message, told in one line
                print(tyro_error_line(captured.getvalue(), prog), file=sys.stderr)
            else:
                sys.stderr.write(captured.getvalue())
            raise
        sys.stderr.write(captured.getvalue())  # anything else tyro said (a warning) is passed on
        return line

    defaults = cls()
    if hasattr(defaults, "preset"):
        defaults.preset = _Unset("")
    first = read(defaults)
    resume = first.resume
    if first.rebuild and resume is None:
        raise ConfigError("--rebuild continues a run from its log: it goes with --resume RUN_DIR")
    if resume is not None:
        if first.config is not None:
            raise ConfigError("--resume takes the run's own config.yaml; do not pass --config as well")
        saved_path = Path(resume) / "config.yaml"
        if not saved_path.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; is it a run directory?")
        saved = load_yaml(saved_path)
        if agent is not None:
            check_agent(saved, agent, str(saved_path))
        base = args_from_dict(cls, saved, where=str(saved_path))
        args = read(base).settings
        changed = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in RESUME_OVERRIDABLE and getattr(args, f.name) != getattr(base, f.name))
        if changed:
            raise ConfigError(f"cannot change {changed} when resuming {resume} (a resumed run keeps its settings); "
                              f"settings that may change: {sorted(RESUME_OVERRIDABLE)}")
        args.run_dir = str(resume)
        resume = ResumeDir(resume, first.rebuild)
    else:
        data: dict[str, Any] = {}
        if first.config is not None:
            data = load_yaml(first.config)
            if agent is not None:
                check_agent(data, agent, str(first.config))
        preset = getattr(first.settings, "preset", None)
        base = preset_args(cls, data.get("preset", "") if isinstance(preset, _Unset | None) else preset)
        if first.config is not None:
            base = args_from_dict(cls, data, where=str(first.config), base=base)
        args = read(base or cls()).settings
    args.validate()
    return args, resume
