"""nos_gym.agents.reference: the agents benchmark's numbers, and a finished run set beside them."""

from __future__ import annotations

import json

import pytest

from nos_gym.agents import reference
from nos_gym.agents.config import RunArgs
from nos_gym.agents.trpo_lstm import Args as TRPOArgs


def test_search_metrics_counts_distinct_rules_and_the_first_sample_at_the_optimum():
    m = reference.search_metrics([0.2, 0.5, 0.5, 1.0, 0.9], ["a", "b", "b", "c", "d"], optimum=1.0, k=3)
    assert m == {"best": 1.0, "regret": 0.0, "top_mean": pytest.approx((1.0 + 0.9 + 0.5) / 3), "to_optimum": 4,
                 "distinct": 4}
    m = reference.search_metrics([0.2, 0.7], ["a", "a"], optimum=1.0, k=10)
    assert m["to_optimum"] is None and m["regret"] == pytest.approx(0.3) and m["top_mean"] == 0.7
    with pytest.raises(ValueError):
        reference.search_metrics([], [], optimum=1.0)


def test_the_main_job_is_set_beside_the_shipped_benchmark():
    """python agents/trpo_lstm.py (its defaults) searches an env and budget the shipped file covers,
    so the main job ends with the comparison the README shows."""
    args = TRPOArgs()
    data = reference.load_reference()
    entry = next(e for e in data["envs"] if e["env_key"] == reference.env_key(args))
    at = entry["budgets"][str(args.total_rules)]
    assert {"regularized evolution, tuned", "TRPO-LSTM, tuned"} <= set(at)
    tuned = at["TRPO-LSTM, tuned"]
    assert tuned["runs"] == 20 and len(tuned["top_mean"]) == 3
    rewards = [0.5] * (args.total_rules - 1) + [1.0]
    text = reference.comparison(reference.env_key(args), rewards, list(range(args.total_rules)))
    assert text is not None and "this run" in text and f"reached after {args.total_rules:,} samples" in text
    assert "regularized evolution, tuned" in text and entry["source"] in text
    # another budget or env: nothing to compare with
    assert reference.comparison(reference.env_key(args), rewards[:-1], list(range(args.total_rules - 1))) is None
    assert reference.comparison(reference.env_key(RunArgs(space="small")), rewards, list(range(args.total_rules))) is None


def test_a_damaged_reference_file_names_itself(tmp_path):
    bad = tmp_path / "reference_results.json"
    bad.write_text('{"envs": [')
    with pytest.raises(ValueError, match="reference_results.json: not a readable reference file"):
        reference.load_reference(bad)
    bad.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="no 'envs' list"):
        reference.load_reference(bad)
    assert reference.load_reference(tmp_path / "absent.json") == {}
