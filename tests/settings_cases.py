"""Representative agent command lines and what ``parse_args`` made of them (issue 23, item 4).

``tests/settings_before.json`` holds the outcomes of the hand-written argparse parser that
``nos_gym/agents/config.py`` had before it moved to a settings library; ``test_config_parse``
checks that the parser of today gives the same settings, the same ``ConfigError`` messages and
the same exit status for every case. Regenerating the file with ``python tests/settings_cases.py``
records today's parser, which loses the old parser's own messages on malformed flags: when a
change of behaviour is meant (a default changed, 2026-12-05: TRPO-LSTM's tuned defaults), move
only the values that change, and check that each moved from the old default to the new one.

A case is ``(agent, argv, files)``: ``files`` are written into a fresh directory first (its path
replaces ``{tmp}`` in argv and in the recorded outcome, as the repository's replaces ``{root}``); a file whose content is a dict is a run's
``config.yaml`` as ``Run`` writes it (``yaml.safe_dump`` of the agent's name and every setting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("settings_before.json")
AGENTS = ("trpo_lstm", "reinforce_lstm", "random_search", "evolution", "maskable_ppo")

SAVED_TRPO = {"agent": "trpo_lstm", "task_options": {"iterations": 200}, "num_envs": 8, "total_rules": 16,
              "seed": 3, "max_kl": 0.05, "progress": False, "store": "{tmp}/s.sqlite", "run_dir": "{tmp}/run"}
SAVED_RS = {"agent": "random_search", "total_rules": 48, "num_envs": 8, "eval_timeout": None}
HYBRID = "preset: hybrid\nmax_kl: 0.3\n"
TRPO_FILE = "agent: trpo_lstm\nmax_kl: 0.05\nnum_envs: 12\ntask_options: {iterations: 100}\n"

CASES: list[tuple[str, list[str], dict[str, Any]]] = [
    # ---- defaults, every agent
    *[(agent, [], {}) for agent in AGENTS],
    # ---- flags of the shared settings
    ("random_search", ["--depth", "3", "--num-envs", "7", "--total-rules", "70", "--seed", "5", "--no-reuse-result",
                       "--no-distinct-operands", "--no-no-final-addition", "--no-progress", "--torch-threads", "2",
                       "--top-k", "3"], {}),
    ("random_search", ["--num_envs=7", "--total_rules", "14", "--no_progress", "--top-k=4"], {}),
    ("random_search", ["--space", "small", "--task", "quadratic", "--task-options", '{"dim": 4}'], {}),
    ("random_search", ["--task-options", "{iterations: 200}", "--seed", "0"], {}),
    ("random_search", ["--seed", str(2**32 - 1)], {}),
    ("random_search", ["--eval-timeout", "none"], {}),
    ("random_search", ["--eval-timeout", "NULL"], {}),
    ("random_search", ["--eval-timeout", "~"], {}),
    ("random_search", ["--eval-timeout", "90"], {}),
    ("random_search", ["--eval-timeout", "1e3"], {}),
    ("random_search", ["--store", "", "--run-dir", "somewhere/r", "--runs-root", "elsewhere"], {}),
    ("random_search", ["--no-fingerprints", "--no-screen", "--backend", "serial"], {}),
    ("random_search", ["--backend", "process", "--progress", "--no-progress", "--progress"], {}),
    ("random_search", ["--promote", "{}"], {}),
    ("random_search", ["--promote", "{task_options: {iterations: 500}, top: 3}"], {}),
    ("random_search", ["--total", "20"], {}),  # an unambiguous prefix of a flag
    # ---- each agent's own flags
    ("trpo_lstm", ["--max-kl", "0.05", "--cg-iters", "5", "--normalize-advantages", "--baseline", "risk_seeking",
                   "--risk-epsilon", "0.1", "--line_search_shrink", "0.25", "--accept-ratio", "0"], {}),
    ("trpo_lstm", ["--hidden-size", "32", "--init-scale", "0.1", "--entropy-coef", "0", "--distinct-in-batch",
                   "--pqt-k", "5", "--pqt-weight", "2", "--no-pqt-policy-gradient"], {}),
    ("trpo_lstm", ["--evolution-fraction", "0.25", "--evolution-population", "20", "--evolution-tournament", "5",
                   "--evolution-mutations", "2", "--num-envs", "8"], {}),
    ("reinforce_lstm", ["--learning-rate", "1e-4", "--max-grad-norm", "1"], {}),
    ("evolution", ["--population-size", "8", "--tournament-size", "3", "--mutations", "2", "--novel-children",
                   "--novel-tries", "5"], {}),
    ("maskable_ppo", ["--net-arch", "[32, 32]", "--learning-rate", "1e-4", "--batch-size", "50", "--gamma", "0.99",
                      "--rollout-episodes", "2", "--n-epochs", "3", "--gae-lambda", "1", "--clip-range", "0.1",
                      "--ent-coef", "0"], {}),
    ("maskable_ppo", ["--net-arch", "[16]"], {}),
    # ---- presets
    *[(agent, ["--preset", name], {}) for agent in ("trpo_lstm", "reinforce_lstm") for name in ("paper", "pqt", "hybrid")],
    ("trpo_lstm", ["--preset", ""], {}),
    ("trpo_lstm", ["--preset", "pqt", "--pqt-k", "5"], {}),
    ("trpo_lstm", ["--pqt-k", "5", "--preset", "pqt"], {}),
    ("reinforce_lstm", ["--preset", "hybrid", "--learning-rate", "1e-4", "--num-envs", "10"], {}),
    ("trpo_lstm", ["--config", "{tmp}/c.yaml"], {"c.yaml": HYBRID}),
    ("trpo_lstm", ["--config", "{tmp}/c.yaml", "--preset", "pqt"], {"c.yaml": HYBRID}),
    ("trpo_lstm", ["--config", "{tmp}/c.yaml", "--evolution-fraction", "0.2"], {"c.yaml": HYBRID}),
    ("trpo_lstm", ["--preset", "", "--config", "{tmp}/c.yaml"], {"c.yaml": HYBRID}),
    ("trpo_lstm", ["--config", "{tmp}/a.yaml", "--config", "{tmp}/c.yaml"], {"a.yaml": "max_kl: 0.5\n", "c.yaml": HYBRID}),
    # ---- the repository's config files, and files with flags on top
    *[("trpo_lstm", ["--config", f"{{root}}/configs/{name}"], {})
      for name in ("rosenbrock.yaml", "paper.yaml", "cifar_cpu.yaml", "cifar_gpu.yaml")],
    ("reinforce_lstm", ["--config", "{root}/configs/paper_reinforce.yaml"], {}),
    ("trpo_lstm", ["--config", "{root}/configs/rosenbrock.yaml", "--total-rules", "20", "--no-progress"], {}),
    ("trpo_lstm", ["--num-envs", "5", "--max-kl", "0.1", "--num-envs", "7", "--max_kl=0.2"], {}),  # the last wins
    ("trpo_lstm", ["--config", "{tmp}/c.yaml", "--num-envs", "7"], {"c.yaml": TRPO_FILE}),
    ("trpo_lstm", ["--num-envs", "7", "--config", "{tmp}/c.yaml"], {"c.yaml": TRPO_FILE}),
    ("trpo_lstm", ["--config={tmp}/c.yaml", "--no-reuse-result", "--max_kl", "1e-3"], {"c.yaml": TRPO_FILE}),
    ("trpo_lstm", ["--config", "{tmp}/c.yaml"], {"c.yaml": "max_kl: 1e-3\nentropy_coef: 1\neval_timeout: null\n"
                                                             "task_options: {iterations: 50}\nseed: 0\n"}),
    ("trpo_lstm", ["--config", "{tmp}/c.yaml"], {"c.yaml": "# only a comment\n"}),
    ("random_search", ["--config", "{tmp}/c.yaml", "--eval-timeout", "30"],
     {"c.yaml": "agent: random_search\neval_timeout: null\nbackend: process\n"}),
    ("maskable_ppo", ["--config", "{tmp}/c.yaml"], {"c.yaml": "net_arch: [8, 8]\nlearning_rate: 1e-3\n"}),
    ("evolution", ["--config", "{tmp}/c.yaml", "--mutations", "3"],
     {"c.yaml": "agent: evolution\npopulation_size: 10\ntournament_size: 4\nnovel_children: true\n"}),
    # ---- resume
    ("trpo_lstm", ["--resume", "{tmp}/run"], {"run/config.yaml": SAVED_TRPO}),
    ("trpo_lstm", ["--resume", "{tmp}/run", "--total-rules", "100", "--progress", "--torch-threads", "2",
                   "--top-k", "5", "--eval-timeout", "60"], {"run/config.yaml": SAVED_TRPO}),
    ("trpo_lstm", ["--resume", "{tmp}/run", "--rebuild"], {"run/config.yaml": SAVED_TRPO}),
    ("trpo_lstm", ["--resume", "{tmp}/run", "--max-kl", "0.05", "--seed", "3"], {"run/config.yaml": SAVED_TRPO}),
    ("random_search", ["--resume={tmp}/run", "--eval-timeout", "none"], {"run/config.yaml": SAVED_RS}),
    ("trpo_lstm", ["--resume", "{tmp}/run", "--max-kl", "0.5", "--seed", "4"], {"run/config.yaml": SAVED_TRPO}),
    ("trpo_lstm", ["--resume", "{tmp}/run", "--config", "{tmp}/c.yaml"],
     {"run/config.yaml": SAVED_TRPO, "c.yaml": TRPO_FILE}),
    ("trpo_lstm", ["--resume", "{tmp}/nowhere"], {}),
    ("trpo_lstm", ["--rebuild"], {}),
    ("reinforce_lstm", ["--resume", "{tmp}/run"], {"run/config.yaml": SAVED_TRPO}),
    # ---- bad settings: one ConfigError
    ("trpo_lstm", ["--max-kl", "nan"], {}),
    ("trpo_lstm", ["--entropy-coef", "inf"], {}),
    ("random_search", ["--depth", "1000"], {}),
    ("random_search", ["--depth", "0"], {}),
    ("random_search", ["--seed", str(2**70)], {}),
    ("random_search", ["--seed", "-1"], {}),
    ("random_search", ["--task", "mnist"], {}),
    ("random_search", ["--space", "huge"], {}),
    ("random_search", ["--backend", "dask"], {}),
    ("random_search", ["--task-options", "{bogus: 1}"], {}),
    ("random_search", ["--task-options", "3"], {}),
    ("random_search", ["--task-options", "{iterations: 0}"], {}),
    ("random_search", ["--eval-timeout", "0"], {}),
    ("random_search", ["--eval-timeout", "nan"], {}),
    ("random_search", ["--ray-address", "auto"], {}),
    ("random_search", ["--promote", "{top: 5}"], {}),
    ("random_search", ["--promote", "[fast]"], {}),
    ("random_search", ["--promote", "{preset: fast, tops: 5}"], {}),
    ("evolution", ["--population-size", "8", "--tournament-size", "9"], {}),
    ("evolution", ["--mutations", "0"], {}),
    ("maskable_ppo", ["--net-arch", "[a]"], {}),
    ("maskable_ppo", ["--net-arch", "{a: 1}"], {}),
    ("maskable_ppo", ["--gamma", "2"], {}),
    ("trpo_lstm", ["--preset", "fast"], {}),
    ("trpo_lstm", ["--evolution-fraction", "0.99", "--num-envs", "20"], {}),
    ("trpo_lstm", ["--no-pqt-policy-gradient"], {}),
    ("trpo_lstm", ["--baseline", "mean"], {}),
    ("random_search", ["--config", "{tmp}/c.yaml"], {"c.yaml": "preset: paper\n"}),
    *[("trpo_lstm", ["--config", "{tmp}/bad.yaml"], {"bad.yaml": text}) for text in (
        "depth: true\n", 'distinct_operands: "no"\n', "reuse_result: 1\n", "num_envs: 8.0\n", "max_kl: .nan\n",
        "entropy_coef: -.inf\n", "eval_timeout: .inf\n", "task_options: {learning_rates: [0.1, -1]}\n",
        "max_kll: 0.1\n", "total_rules: many\n", "entropy_coef: true\n", "task: cifar\n", "space: huge\n",
        "agent: alphazero\n", "agent: evolution\n", "max_kl: -1\n", "task_options: 3\n", "- a list\n",
        "learning_rate: 0.1\n", "depth: [2\n", "seed: 1e400\n", "max_kl: 1e400\n", "{1: 2}\n")],
    ("trpo_lstm", ["--config", "{tmp}/missing.yaml"], {}),
    ("trpo_lstm", ["--config", "{tmp}/c.yaml", "--num-envs", "7"], {"c.yaml": "num_envs: 8.5\n"}),
    # ---- malformed flags: argparse's usage message, exit status 2
    ("trpo_lstm", ["--max-kl", "big"], {}),
    ("random_search", ["--depth", "2.5"], {}),
    ("random_search", ["--eval-timeout", "soon"], {}),
    ("random_search", ["--bogus", "1"], {}),
    ("random_search", ["--progress", "false"], {}),
    ("random_search", ["--task-options", "{a: [1"], {}),
    ("random_search", ["--preset", "paper"], {}),
    ("random_search", ["--seed"], {}),
    ("random_search", ["extra"], {}),
    ("trpo_lstm", ["--no-rebuild"], {}),
    ("trpo_lstm", ["--config", "{tmp}/missing.yaml", "--max-kl", "big"], {}),
    ("trpo_lstm", ["--resume", "{tmp}/nowhere", "--depth", "x"], {}),
    # ---- help (on stdout), before any file is read
    *[(agent, ["--help"], {}) for agent in AGENTS],
    ("trpo_lstm", ["--config", "{tmp}/missing.yaml", "--help"], {}),
]


def load(agent: str):
    from nos_gym.agents import load_agent

    return load_agent(agent)


def _typed(value: Any) -> Any:
    """``value`` with its Python type kept through JSON (1 and 1.0, tuples and lists differ)."""
    if isinstance(value, dict):
        return {"dict": {str(k): _typed(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_typed(v) for v in value]}
    if isinstance(value, float) and value != value:
        return {"float": "nan"}
    return {type(value).__name__: value}


def outcome(agent: str, argv: list[str], files: dict[str, Any]) -> dict[str, Any]:
    """What ``parse_args(Args, argv, agent=agent)`` gives for one case, paths relative to ``{tmp}``."""
    module = load(agent)
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                args = load(content["agent"]).Args(**{k: v.replace("{tmp}", tmp) if isinstance(v, str) else v
                                      for k, v in content.items() if k != "agent"})
                content = yaml.safe_dump({"agent": content["agent"], **dataclasses.asdict(args)}, sort_keys=False)
            path.write_text(content)
        argv = [a.replace("{tmp}", tmp).replace("{root}", str(ROOT)) for a in argv]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args, resume = module.parse_args(module.Args, argv, agent=agent, description=module.__doc__)
        except SystemExit as e:
            result = {"exit": e.code, "stderr": err.getvalue()}
        except Exception as e:  # noqa: BLE001 - recorded: the class and the message
            result = {"error": type(e).__name__, "message": str(e)}
        else:
            result = {"class": type(args).__name__,
                      "args": {f.name: _typed(getattr(args, f.name)) for f in dataclasses.fields(args)},
                      "resume": None if resume is None else [str(resume), type(resume).__name__,
                                                             getattr(resume, "rebuild", None)]}
        return json.loads(json.dumps(result).replace(tmp, "{tmp}").replace(str(ROOT), "{root}"))


def key(agent: str, argv: list[str], files: dict[str, Any]) -> str:
    return json.dumps([agent, argv, {k: v if isinstance(v, str) else sorted(v) for k, v in files.items()}])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    results = {key(*case): outcome(*case) for case in CASES}
    try:  # the help text of every setting, as the old parser read it from the attribute docstrings
        from nos_gym.agents.config import _field_docs

        helps = {agent: _field_docs(load(agent).Args) for agent in AGENTS}
    except ImportError:  # the parser of today: keep the recorded help
        helps = json.loads(FIXTURE.read_text())["help"]
    FIXTURE.write_text(json.dumps({"cases": results, "help": helps}, indent=1, sort_keys=True) + "\n")
    print(f"{FIXTURE}: {len(results)} cases, the help of {len(helps)} agents")
