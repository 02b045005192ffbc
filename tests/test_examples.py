"""The examples/ scripts run as a user runs them (small budgets where they take flags) and print results."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300, env={"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rewards(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?m)^\s*(\d\.\d{3})\s", text)]


def test_custom_task_scores_rules_on_a_user_task():
    out = run_example("custom_task.py")
    assert re.search(r"ADAM\s+reward 0\.\d{3}", out) and "best of 32 random rules" in out


def test_discovered_optimizers_train_and_report_losses():
    out = run_example("discovered_optimizers.py")
    for name in ("Adam (torch)", "PowerSign", "AddSign", "optimizer_1"):
        assert name in out
    losses = [float(x) for x in re.findall(r"(?m)^\s+(\d+\.\d+)\s", out)]
    assert len(losses) >= 5 and all(0 <= x < 1 for x in losses)


@pytest.mark.parametrize("name, args", [
    ("random_masked_agent.py", ["--episodes", "64", "--num-envs", "32", "--depth", "1", "--space", "small"]),
    ("maskable_ppo_rosenbrock.py", ["--timesteps", "512", "--num-envs", "16", "--iterations", "200"]),
])
def test_agent_examples_print_their_best_rules(name, args):
    found = rewards(run_example(name, *args))
    assert found and all(0 <= r <= 1 for r in found) and found == sorted(found, reverse=True)
