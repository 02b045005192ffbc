"""Promotion over several child seeds (``nos_gym.evaluation.promotion``): a rule's promoted reward is the
mean of its scores at each task seed, each of them the score that seed alone gives."""

import json
from pathlib import Path

import pytest

from nos_gym.cli import main
from nos_gym.dsl import parse
from nos_gym.evaluation.promotion import PromotionError, promote, promotion_label

pytestmark = pytest.mark.numerics  # accuracies depend on float rounding

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OPTIONS = {"preset": "ci", "data_dir": str(SHARED), "device": "cpu", "precision": "fp32"}
RULES = [parse("ADAM"), parse("g")]


def candidates():
    return [{"rule": str(p), "key": p.canonical_key, "tokens": list(p.tokens), "reward": r}
            for p, r in zip(RULES, (0.2, 0.3))]


def test_seeds_average_each_seeds_own_score(tmp_path):
    store = str(tmp_path / "store.sqlite")
    board = promote(candidates(), "convnet-cifar10", OPTIONS, title="t", source="s", seeds=[0, 1], store=store,
                    backend="serial", quiet=True)
    assert board.seeds == [0, 1] and len(board.fingerprint.split(", ")) == 2
    alone = {s: promote(candidates(), "convnet-cifar10", {**OPTIONS, "seed": s}, title="t", source="s",
                        store=store, backend="serial", quiet=True) for s in (0, 1)}
    for row in board.rows:
        per_seed = [next(d["reward"] for d in alone[s].rows if d["key"] == row["key"]) for s in (0, 1)]
        assert row["rewards"] == per_seed  # seed 1's score is seed 1's, not seed 0's again
        assert row["reward"] == pytest.approx(sum(per_seed) / 2, abs=1e-12)
        assert row["seed_sd"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5, abs=1e-12)
    assert all(d["cached"] for b in alone.values() for d in b.rows)  # the store held every seed's score
    assert [d["rank"] for d in board.rows] == [1, 2]
    assert board.rows[0]["reward"] >= board.rows[1]["reward"]
    assert "the mean over task seeds [0, 1]" in board.text()


def test_seeds_from_the_command_line_name_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"sample": i, "batch": 0, "reward": d["reward"], **{k: d[k] for k in ("rule", "key", "tokens")},
                         "cached": False}) for i, d in enumerate(candidates())]
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    opts = f"{{data_dir: {SHARED}, device: cpu, precision: fp32}}"
    assert main(["promote", str(run), "--task", "convnet-cifar10", "--preset", "ci", "--seeds", "0", "2",
                 "--task-options", opts, "--store", "", "--backend", "serial"]) == 0
    assert promotion_label("ci", [0, 2]) == "ci-seeds0-2"
    board = json.loads((run / "promoted-ci-seeds0-2.json").read_text())
    assert board["seeds"] == [0, 2] and all(len(d["rewards"]) == 2 for d in board["rules"])
    assert (run / "promoted-ci-seeds0-2.txt").read_text().strip() == capsys.readouterr().out.strip()


def test_bad_seeds_are_refused_before_training(tmp_path):
    with pytest.raises(PromotionError, match="distinct"):
        promote(candidates(), "convnet-cifar10", OPTIONS, title="t", source="s", seeds=[1, 1], backend="serial")
    with pytest.raises(PromotionError, match="rejects"):
        promote(candidates(), "convnet-cifar10", {**OPTIONS, "bogus": 1}, title="t", source="s", seeds=[0],
                backend="serial")
