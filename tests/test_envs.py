"""The Gymnasium env OptimizerSearch-v0, its vector form and the SB3 adapter."""

import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import nos_gym
from nos_gym import bench
from nos_gym.dsl import Constraints, Masker, get_space, parse
from nos_gym.engine.rules import BatchedRule
from nos_gym.envs import InvalidActionError, OptimizerSearchEnv, OptimizerSearchVectorEnv, SB3VecEnv
from nos_gym.evaluation import Evaluator
from nos_gym.tasks import Result, Task

#: the Bench env reads the shipped NOS-Bench table; tests/test_bench.py checks it on a stand-in meanwhile
NEEDS_TABLE = pytest.mark.skipif(bench.DEFAULT not in bench.available(), reason="no NOS-Bench table shipped yet")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small networks and 2-parameter tasks: extra threads only spin on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ZeroTask(Task):
    """Scores nothing: for tests about the episode, not the reward."""

    name = "zero"

    def evaluate(self, programs):
        return [Result(0.0) for _ in programs]


class CountingEvaluator(Evaluator):
    def __init__(self, task, **options):
        super().__init__(task, **options)
        self.batches: list[int] = []

    def evaluate(self, programs):
        self.batches.append(len(programs))
        return super().evaluate(programs)


def _play(env, tokens, seed=None):
    """Step ``env`` through the token names; returns the last step's outputs."""
    obs, info = env.reset(seed=seed)
    vocab = env.unwrapped.vocab
    out = None
    for tok in tokens:
        out = env.step(vocab.index(tok))
    return out


# ----------------------------------------------------------------------- registration
def test_ids_are_registered_and_import_stays_light():
    for env_id in nos_gym.ENV_IDS:
        assert env_id in gym.registry
        assert gym.registry[env_id].nondeterministic is False
        assert gym.registry[env_id].vector_entry_point == "nos_gym.envs.vector:make_vector_env"
    code = ("import sys, gymnasium as gym\n"
            "env = gym.make('nos_gym:OptimizerSearch-v0', task='quadratic', depth=1)\n"
            "assert env.action_space.n == 33 and env.observation_space.shape == (6,)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    light = subprocess.run([sys.executable, "-c", "import sys, nos_gym; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert light.stdout.strip() == "False", light.stderr


# --------------------------------------------------------------------------- checkers
def _check_both(env):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert messages == []


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_both_env_checkers_pass_at_each_depth(depth):
    _check_both(gym.make("OptimizerSearch-v0", depth=depth))


def test_both_env_checkers_pass_with_onehot_observations():
    env = gym.make("OptimizerSearch-v0", depth=2, observation="onehot", task_options={"iterations": 100})
    assert env.observation_space.shape == (10 * 35 + 11,)
    _check_both(env)
    obs, _, _, _, _ = _play(env, parse("ADAM - g").tokens)
    tokens_env = gym.make("OptimizerSearch-v0", depth=2, task_options={"iterations": 100})
    tokens_obs = _play(tokens_env, parse("ADAM - g").tokens)[0]
    assert obs.sum() == 11 and np.flatnonzero(obs[:350]).tolist() == [i * 35 + v for i, v in enumerate(tokens_obs[:10])]


@pytest.mark.parametrize("env_id", [pytest.param(i, marks=NEEDS_TABLE) if i == "OptimizerSearch-Bench-v0" else i
                                    for i in nos_gym.ENV_IDS if i != "OptimizerSearch-v0"])
def test_both_env_checkers_pass_for_each_preset(env_id):
    env = gym.make(env_id)
    assert env.unwrapped.depth == nos_gym.ENV_IDS[env_id]["depth"]
    _check_both(env)


# ---------------------------------------------------------------------- the episode
def test_episode_observation_reward_and_terminal_info():
    env = gym.make("OptimizerSearch-v0", depth=2, space="full", task_options={"iterations": 200})
    tokens = parse("g * exp(sign(g) * sign(m))").tokens  # 10 tokens
    obs, info = env.reset(seed=0)
    assert obs.tolist() == [0] * 11 and info["action_mask"].dtype == np.int8
    vocab = env.unwrapped.vocab
    for i, tok in enumerate(tokens):
        assert info["action_mask"][vocab.index(tok)] == 1
        assert np.array_equal(env.unwrapped.action_masks(), info["action_mask"].astype(bool))
        obs, reward, terminated, truncated, info = env.step(vocab.index(tok))
        assert obs[10] == i + 1 and obs[i] == vocab.index(tok) + 1 and obs[i + 1:10].sum() == 0
        assert truncated is False and terminated == (i == 9)
        if i < 9:
            assert reward == 0.0
    assert info["tokens"] == tokens and info["rule"] == "g * exp(sign(g) * sign(m))"
    assert info["canonical_key"] == "mul(exp(mul(sign_g,sign_m)),g)"
    assert 0.0 < reward < 1.0 and reward == pytest.approx(env.unwrapped.evaluator.task.score(info["metrics"]["best_loss"]))
    assert info["cached"] is False and info["error"] is None and info["action_mask"].sum() == 0
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    other = parse("exp(sign(m) * sign(g)) * g").tokens  # same rule, another string
    assert other != tokens
    again = _play(env, other)
    assert again[1] == reward and again[4]["cached"] is True
    env.unwrapped.render_mode = "ansi"
    text = env.unwrapped.render()
    assert text.startswith(f"[{' '.join(other[:5])} | {' '.join(other[5:])}] 10/10")
    assert text.endswith(str(parse("exp(sign(m) * sign(g)) * g")))


def test_a_rule_that_yields_nan_scores_zero_and_the_next_episode_runs():
    env = gym.make("OptimizerSearch-v0", depth=1, space="full", task_options={"iterations": 300})
    obs, reward, terminated, _, info = _play(env, ("g2", "one", "exp", "id", "keep"))  # exp(g^2)
    assert info["rule"] == "exp(g^2)" and terminated
    assert reward == 0.0 and "diverged" in info["error"]
    obs, reward, terminated, _, info = _play(env, ("adam", "one", "id", "id", "keep"))
    assert terminated and reward > 0.1 and info["error"] is None and info["rule"] == "ADAM"


def test_invalid_actions_are_projected_deterministically_or_raise_in_strict_mode():
    env = OptimizerSearchEnv(task=ZeroTask(), depth=2, space="small")
    vocab = env.vocab
    _, info = env.reset()
    mask = info["action_mask"].astype(bool)
    valid = np.flatnonzero(mask)
    invalid = vocab.index("exp")  # a unary where an operand goes
    _, _, _, _, info = env.step(invalid)
    assert info["projected"] is True and env._ids == [int(valid[invalid % len(valid)])]
    _, _, _, _, info = env.step(vocab.index("m"))  # valid: kept
    assert info["projected"] is False and env._ids[-1] == vocab.index("m")
    with pytest.raises(ValueError, match="outside Discrete"):
        env.step(len(vocab))
    strict = OptimizerSearchEnv(task=ZeroTask(), depth=2, space="small", invalid_action="raise")
    strict.reset()
    strict.step(vocab.index("g"))
    with pytest.raises(InvalidActionError) as err:
        strict.step(vocab.index("g"))  # distinct_operands forbids g twice
    msg = str(err.value)
    assert "'g'" in msg and "position 1" in msg and "second operand" in msg and "valid choices" in msg
    assert "m" in msg.split("valid choices:")[1]


def test_options_are_checked_and_an_evaluator_can_be_shared():
    shared = Evaluator("rosenbrock", iterations=100)
    a = OptimizerSearchEnv(evaluator=shared, depth=1)
    b = OptimizerSearchEnv(evaluator=shared, depth=1)
    ra = _play(a, ("m", "one", "id", "id", "keep"))
    rb = _play(b, ("m", "g", "id", "id", "keep"))
    assert ra[4]["cached"] is False and rb[4]["cached"] is True and ra[1] == rb[1]
    with pytest.raises(ValueError, match="either evaluator"):
        OptimizerSearchEnv(task="rosenbrock", evaluator=shared)
    with pytest.raises(ValueError, match="invalid_action"):
        OptimizerSearchEnv(invalid_action="ignore")
    with pytest.raises(ValueError, match="depth"):
        OptimizerSearchEnv(depth=0)
    with pytest.raises(ValueError, match="registered tasks"):
        OptimizerSearchEnv(task="no-such-task")


# --------------------------------------------------- 10,000 random masked episodes
@pytest.mark.parametrize("enabled", ["distinct_operands", "no_final_addition", "reuse_result"])
def test_random_masked_episodes_obey_each_constraint_alone(enabled):
    depth, n_envs, rounds = 3, 1000, 10  # 10,000 episodes of 15 tokens
    flags = {name: name == enabled for name in ("distinct_operands", "no_final_addition", "reuse_result")}
    envs = OptimizerSearchVectorEnv(num_envs=n_envs, task=ZeroTask(), depth=depth, space="full", **flags)
    only = Masker(get_space("full"), depth, Constraints(**flags))
    off = {name: Masker(get_space("full"), depth, Constraints(**{n: n == name for n in flags}))
           for name in flags if name != enabled}
    rng = np.random.default_rng(0)
    broken_off = {name: 0 for name in off}
    for r in range(rounds):
        _, info = envs.reset(seed=r)
        for _ in range(5 * depth):
            mask = info["action_mask"].astype(bool)
            actions = (rng.random(mask.shape) * mask).argmax(axis=1)  # uniform among the valid
            _, _, terminated, _, info = envs.step(actions)
            assert not info["projected"].any()
        assert terminated.all()
        programs = envs.last_programs
        assert len(programs) == n_envs
        for p in programs:
            assert only.violations(p) == [], (p.tokens, only.violations(p))
            for name, masker in off.items():
                broken_off[name] += bool(masker.violations(p))
        rule = BatchedRule(programs)  # every program compiles, and one batched step runs
        w = torch.zeros(n_envs, 2)
        d, _ = rule.update(rule.init(w), torch.ones(n_envs, 2), w)
        assert d.shape == (n_envs, 2)
    # the other constraints really are off: random episodes break them
    assert all(count > 100 for count in broken_off.values()), broken_off


def test_memoised_masks_equal_the_maskers():
    env = OptimizerSearchEnv(task=ZeroTask(), depth=3, space="small")
    masker = Masker(get_space("small"), 3, Constraints())
    for _ in range(200):
        _, info = env.reset()
        for pos in range(15):
            assert np.array_equal(info["action_mask"].astype(bool), masker.mask(env._ids))
            if pos == 14:
                break
            _, _, _, _, info = env.step(env.action_space.sample(mask=info["action_mask"]))


# ----------------------------------------------------------------------- vector form
def test_make_vec_scores_the_lockstep_programs_as_one_batch():
    evaluator = CountingEvaluator("rosenbrock", iterations=200)
    envs = gym.make_vec("OptimizerSearch-v0", num_envs=8, vectorization_mode="vector_entry_point",
                        depth=1, space="small", evaluator=evaluator)
    assert isinstance(envs, OptimizerSearchVectorEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, info = envs.reset(seed=0)
    assert obs.shape == (8, 6) and info["action_mask"].shape == (8, 33)
    assert np.array_equal(envs.action_masks(), info["action_mask"].astype(bool))
    rng = np.random.default_rng(0)
    for step in range(5):
        mask = info["action_mask"].astype(bool)
        obs, rewards, terminated, truncated, info = envs.step((rng.random(mask.shape) * mask).argmax(1))
        assert terminated.all() == (step == 4) and not truncated.any()
    assert evaluator.batches == [8]  # one call, eight programs
    assert rewards.shape == (8,) and (rewards > 0).any() and len(set(info["rule"])) > 4
    assert info["_rule"].all() and info["cached"].dtype == bool
    # NEXT_STEP: the next step resets and ignores its actions
    obs, rewards, terminated, _, info = envs.step(np.zeros(8, dtype=np.int64))
    assert (obs == 0).all() and (rewards == 0).all() and not terminated.any()
    assert info["action_mask"].sum(1).min() > 0


def test_same_step_and_disabled_autoreset():
    envs = OptimizerSearchVectorEnv(num_envs=3, task=ZeroTask(), depth=1, space="sign",
                                    autoreset_mode="SameStep")
    obs, info = envs.reset()
    for _ in range(5):
        obs, _, terminated, _, info = envs.step(info["action_mask"].argmax(1))
    assert terminated.all() and (obs == 0).all()  # already the next episode's first observation
    assert info["_final_obs"].all() and all(o[5] == 5 for o in info["final_obs"])
    assert list(info["final_info"]["rule"]) == [str(p) for p in envs.last_programs]
    assert info["action_mask"].sum(1).min() > 0
    disabled = OptimizerSearchVectorEnv(num_envs=2, task=ZeroTask(), depth=1, autoreset_mode=AutoresetMode.DISABLED)
    _, info = disabled.reset()
    for _ in range(5):
        _, _, terminated, _, info = disabled.step(info["action_mask"].argmax(1))
    with pytest.raises(RuntimeError, match="DISABLED"):
        disabled.step(np.zeros(2, dtype=np.int64))


def test_sb3_adapter_resets_in_the_same_step_and_exposes_masks():
    evaluator = CountingEvaluator(ZeroTask())
    venv = SB3VecEnv(num_envs=4, depth=1, space="small", evaluator=evaluator)
    obs = venv.reset()
    assert obs.shape == (4, 6) and venv.has_attr("action_masks")
    for _step in range(5):
        masks = np.stack(venv.env_method("action_masks"))
        assert masks.shape == (4, 33) and masks.dtype == bool
        obs, rewards, dones, infos = venv.step(masks.argmax(1))
    assert dones.all() and evaluator.batches == [4]
    assert all(info["terminal_observation"][5] == 5 for info in infos) and (obs == 0).all()
    assert all("rule" in info for info in infos)


# ------------------------------------------------------------------ MaskablePPO learns
def test_maskable_ppo_beats_a_random_masked_policy_on_rosenbrock():
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import VecMonitor

    # depth 1 in the "small" space (8,064 rules); 1,000 iterations per learning rate keep it quick
    evaluator = Evaluator("rosenbrock", iterations=1000)
    random_env = OptimizerSearchVectorEnv(num_envs=100, depth=1, space="small", evaluator=evaluator)
    rng = np.random.default_rng(0)
    random_rewards = []
    for r in range(5):  # 500 random masked episodes
        _, info = random_env.reset(seed=r)
        for _ in range(5):
            mask = info["action_mask"].astype(bool)
            _, rewards, _, _, info = random_env.step((rng.random(mask.shape) * mask).argmax(1))
        random_rewards.extend(rewards)
    venv = VecMonitor(SB3VecEnv(num_envs=32, depth=1, space="small", evaluator=evaluator))
    model = MaskablePPO("MlpPolicy", venv, n_steps=20, batch_size=320, n_epochs=4, learning_rate=1e-3,
                        seed=0, stats_window_size=500, verbose=0)
    model.learn(8000)  # 1,600 episodes
    last = [ep["r"] for ep in model.ep_info_buffer]
    assert len(last) == 500
    print(f"MaskablePPO last 500 episodes: {np.mean(last):.3f}; random masked: {np.mean(random_rewards):.3f}")
    assert np.mean(last) > np.mean(random_rewards) + 0.05, (np.mean(last), np.mean(random_rewards))


# ---------------------------------------------- unmasked SB3 algorithms run unchanged
class CountProjected(gym.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        self.steps = self.projected = 0

    def step(self, action):
        out = self.env.step(action)
        self.steps += 1
        self.projected += bool(out[4]["projected"])
        return out


@pytest.mark.parametrize("algo", ["PPO", "A2C", "DQN", "RecurrentPPO", "TRPO"])
def test_unmasked_sb3_algorithms_train_through_the_projection(algo):
    import sb3_contrib
    import stable_baselines3

    cls = getattr(stable_baselines3, algo, None) or getattr(sb3_contrib, algo)
    extra = {"DQN": {"learning_starts": 16, "train_freq": 4}, "A2C": {},
             "PPO": {"n_steps": 32, "batch_size": 32}, "RecurrentPPO": {"n_steps": 32, "batch_size": 32},
             "TRPO": {"n_steps": 32, "batch_size": 32}}[algo]
    # RecurrentPPO needs the one-hot Box form: SB3 sizes its LSTM from a MultiDiscrete
    # space with a NumPy integer, which torch's nn.LSTM rejects
    observation = "onehot" if algo == "RecurrentPPO" else "tokens"
    env = CountProjected(gym.make("OptimizerSearch-v0", depth=1, space="small", task="quadratic",
                                  task_options={"iterations": 20}, observation=observation))
    model = cls("MlpLstmPolicy" if algo == "RecurrentPPO" else "MlpPolicy", env, seed=0, verbose=0, **extra)
    model.learn(96)
    assert model.num_timesteps >= 96 and env.steps >= 96
    assert env.projected > 0  # the unmasked policy proposed invalid tokens, and they were projected


@pytest.mark.parametrize("bad, match", [
    ({"depth": True}, "depth"),
    ({"depth": 0}, "depth"),
    ({"distinct_operands": "no"}, "distinct_operands"),
    ({"reuse_result": 1}, "reuse_result"),
])
def test_settings_of_the_wrong_type_are_refused(bad, match):
    for make in (lambda: gym.make("OptimizerSearch-v0", **bad),
                 lambda: gym.make_vec("OptimizerSearch-v0", num_envs=2, vectorization_mode="vector_entry_point", **bad)):
        with pytest.raises(ValueError, match=match):
            make()


# ------------------------------------------------------------------ close() ends worker processes
def _worker_pids(evaluator) -> list[int]:
    return list(evaluator._backend.pids.values())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


PROCESS = {"backend": "process", "workers": 1, "iterations": 100}


def test_close_ends_the_worker_processes_of_the_evaluator_the_env_built():
    env = gym.make("OptimizerSearch-v0", depth=1, space="small", task_options=PROCESS)
    _play(env, ("m", "one", "id", "id", "keep"))
    pids = _worker_pids(env.unwrapped.evaluator)
    assert pids and all(_alive(p) for p in pids)
    env.close()  # through gymnasium's wrappers
    assert not any(_alive(p) for p in pids)

    venv = SB3VecEnv(num_envs=2, depth=1, space="small", task_options=PROCESS)
    venv.reset()
    for _ in range(5):
        venv.step(venv.action_masks().argmax(1))
    pids = _worker_pids(venv.venv_gym.evaluator)
    assert pids and all(_alive(p) for p in pids)
    venv.close()  # SB3's close -> the vector env's
    assert not any(_alive(p) for p in pids)


def test_close_leaves_an_evaluator_passed_in_open():
    with Evaluator("rosenbrock", **PROCESS) as shared:
        env = OptimizerSearchEnv(evaluator=shared, depth=1)
        envs = OptimizerSearchVectorEnv(num_envs=2, evaluator=shared, depth=1)
        _play(env, ("m", "one", "id", "id", "keep"))
        pids = _worker_pids(shared)
        env.close()
        envs.close()
        assert pids and all(_alive(p) for p in pids)
        assert shared.evaluate([parse("g")])[0].reward > 0  # still scores
    assert not any(_alive(p) for p in pids)
