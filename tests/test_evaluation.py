"""The evaluation pool: serial, process and Ray backends agree; killed workers, time limits, async API."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from nos_gym.dsl import Program, parse
from nos_gym.engine.rules import BatchedRule
from nos_gym.evaluation import Evaluator
from nos_gym.store import Store
from nos_gym.tasks import Result, Task

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the "ci" preset at half size: backends are compared on real trainings of about a second
CI = dict(preset="ci", data_dir=str(SHARED), device="cpu", sweep_examples=500, train_examples=500,
          val_examples=250)
ADAM, SGD, POWERSIGN = parse("ADAM"), parse("g"), parse("g * exp(sign(g) * sign(m))")
PROGRAMS = [ADAM, SGD, POWERSIGN]


class BowlTask(Task):
    """A cheap real task: 40 steps of the rule on f(w) = |w|^2 / 2 from w = 1; reward 1 / (1 + f).

    Scripted failures for the pool's fault handling: rules in ``sleepy`` hang for a minute,
    rules in ``deadly`` kill their own process (as the OOM killer would).
    """

    name = "bowl"

    def __init__(self, sleepy: tuple[str, ...] = (), deadly: tuple[str, ...] = ()):
        self.sleepy = {parse(s).canonical_key for s in sleepy}
        self.deadly = {parse(s).canonical_key for s in deadly}

    def config(self):
        return {"sleepy": sorted(self.sleepy), "deadly": sorted(self.deadly)}

    def evaluate(self, programs):
        for p in programs:
            if p.canonical_key in self.deadly:
                os.kill(os.getpid(), signal.SIGKILL)
            if p.canonical_key in self.sleepy:
                time.sleep(60)
        rule = BatchedRule(list(programs))
        w = torch.ones(len(programs), 8)
        state = rule.init(w)
        for _ in range(40):
            d, state = rule.update(state, w.clone(), w)
            w = w - 0.1 * d
        f = 0.5 * (w ** 2).sum(1)
        return [Result(float(1.0 / (1.0 + x)) if torch.isfinite(x) else 0.0, {"f": float(x)}) for x in f]


class PickyTask(BowlTask):
    """BowlTask whose ``evaluate`` raises for a whole batch that holds one of the ``broken`` rules."""

    name = "picky"

    def __init__(self, broken: tuple[str, ...] = ()):
        super().__init__()
        self.broken = {parse(s).canonical_key for s in broken}
        self.calls: list[int] = []

    def config(self):
        return {"broken": sorted(self.broken)}

    def evaluate(self, programs):
        self.calls.append(len(programs))
        for p in programs:
            if p.canonical_key in self.broken:
                raise ValueError(f"cannot score {p}")
        return super().evaluate(programs)


@pytest.fixture(scope="module")
def serial():
    """Rewards of the ci task on PROGRAMS, computed here with one torch thread (as workers do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Evaluator("convnet-cifar10", backend="serial", **CI) as ev:
            results = ev.evaluate([ADAM, SGD, parse("m / sqrt|v|"), POWERSIGN])  # 3rd: ADAM spelled out
            again = ev.evaluate(PROGRAMS)
            return results, again, dict(ev.stats)
    finally:
        torch.set_num_threads(before)


def _rewards(results):
    return [r.reward for r in results]


# --------------------------------------------------------------------------------- serial
def test_serial_scores_each_rule_once(serial):
    results, again, stats = serial
    assert stats["computed"] == 3  # ADAM and its longhand are one rule
    assert [r.cached for r in results] == [False, False, True, False]
    assert results[2].reward == results[0].reward and results[0].reward > 0.15  # chance: 0.1
    assert all(r.cached for r in again) and _rewards(again) == _rewards([results[i] for i in (0, 1, 3)])


def test_auto_backend_is_process_for_training_tasks_and_serial_for_cheap_ones():
    with Evaluator(BowlTask()) as ev:
        assert ev.backend_name == "serial"
        assert ev.evaluate([SGD])[0].reward > 0.9
    with Evaluator("convnet-cifar10", **CI) as ev:  # workers start on the first job: nothing spawned here
        assert ev.backend_name == "process" and ev.job_size == 1 and ev.backend.pids == {}
    with pytest.raises(ValueError, match="unknown backend"):
        Evaluator(BowlTask(), backend="threads")


# -------------------------------------------------------------------------------- process
def test_process_backend_returns_serial_rewards_even_when_a_worker_is_killed(serial):
    expected = _rewards([serial[0][i] for i in (0, 1, 3)])
    with Evaluator("convnet-cifar10", backend="process", workers=2, **CI) as ev:
        tickets = ev.submit(PROGRAMS)
        done = {}
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            for c in ev.poll(timeout=0.05):
                done[c.ticket] = c
            busy = ev.backend.busy_pids()
            if busy:
                victim = busy[0]
                os.kill(victim, signal.SIGKILL)  # mid-evaluation: the worker has started its job
        assert victim is not None, "no worker started a job"
        while len(done) < len(tickets):
            for c in ev.poll(timeout=None):
                done[c.ticket] = c
        assert [done[t].result.reward for t in tickets] == expected
        assert [done[t].program for t in tickets] == PROGRAMS
        assert len(ev.backend.deaths) == 1 and ev.backend.deaths[0][1] == -signal.SIGKILL
        assert ev.stats["retried"] == 1 and ev.stats["failed"] == 0 and ev.stats["computed"] == 3
        assert victim not in ev.backend.pids.values()


def test_time_limits_and_crashes_are_bounded_and_recorded(tmp_path):
    task = BowlTask(sleepy=("m",), deadly=("sign(g)",))
    store = Store(tmp_path / "s.sqlite")
    ok, sleepy, deadly = SGD, parse("m"), parse("sign(g)")
    t0 = time.monotonic()
    with Evaluator(task, backend="process", workers=2, timeout=3.0, max_retries=1, store=store) as ev:
        r_ok, r_sleepy, r_deadly = ev.evaluate([ok, sleepy, deadly])
        assert r_ok.error is None and r_ok.reward > 0.9
        assert r_sleepy.reward == 0.0 and r_sleepy.metrics["status"] == "timeout" and "timeout" in r_sleepy.error
        assert r_deadly.reward == 0.0 and r_deadly.metrics["status"] == "crashed"
        assert "SIGKILL" in r_deadly.error and r_deadly.metrics["attempts"] == 2  # 1 try + 1 retry
        # the pool still works after losing workers, and a failure is not remembered as a score
        assert ev.evaluate([parse("ADAM")])[0].reward > 0.5
        assert ev.stats["failed"] == 2 and ev.stats["retried"] == 1
    assert time.monotonic() - t0 < 60  # the sleeper's 60 s were cut short
    rows = {r.program: r for r in store.records(task.fingerprint)}
    assert rows["m"].status == "timeout" and rows["sign(g)"].status == "crashed" and rows["g"].status == "ok"
    assert "SIGKILL" in rows["sign(g)"].error and rows["sign(g)"].attempts == 2
    # only ok rows count as cache hits
    assert set(store.get_many(task.fingerprint, [p.canonical_key for p in (ok, sleepy, deadly)])) == {ok.canonical_key}
    store.close()


# -------------------------------------------------------------------- one bad rule per job
BAD, WORSE = parse("m * v"), parse("sign(m) - g")
MIXED = [SGD, ADAM, BAD, POWERSIGN, parse("m"), WORSE, parse("RMSProp")]


@pytest.mark.parametrize("backend, job_size", [("serial", None), ("serial", 3), ("process", 4)])
def test_a_rule_that_raises_fails_alone_not_its_whole_job(tmp_path, backend, job_size):
    clean = _rewards(BowlTask().evaluate([p for p in MIXED if p not in (BAD, WORSE)]))
    task = PickyTask(broken=("m * v", "sign(m) - g"))
    store = Store(tmp_path / "s.sqlite")
    with Evaluator(task, backend=backend, job_size=job_size, workers=1, store=store) as ev:
        results = ev.evaluate(MIXED)
        stats = dict(ev.stats)
        again = ev.evaluate(MIXED)  # the scores are remembered, the failures are not
    good = [r for p, r in zip(MIXED, results) if p not in (BAD, WORSE)]
    assert _rewards(good) == pytest.approx(clean) and all(r.error is None for r in good)
    for p in (BAD, WORSE):
        r = results[MIXED.index(p)]
        assert type(r) is Result and r.reward == 0.0 and r.metrics["status"] == "error"
        assert f"ValueError: cannot score {p}" in r.error
    assert stats["computed"] == 5 and stats["failed"] == 2
    assert [r.cached for p, r in zip(MIXED, again) if p not in (BAD, WORSE)] == [True] * 5
    rows = {r.key: r for r in store.records(task.fingerprint)}
    assert {k: r.status for k, r in rows.items()} == {p.canonical_key: "error" if p in (BAD, WORSE) else "ok"
                                                     for p in MIXED}
    store.close()


def test_run_job_bisects_a_job_that_raises():
    from nos_gym.evaluation import RuleFailure, run_job

    programs = [SGD, ADAM, POWERSIGN, parse("m"), BAD, parse("v"), parse("RMSProp"), parse("g^2")]
    task = PickyTask(broken=("m * v",))
    results = run_job(task, programs)
    assert [isinstance(r, RuleFailure) for r in results] == [p == BAD for p in programs]
    assert task.calls == [8, 4, 4, 2, 1, 1, 2]  # halves of halves: not one call per rule
    expected = _rewards(BowlTask().evaluate([p for p in programs if p != BAD]))
    assert _rewards(results) == pytest.approx(expected[:4] + [0.0] + expected[4:])
    everything = PickyTask(broken=("g", "ADAM"))
    assert all(isinstance(r, RuleFailure) for r in run_job(everything, [SGD, ADAM]))
    with pytest.raises(ValueError, match="cannot score"):  # a one-rule job raises: the backend reports it
        run_job(everything, [SGD])


# ---------------------------------------------------------------------------------- async
def test_async_submit_and_poll_follow_the_queue_scheme():
    with Evaluator(BowlTask(), backend="serial", job_size=1) as ev:
        tickets = ev.submit([SGD, ADAM])
        dup = ev.submit([parse("g")])  # already queued: shares the computation
        assert ev.pending == 3
        got = {}
        while ev.pending:
            for c in ev.poll(timeout=1.0):
                assert isinstance(c.program, Program)
                got[c.ticket] = c.result
        assert set(got) == set(tickets + dup)
        assert got[dup[0]].reward == got[tickets[0]].reward and got[dup[0]].cached
        assert ev.stats["computed"] == 2
        # known rules complete at submission
        (t,) = ev.submit([ADAM])
        (c,) = ev.poll()
        assert c.ticket == t and c.result.cached and c.result.reward == got[tickets[1]].reward
        assert ev.poll() == []


def test_store_hits_skip_training_and_fingerprints_keep_tasks_apart(tmp_path):
    path = tmp_path / "shared.sqlite"
    with Evaluator(BowlTask(), backend="serial", store=path) as ev:
        first = ev.evaluate([SGD, ADAM])
    with Evaluator(BowlTask(), backend="serial", store=path) as ev:  # a second run on the same store
        again = ev.evaluate([ADAM, SGD, POWERSIGN])
        assert ev.stats == {"computed": 1, "memory_hits": 0, "store_hits": 2, "fingerprint_hits": 0, "screened": 0,
                            "failed": 0, "retried": 0}
    assert [r.cached for r in again] == [True, True, False]
    assert again[0].reward == first[1].reward and again[1].reward == first[0].reward
    with Evaluator(BowlTask(sleepy=("noise",)), backend="serial", store=path) as ev:  # another setup
        ev.evaluate([SGD])
        assert ev.stats["store_hits"] == 0
    with Store(path) as s:
        assert s.count() == 4 and len(s.tasks()) == 2


# ------------------------------------------------------------------------------------ ray
def _ray_job_pids() -> list[int]:
    """Ray workers currently running our job (Ray titles them ``ray::nos_gym_job``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::nos_gym_job"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_ray_backend_survives_a_killed_worker_and_matches_serial(serial):
    import ray  # nos-gym[ray]; the README's install command includes it
    expected = _rewards([serial[0][i] for i in (0, 1, 3)])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with Evaluator("convnet-cifar10", backend="ray", max_retries=2, **CI) as ev:
            assert ev.backend.slots == 2
            tickets = ev.submit(PROGRAMS)
            victim = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline:
                pids = _ray_job_pids()
                if pids:
                    victim = pids[0]
                    os.kill(victim, signal.SIGKILL)
                else:
                    time.sleep(0.05)
            assert victim is not None, "no Ray worker ran a job"
            done = {}
            while len(done) < len(tickets):
                for c in ev.poll(timeout=None):
                    done[c.ticket] = c.result
            assert [done[t].reward for t in tickets] == expected
            assert all(done[t].error is None for t in tickets)
            assert ev.stats["computed"] == 3 and ev.stats["failed"] == 0
        assert ray.is_initialized()  # the Evaluator leaves a Ray it did not start running
    finally:
        ray.shutdown()
