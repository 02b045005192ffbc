"""The settings library gives what the hand-written parser gave (issue 23, item 4).

``tests/settings_before.json`` holds, for every command line of ``tests/settings_cases.py``, what
the old argparse parser of ``nos_gym/agents/config.py`` made of it: the parsed settings (values
and their types), the resume directory, the ``ConfigError`` message, or the exit status. The
parser of today must give the same for each, except for the changes listed in ``CHANGED``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import settings_cases
from settings_cases import AGENTS, CASES, FIXTURE, key, load, outcome

from nos_gym.agents.config import tyro_error_line

ROOT = Path(__file__).resolve().parents[1]

BEFORE = json.loads(FIXTURE.read_text())

#: command lines whose outcome changed on purpose, and how
CHANGED = {
    # tyro matches flags exactly: an abbreviation (argparse took a unique prefix) is an unknown
    # flag, exit status 2, and the message suggests the full name
    key("random_search", ["--total", "20"], {}): {"exit": 2},
}


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_same_outcome_as_the_hand_written_parser(case):
    expected = CHANGED.get(key(*case), BEFORE["cases"][key(*case)])
    got = outcome(*case)
    if "exit" in expected:
        # a malformed flag (or --help): tyro's message instead of argparse's usage and error line, the
        # same exit status, and the word argparse blamed (a flag, a stray value) is named again
        assert got.get("exit") == expected["exit"], got
        blamed = [line for line in expected.get("stderr", "").splitlines() if ": error: " in line]
        named = [a for a in case[1] if blamed and a in blamed[0].split(": error: ", 1)[1]]
        assert not blamed or any(a in got["stderr"] for a in named), (named, got["stderr"])
        return
    assert got == expected


@pytest.mark.parametrize("agent", AGENTS)
def test_help_keeps_every_settings_text(agent):
    module = load(agent)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        module.parse_args(module.Args, ["--help"], agent=agent, description=module.__doc__)
    assert e.value.code == 0

    def words(text):
        return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())

    text = words(out.getvalue())
    for name, doc in BEFORE["help"][agent].items():
        assert words(doc) in text, (name, doc)
    for flag in ("--config FILE.yaml", "--resume RUN_DIR", "--rebuild", "--no-reuse-result", "--task-options YAML",
                 "--eval-timeout FLOAT|none"):
        assert flag in text
    assert "(default: 3000)" in text  # defaults are shown


def test_cases_cover_every_agent_and_every_outcome():
    assert {c[0] for c in CASES} == set(AGENTS)
    kinds = {kind for v in BEFORE["cases"].values() for kind in ("args", "error", "exit") if kind in v}
    assert kinds == {"args", "error", "exit"}
    assert settings_cases.FIXTURE.exists() and len(BEFORE["cases"]) == len(CASES)


@pytest.mark.parametrize("argv, says", [
    (["--max-kl", "big"], "--max-kl: could not convert string to float: 'big'"),
    (["--total", "20"], "did you mean --total-rules?"),
    (["--bogus", "1"], "Unrecognized options: --bogus, 1"),
])
def test_a_malformed_flag_is_one_line_and_exit_status_2(argv, says):
    proc = subprocess.run([sys.executable, str(ROOT / "agents" / "trpo_lstm.py"), *argv], capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("agents/trpo_lstm.py: error: ") and says in lines[0], lines[0]
    assert lines[0].endswith("(see agents/trpo_lstm.py --help)")


def test_a_message_of_another_shape_is_kept_whole():
    assert tyro_error_line("usage: x\nx: error: something\n", "x") == "usage: x\nx: error: something"


def test_help_piped_into_a_reader_that_stops_early_ends_quietly():
    script = ROOT / "agents" / "trpo_lstm.py"
    proc = subprocess.run(["bash", "-c", f"'{sys.executable}' '{script}' --help | head -1; exit ${{PIPESTATUS[0]}}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("usage: ") and proc.stderr == "", proc.stderr
    assert proc.returncode in (0, 141)  # 141: the reader closed the pipe before the help was written
