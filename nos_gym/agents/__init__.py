"""The agents and what they share: settings, the LSTM controller, rollouts, runs (``runs.Run``,
the search wired to a run directory, ``rundir.RunDir``).

Each agent is one readable module of this package (CleanRL's manner: a dataclass of
arguments with the paper's defaults, the network, the loop), runnable as
``nos-gym search --agent NAME`` from an installed package and as
``python agents/NAME.py`` from a clone (thin scripts in the repository's ``agents/``):

- ``trpo_lstm``: the paper's controller (LSTM, TRPO, EMA baseline, entropy penalty);
- ``reinforce_lstm``: the same LSTM trained with REINFORCE (Zoph and Le 2017);
- ``random_search``: masked uniform sampling;
- ``evolution``: regularized (aging) evolution with mask-respecting mutations;
- ``maskable_ppo``: sb3-contrib's MaskablePPO on the env (the plug-in example).

Each defines ``Args`` (a ``RunArgs`` dataclass) and ``main(argv) -> Run``.
``load_agent(name_or_path)`` imports one (or your own script) as a module.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from nos_gym.agents.config import AGENTS, ConfigError, RunArgs, args_from_dict, load_yaml, parse_args
from nos_gym.agents.policy import LSTMController, masked_categorical_stats, masked_kl
from nos_gym.agents.rollout import Batch, play, rollout, uniform_actions
from nos_gym.agents.runs import Run, RunError, format_top, read_log, top_rules

#: errors of the machine, not of the program: a full disk, a read-only or forbidden place
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                       getattr(errno, "EDQUOT", errno.ENOSPC)}


def run_cli(main: Callable[[], object]) -> None:
    """Run an agent script's ``main()`` from the shell.

    A bad setting or an unusable run directory (``ConfigError``, ``RunError``) prints one
    line and exits 2; so does a file-system error (full disk, read-only) that reached
    here unexplained, naming the file. Ctrl-C exits 130, SIGTERM 143 (``Run`` raises ``SystemExit``).
    Output piped into a reader that stops early (``--help | head``) ends quietly.
    """
    name = Path(sys.argv[0]).name
    try:
        main()
    except BrokenPipeError:  # the reader went away: nothing more to say, and no traceback about it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell tool would
    except ConfigError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename is not None else ""
        print(f"{name}: error: cannot use{where}: {e.strerror}; free some disk space or make the place "
              f"writable, then run again (or --resume the run)", file=sys.stderr)
        raise SystemExit(2) from None


def agent_script(agent: str) -> Path | None:
    """The file of your own agent script (``agent`` ending in .py); None for a built-in name."""
    if agent.endswith(".py"):
        path = Path(agent)
        if not path.is_file():
            raise ConfigError(f"agent script {agent!r} does not exist")
        return path
    if agent not in AGENTS:
        raise ConfigError(f"config key 'agent': unknown agent {agent!r}; allowed values: {list(AGENTS)} "
                          f"(or a path to an agent script ending in .py)")
    return None


def load_agent(agent: str) -> ModuleType:
    """A built-in agent's module (``nos_gym.agents.NAME``), or your script imported as a module;
    either way it has ``Args`` and ``main``."""
    path = agent_script(agent)
    if path is None:
        return importlib.import_module(f"nos_gym.agents.{agent}")
    name = f"nos_gym_agent_{path.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and inspect need the module registered
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    for attr in ("Args", "main"):
        if not hasattr(module, attr):
            raise ConfigError(f"agent script {path} defines no {attr!r}; an agent defines Args (a RunArgs "
                              f"dataclass) and main(argv)")
    return module


__all__ = [
    "AGENTS", "Batch", "ConfigError", "LSTMController", "Run", "RunArgs", "RunError", "agent_script",
    "args_from_dict", "format_top", "load_agent", "load_yaml", "masked_categorical_stats", "masked_kl",
    "parse_args", "play", "read_log", "rollout", "run_cli", "top_rules", "uniform_actions",
]
