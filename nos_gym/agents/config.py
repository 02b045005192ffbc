"""Agent settings: one dataclass per agent, filled from defaults, a YAML file and flags.

Every agent script declares ``@dataclass class Args(RunArgs)`` with its own settings on
top of the ones every run shares (``RunArgs``). ``parse_args(Args, argv)`` builds the
command line from the dataclass, so every setting is a flag (``--max-kl 0.02``), and
``--config configs/NAME.yaml`` loads a file first (flags given as well win).

Precedence: dataclass defaults < ``--config`` file < flags. With ``--resume RUN_DIR`` the
run's saved ``config.yaml`` replaces the defaults and the file; only ``RESUME_OVERRIDABLE``
settings (the budget, the progress bar, threads) may be changed by flags.

A bad setting stops at once with a ``ConfigError`` that names the key and what is allowed:
an unknown key (with the closest known one), a wrong type, an unknown task, search space
or agent.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

__all__ = [
    "ConfigError", "RESUME_OVERRIDABLE", "RunArgs", "args_to_dict", "check_agent", "load_yaml",
    "parse_args", "args_from_dict",
]


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range."""


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
    top_k: int = 10
    # --- this process -------------------------------------------------------------------
    torch_threads: int = 1
    progress: bool = True
    """show a tqdm progress bar"""

    def validate(self) -> None:
        """Check values (not just types); subclasses extend it. Raises ``ConfigError``."""
        from nos_gym.dsl import SPACES
        from nos_gym.tasks import available

        if self.task not in available():
            raise ConfigError(f"config key 'task': unknown task {self.task!r}; allowed values: {available()}")
        if self.space not in SPACES:
            raise ConfigError(f"config key 'space': unknown search space {self.space!r}; "
                              f"allowed values: {sorted(SPACES)}")
        for key in ("depth", "total_rules", "num_envs", "top_k", "torch_threads"):
            _positive(self, key)
        if self.backend not in ("auto", "serial", "process", "ray"):
            raise ConfigError(f"config key 'backend': unknown backend {self.backend!r}; "
                              f"allowed values: ['auto', 'serial', 'process', 'ray']")


def _positive(args: Any, key: str, allow_zero: bool = False) -> None:
    value = getattr(args, key)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config key {key!r} must be {bound}, got {value!r}")


def check_range(args: Any, key: str, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ``ConfigError`` unless ``low <= args.key <= high`` (``low < ...`` with ``low_open``)."""
    value = getattr(args, key)
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        raise ConfigError(f"config key {key!r} must be in {'(' if low_open else '['}{lo}, {hi}], got {value!r}")


#: settings a resumed run may change (anything else would make it a different run)
RESUME_OVERRIDABLE = frozenset({"total_rules", "progress", "torch_threads", "top_k"})

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
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r} expects {_type_name(hint)}, got {type(value).__name__} ({value!r})")
    base = origin or hint
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
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
            value = float(value)
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
        raise ConfigError(f"config key {key!r} expects {_type_name(hint)}, got {type(value).__name__} ({value!r})")
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
    """A config file as a dict (``yaml.safe_load``); a clear error if it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of setting: value, got {type(data).__name__}")
    return data


def check_agent(data: dict[str, Any], agent: str, where: str) -> None:
    """A config file naming another agent is a mistake: say so."""
    from nos_gym.agents import AGENTS

    named = data.get("agent")
    if named is None:
        return
    if named not in AGENTS:
        raise ConfigError(f"config key 'agent' in {where}: unknown agent {named!r}; allowed values: {sorted(AGENTS)}")
    if named != agent:
        raise ConfigError(f"config key 'agent' in {where} is {named!r}, but this is the {agent!r} agent; "
                          f"run agents/{named}.py or `nos-gym search --config {where}`")


# ----------------------------------------------------------------------------- flags
def _parse_flag_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML/JSON: {e}") from e


def build_parser(cls: type[RunArgs], prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per field of ``cls`` (defaults left out on purpose)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="load settings from a YAML file (flags win)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    hints = _hints(cls)
    docs = _field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        flags = [f"--{f.name.replace('_', '-')}"]  # --foo_bar is accepted too (see parse_args)
        help_text = f"{docs.get(f.name, '')} (default: {getattr(defaults, f.name)!r})".strip()
        if hint is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif hint in (int, float, str):
            parser.add_argument(*flags, dest=f.name, type=_flag_type(f.name, hint), metavar=hint.__name__.upper(),
                                help=help_text)
        else:  # dicts, lists, optionals: YAML/JSON text, type-checked afterwards
            parser.add_argument(*flags, dest=f.name, type=_parse_flag_value, metavar="YAML", help=help_text)
    return parser


def _dashed(arg: str) -> str:
    """``--max_kl=0.1`` -> ``--max-kl=0.1``: flags may be spelled with underscores, as in the YAML."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def _flag_type(name: str, hint: type) -> Any:
    def convert(text: str) -> Any:
        try:
            return hint(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} expects {hint.__name__}, got {text!r}") from None
    convert.__name__ = hint.__name__
    return convert


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right after a field) of ``cls`` and its bases."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_args(cls: type[A], argv: Sequence[str] | None = None, agent: str | None = None,
               description: str | None = None) -> tuple[A, str | None]:
    """Settings from defaults, ``--config FILE`` and flags; ``(args, resume_dir_or_None)``.

    With ``--resume RUN_DIR`` the run's own ``config.yaml`` is the base and only the
    settings in ``RESUME_OVERRIDABLE`` may be changed. Raises ``ConfigError`` for a bad
    setting (argparse itself exits with a usage message for a malformed flag).
    """
    parser = build_parser(cls, prog=f"agents/{agent}.py" if agent else None, description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = vars(parser.parse_args([_dashed(a) for a in argv]))
    config_path = ns.pop("config", None)
    resume = ns.pop("resume", None)
    if resume is not None:
        if config_path is not None:
            raise ConfigError("--resume takes the run's own config.yaml; do not pass --config as well")
        saved_path = Path(resume) / "config.yaml"
        if not saved_path.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; is it a run directory?")
        saved = load_yaml(saved_path)
        if agent is not None:
            check_agent(saved, agent, str(saved_path))
        args = args_from_dict(cls, saved, where=str(saved_path))
        changed = sorted(k for k, v in ns.items() if k not in RESUME_OVERRIDABLE and getattr(args, k) != v)
        if changed:
            raise ConfigError(f"cannot change {changed} when resuming {resume} (a resumed run keeps its settings); "
                              f"settings that may change: {sorted(RESUME_OVERRIDABLE)}")
        args = args_from_dict(cls, ns, where="the command line", base=args)
        args.run_dir = str(resume)
    else:
        base = None
        if config_path is not None:
            data = load_yaml(config_path)
            if agent is not None:
                check_agent(data, agent, str(config_path))
            base = args_from_dict(cls, data, where=str(config_path))
        args = args_from_dict(cls, ns, where="the command line", base=base)
    args.validate()
    return args, resume
