"""The evaluator's funnel: canonical key -> behaviour fingerprint -> screen -> task.

Equivalent rules are trained once, degenerate rules never, the store keeps behaviours for
later runs, and every Result (and the env's terminal info) says where its score came from.
"""

import sqlite3
from pathlib import Path

import gymnasium as gym
import pytest

from nos_gym.dsl import Masker, get_space, parse
from nos_gym.dsl.table1 import TABLE1, get_rule
from nos_gym.evaluation import Evaluator
from nos_gym.evaluation.probe import SCREENS, fingerprints, probe
from nos_gym.store import Store
from nos_gym.tasks import Task
from nos_gym.tasks.rosenbrock import RosenbrockTask

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class Counting(Task):
    """A cheap Rosenbrock that records every rule it trains (and fails those in ``broken``)."""

    name = "counting-rosenbrock"

    def __init__(self, broken: tuple[str, ...] = (), supports_probe: bool = True, floor: float | None = 0.0):
        self.inner = RosenbrockTask(iterations=100)
        self.trained: list[str] = []
        self.broken = {parse(s).canonical_key for s in broken}
        self.supports_probe = supports_probe
        self.floor = floor

    def config(self):
        return self.inner.config()

    def screen_score(self):
        return self.floor

    def evaluate(self, programs):
        if any(p.canonical_key in self.broken for p in programs):
            raise RuntimeError("broken rule")
        self.trained += [str(p) for p in programs]
        return self.inner.evaluate(programs)


def _rules(*texts):
    return [parse(t) for t in texts]


def test_the_canonical_key_merges_some_spellings_and_the_fingerprint_the_rest():
    same_key = [("--g", "g"), ("sign(sign(g))", "sign(g)"), ("m / sqrt|v|", "ADAM")]
    for a, b in same_key:
        assert parse(a).canonical_key == parse(b).canonical_key
    # what no rewrite names, but the probe sees: these compute the same numbers
    same_behaviour = [("g * 1", "g"), ("sign(g) * sign(g)", "1"), ("g * exp(log|1|)", "g"),
                      ("sign(v)", "1"), ("drop(g, 0.1) * exp(log|1|)", "drop(g, 0.1)"), ("g * (noise * 1)", "noise * g")]
    for a, b in same_behaviour:
        assert parse(a).canonical_key != parse(b).canonical_key
        fa, fb = fingerprints(_rules(a, b))
        assert fa == fb, (a, b)
    # different rules stay apart, even close ones: the clip levels, the drop rates, g / (1 + eps) vs g
    apart = _rules("g", "g / 1", "clip(g, 1e-5)", "clip(g, 1e-4)", "clip(g, 1e-3)", "drop(g, 0.1)", "drop(g, 0.3)",
                   "m", "sign(m)", "clip(ADAM, 1e-4)", "clip(sign(m), 1e-4)", "noise", "-noise")
    assert len(set(fingerprints(apart))) == len(apart)
    assert len(set(fingerprints([get_rule(name) for name in TABLE1]))) == len(TABLE1)


def test_a_fingerprint_depends_on_the_rule_alone():
    rules = Masker(get_space("full"), 2).sample_many(120, 3, distinct=True)
    assert any(p.stochastic for p in rules) and not all(p.stochastic for p in rules)
    batch = probe(rules)
    assert probe(rules[::-1])[::-1] == batch  # another batch order
    assert [probe([p])[0] for p in rules[:10]] == batch[:10]  # alone
    assert all(r.fingerprint.startswith("p1-") for r in batch)


def test_equivalent_rules_share_one_score_with_one_training():
    task = Counting()
    with Evaluator(task, backend="serial") as ev:
        res = ev.evaluate(_rules("g", "g * 1", "--g", "g * exp(log|1|)", "ADAM", "m / sqrt|v|", "g"))
        assert task.trained == ["g", "ADAM"]
        assert [r.source for r in res] == ["trained", "fingerprint", "cache", "fingerprint", "trained", "cache", "cache"]
        assert len({r.reward for r in res[:4]}) == 1 and res[0].reward > 0
        assert res[1].metrics["equivalent_to"] == "g" and res[1].metrics["equivalent_key"] == "g"
        assert res[1].cached and not res[0].cached and "equivalent_to" not in res[0].metrics
        # later batches: the equivalent is known by key now, a new spelling by behaviour
        later = ev.evaluate(_rules("g * 1", "g * sign(1)"))
        assert task.trained == ["g", "ADAM"] and [r.source for r in later] == ["cache", "fingerprint"]
        assert ev.stats["computed"] == 2 and ev.stats["fingerprint_hits"] == 3


def test_an_equivalent_submitted_while_its_twin_trains_waits_for_it():
    task = Counting()
    with Evaluator(task, backend="serial") as ev:
        first = ev.submit(_rules("g"))
        second = ev.submit(_rules("g * 1"))  # g is still queued: no second training
        done = {}
        while len(done) < 2:
            done.update({c.ticket: c.result for c in ev.poll(None)})
        assert task.trained == ["g"]
        assert done[first[0]].source == "trained" and done[second[0]].source == "fingerprint"
        assert done[second[0]].reward == done[first[0]].reward


def test_a_failed_rule_shares_its_failure_but_its_twin_is_trained_next_time():
    task = Counting(broken=("g",))
    with Evaluator(task, backend="serial") as ev:
        bad, twin = ev.evaluate(_rules("g", "g * 1"))
        assert bad.error and twin.error and twin.metrics["equivalent_to"] == "g"
        task.broken = set()
        (again,) = ev.evaluate(_rules("g * 1"))  # a failure is not remembered: trained now
        assert again.source == "trained" and again.error is None and task.trained == ["g * 1"]


def test_screened_rules_are_never_trained_and_say_why():
    task = Counting(floor=0.25)
    degenerate = {"-g": "never_descent", "1e-4 * w": "ignores_gradient", "noise": "ignores_gradient",
                  "g * log|1|": "zero", "log|sign(g) - sign(m)|": "non_finite", "sign(v)": "ignores_gradient",
                  "-sign(g)": "never_descent", "-(g^3)": "never_descent"}
    assert {r.screen for r in probe(_rules(*degenerate))} == set(SCREENS)
    with Evaluator(task, backend="serial") as ev:
        res = ev.evaluate(_rules(*degenerate, "g"))
        assert task.trained == ["g"]
        for (text, code), r in zip(degenerate.items(), res):
            assert r.source == "screen" and r.reward == 0.25 and r.metrics["screen"] == code, text
            assert r.error.startswith(f"screened: {code}") and not r.cached
        assert ev.stats["screened"] == len(degenerate)
        assert ev.evaluate(_rules("-g"))[0].source == "cache"
    # no Table 1 rule is screened
    assert [r.screen for r in probe([get_rule(name) for name in TABLE1])] == [None] * len(TABLE1)


def test_the_funnel_can_be_turned_off_and_a_task_can_opt_out():
    rules = _rules("g", "g * 1", "-g")
    for kwargs, task in [({"fingerprints": False, "screen": False}, Counting()),
                         ({}, Counting(supports_probe=False))]:
        with Evaluator(task, backend="serial", **kwargs) as ev:
            assert [r.source for r in ev.evaluate(rules)] == ["trained"] * 3
        assert task.trained == ["g", "g * 1", "-g"]
    task = Counting(floor=None)  # screens nothing, shares behaviours
    with Evaluator(task, backend="serial") as ev:
        assert [r.source for r in ev.evaluate(rules)] == ["trained", "fingerprint", "trained"]
    task = Counting()
    with Evaluator(task, backend="serial", fingerprints=False) as ev:
        assert [r.source for r in ev.evaluate(rules)] == ["trained", "trained", "screen"]


def test_the_store_keeps_behaviours_and_a_second_evaluator_reuses_them(tmp_path):
    path = tmp_path / "store.sqlite"
    task = Counting()
    with Evaluator(task, backend="serial", store=path) as ev:
        (g, adam) = ev.evaluate(_rules("g", "ADAM"))
    with Store(path, readonly=True) as s:
        recs = {r.key: r for r in s.records()}
        assert set(recs) == {"g", parse("ADAM").canonical_key}  # only trained rules are stored
        assert recs["g"].behaviour == fingerprints(_rules("g"))[0]
        assert s.get_by_behaviour(task.fingerprint, fingerprints(_rules("g * 1")))[recs["g"].behaviour].key == "g"
        assert s.get_by_behaviour("another-task", [recs["g"].behaviour]) == {}  # only within one task
    again = Counting()
    with Evaluator(again, backend="serial", store=path) as ev:
        res = ev.evaluate(_rules("g * 1", "g", "m / sqrt|v| * 1"))
        assert again.trained == []
        assert [r.source for r in res] == ["fingerprint", "store", "fingerprint"]
        assert res[0].reward == g.reward and res[0].metrics["equivalent_to"] == "g"
        assert res[2].reward == adam.reward and res[2].metrics["equivalent_key"] == parse("ADAM").canonical_key


def test_a_store_written_before_behaviours_still_opens(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)  # the schema before the behaviour column
    con.executescript("""
        CREATE TABLE evaluations (fingerprint TEXT NOT NULL, key TEXT NOT NULL, program TEXT NOT NULL,
            tokens TEXT NOT NULL, status TEXT NOT NULL, reward REAL NOT NULL, metrics TEXT NOT NULL, error TEXT,
            seconds REAL, attempts INTEGER NOT NULL, run TEXT, created REAL NOT NULL, updated REAL NOT NULL,
            PRIMARY KEY (fingerprint, key)) WITHOUT ROWID;
        CREATE TABLE tasks (fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL,
            created REAL NOT NULL);
        INSERT INTO evaluations VALUES ('t', 'g', 'g', '["g", "one", "id", "id", "keep"]', 'ok', 0.5, '{}', NULL,
            1.0, 1, 'r', 0, 0);
    """)
    con.commit()
    con.close()
    with Store(path, readonly=True) as s:  # a reader changes nothing and finds no behaviours
        assert s.get("t", "g").reward == 0.5 and s.get("t", "g").behaviour is None
        assert s.get_by_behaviour("t", ["p1-x"]) == {}
    with Store(path) as s:  # a writer adds the column; old rows have none
        assert s.get("t", "g").behaviour is None
        s.put("t", parse("ADAM"), s.get("t", "g").result(), behaviour="p1-x")
        assert s.get_by_behaviour("t", ["p1-x"])["p1-x"].program == "ADAM"
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(evaluations)")]
    assert columns[-1] == "behaviour"


def test_the_env_says_where_a_score_came_from():
    ev = Evaluator(Counting(), backend="serial")
    env = gym.make("OptimizerSearch-v0", depth=1, space="full", evaluator=ev)
    vocab = env.unwrapped.vocab
    sources = []
    for tokens in [("g", "one", "id", "id", "keep"), ("g", "one", "id", "id", "mul"),
                   ("g", "one", "neg", "id", "keep"), ("g", "one", "id", "id", "keep")]:
        env.reset()
        for tok in tokens:
            _, reward, _, _, info = env.step(vocab.index(tok))
        sources.append((info["source"], info["metrics"].get("equivalent_to"), info["metrics"].get("screen"),
                        info["cached"], (info["error"] or "")[:9]))
    assert sources == [("trained", None, None, False, ""), ("fingerprint", "g", None, True, ""),
                       ("screen", None, "never_descent", False, "screened:"), ("cache", None, None, True, "")]
    vec = gym.make_vec("OptimizerSearch-v0", num_envs=2, vectorization_mode="vector_entry_point", depth=1,
                       evaluator=Evaluator(Counting(), backend="serial"))
    vec.reset()
    for tok in ("g", "one", "id", "id", "mul"):
        _, _, _, _, info = vec.step([vec.unwrapped.vocab.index(tok)] * 2)
    assert list(info["source"]) == ["trained", "cache"]


@pytest.mark.skipif(not (SHARED / "cifar-10-batches-py").is_dir(), reason="needs CIFAR-10")
def test_the_convnet_screen_score_is_the_untrained_childs_accuracy():
    from nos_gym.tasks import make

    task = make("convnet-cifar10", preset="ci", data_dir=SHARED, device="cpu")
    floor = task.screen_score()
    assert 0.05 < floor < 0.2 and floor * 500 == round(floor * 500)  # a fraction of the 500 validation images
    assert task.screen_score() == floor
    # what the protocol gives a rule that never moves the weights (a zero update, trained)
    assert task.evaluate([parse("g * log|1|")])[0].reward == pytest.approx(floor, abs=2 / 500)
