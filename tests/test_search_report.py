"""What the search benchmarks read from a run's log: the cost accounting of search_cost.py
(every child-image of the fixed protocol is either spent or avoided by one mechanism) and the
report of the CIFAR-10 search (cifar_report.py: families, tables, Figure 4, the archive)."""

import gzip
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import cifar_report  # noqa: E402
import search_cost  # noqa: E402

from nos_gym.dsl import parse  # noqa: E402
from nos_gym.tasks.convnet import Protocol  # noqa: E402
from nos_gym.tasks.convnet.protocol import rung_plan  # noqa: E402

FIXED = Protocol.preset("cpu")
SEARCHED = Protocol.preset("cpu", schedule="halving", hurdle=0.277, final_hurdle=0.396, final_rung=1750)


def halving_sweep_images(p: Protocol) -> int:
    steps = (p.sweep_examples // p.batch_size) * p.sweep_epochs
    plan = rung_plan(len(p.lrs), steps, p.schedule, p.eta, p.rungs)
    return p.batch_size * sum(keep * (stop - start) for (keep, stop), start in zip(plan, [0] + [s for _, s in plan]))


def record(source, **metrics):
    return {"source": source, "cached": source != "trained", "metrics": metrics, "reward": 0.5}


def test_search_cost_accounts_for_every_fixed_child_image_including_the_final_hurdle():
    sweep = halving_sweep_images(SEARCHED)
    final = FIXED.final_images
    assert sweep < FIXED.child_images - final  # halving trains fewer sweep images than the fixed sweep
    records = [
        record("cache"),
        record("screen", screen="zero"),
        record("trained", child_images=sweep, sweep_images=sweep, fidelity="sweep", hurdled=True, lr=0.1),
        record("trained", child_images=sweep + 1750, sweep_images=sweep, fidelity="final-rung", hurdled=False,
               final_hurdled=True, lr=0.1),
        record("trained", child_images=sweep + final, sweep_images=sweep, fidelity="full", hurdled=False,
               final_hurdled=False, lr=0.1),
    ]
    acc = search_cost.account(records, FIXED, SEARCHED)
    rows = acc["rows"]
    assert rows["final hurdle"] == {"samples": 1, "images": final - 1750}
    assert rows["hurdle"] == {"samples": 1, "images": final}
    assert rows["trained"]["images"] == 3 * sweep + 1750 + final
    assert rows["early stops"]["samples"] == 0
    assert sum(r["images"] for r in rows.values()) == len(records) * FIXED.child_images
    assert "final hurdle" in "\n".join(search_cost.table(acc))


def test_families_are_read_from_canonical_keys():
    fam = {name: cifar_report.families(parse(rule).canonical_key) for name, rule in {
        "powersign": "g * exp(sign(g) * sign(m))", "powersign_gm": "ADAM * exp(sign(g * m))",
        "addsign": "(1 + sign(g) * sign(m)) * g", "optimizer_2": "drop(m, 0.3) * exp(1e-3 * w)",
        "adam": "ADAM", "not_addsign": "(1 - sign(g) * sign(m)) * g"}.items()}
    assert fam["powersign"] == fam["powersign_gm"] == ["e^{sign(g)*sign(m)} (PowerSign)"]
    assert fam["addsign"] == ["1 + sign(g)*sign(m) (AddSign)"]
    assert fam["optimizer_2"] == ["drop(m, p)", "e^{10^-3 w}"]
    assert fam["adam"] == fam["not_addsign"] == []


def _fake_run(root: Path, name: str, rules: list[tuple[str, float]]) -> Path:
    run = root / f"{name}-s1"
    run.mkdir(parents=True)
    lines = []
    for i, (rule, reward) in enumerate(rules):
        prog = parse(rule)
        lines.append(json.dumps({"sample": i, "batch": i // 2, "reward": reward, "rule": str(prog),
                                 "key": prog.canonical_key, "tokens": list(prog.tokens), "cached": False,
                                 "source": "trained" if i % 3 else "screen", "time": 10.0 * (i + 1),
                                 "metrics": {"child_images": 1000} if i % 3 else {"screen": "zero"}}))
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    (run / "config.yaml").write_text("task: convnet-cifar10\n")
    return run


def test_report_reads_runs_promotions_and_classics(tmp_path):
    root = tmp_path / "root"
    rules = [("g", 0.3), ("ADAM", 0.5), ("g * exp(sign(g) * sign(m))", 0.55), ("m", 0.2), ("g * log|1|", 0.1),
             ("drop(m, 0.3) * exp(1e-3 * w)", 0.45)]
    trpo = _fake_run(root, "trpo_lstm", rules)
    _fake_run(root, "random_search", rules[::-1][:4])  # a shorter run: the comparison is at its 4 rules
    board = {"kendall_tau": 0.5, "seeds": [0, 1, 2], "rules": [
        {"rank": 1, "reward": 0.61, "seed_sd": 0.01, "previous_reward": 0.55, "lr": 0.01, "rule": rules[2][0],
         "key": parse(rules[2][0]).canonical_key}]}
    (trpo / cifar_report.PROMOTED).write_text(json.dumps(board))
    for preset, seeds in (("cpu", [0]), ("fast", [0, 1, 2])):
        for s in seeds:
            (root / f"classics-{preset}-s{s}.json").write_text(json.dumps(
                [{"rule": "ADAM", "reward": 0.58 + 0.01 * s}, {"rule": "g", "reward": 0.5}]))
    out = tmp_path / "out"
    text = cifar_report.report(root, 1, out)
    assert "| trpo_lstm | 6 | 6 | 4 | 2 | 4,000 | 667 |" in text  # rules, distinct, trained, settled, images
    assert "| Adam | 0.5900 | 0.0100 | 0.5800, 0.5900, 0.6000 |" in text  # the mean over the three seeds
    assert "### At the same budget: the first 4 sampled rules of each agent" in text
    assert "| trpo_lstm | 0.5500 | 0.3875 | 0.388 | 1 | 2,000 |" in text  # g, ADAM, PowerSign, m
    assert "0.6100 **> Adam**" in text and "random_search: not promoted yet" in text
    assert ("| trpo_lstm | 1 distinct (1 in top 10) | 0 distinct (0 in top 10) | 1 distinct (1 in top 10) "
            "| 1 distinct (1 in top 10) |") in text
    assert (out / "report.md").read_text().strip() == text.strip()
    assert (out / "figure4.png").stat().st_size > 10_000
    with gzip.open(out / "runs" / "trpo_lstm-s1" / "log.jsonl.gz", "rt") as f:
        assert f.read() == (trpo / "log.jsonl").read_text()
    assert (out / "runs" / "trpo_lstm-s1" / cifar_report.PROMOTED).is_file()
    assert sorted(p.name for p in out.glob("classics-*.json")) == [
        "classics-cpu-s0.json", "classics-fast-s0.json", "classics-fast-s1.json", "classics-fast-s2.json"]
    # other runs by name (a second TRPO-LSTM setting, say): ROOT/NAME-sSEED, in the given order
    _fake_run(root, "trpo_lstm-kl003", rules[:5])
    text = cifar_report.main([str(root), "--out", str(tmp_path / "out2"), "--agents", "trpo_lstm-kl003", "trpo_lstm"])
    table = (tmp_path / "out2" / "report.md").read_text()
    assert text == 0 and table.index("| trpo_lstm-kl003 | 5 |") < table.index("| trpo_lstm | 6 |")
    assert "random_search" not in table and (tmp_path / "out2" / "runs" / "trpo_lstm-kl003-s1").is_dir()


def test_report_without_runs_says_what_it_expected(tmp_path):
    with pytest.raises(SystemExit, match="trpo_lstm-s1"):
        cifar_report.report(tmp_path, 1, tmp_path / "out")
