"""Third-party algorithms and vector envs on the registered ids: docs/env.md's table, line by line;
and the env's ``rgb_array`` picture (what SB3's ``make_vec_env`` and ``RecordVideo`` ask for).

Each line of that table runs here as written, with two changes that keep it cheap:
every Rosenbrock env it makes gets ``task_options={"iterations": ITERATIONS}`` (Rosenbrock scored in
about a millisecond; same spaces as the registered id) and ``.learn(10_000)`` becomes a
budget of one rollout or so.
"""

import random
import re
import time
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AsyncVectorEnv, SyncVectorEnv
from sb3_contrib import QRDQN, TRPO, MaskablePPO, RecurrentPPO
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import nos_gym
from nos_gym import bench
from nos_gym.dsl import parse
from nos_gym.envs import OptimizerSearchVectorEnv
from nos_gym.envs.render import draw_program, frame_size

TABLE_PAGE = Path(__file__).resolve().parents[1] / "docs" / "env.md"
ITERATIONS = 100
CHEAP = {"task_options": {"iterations": ITERATIONS}}

# name -> the exact line in docs/env.md's table
ALGORITHMS = {
    "PPO": 'PPO("MlpPolicy", gym.make("OptimizerSearch-v0")).learn(10_000)',
    "A2C": 'A2C("MlpPolicy", gym.make("OptimizerSearch-v0")).learn(10_000)',
    "DQN": 'DQN("MlpPolicy", gym.make("OptimizerSearch-v0")).learn(10_000)',
    "TRPO": 'TRPO("MlpPolicy", gym.make("OptimizerSearch-v0")).learn(10_000)',
    "QRDQN": 'QRDQN("MlpPolicy", gym.make("OptimizerSearch-v0")).learn(10_000)',
    "RecurrentPPO": 'RecurrentPPO("MlpLstmPolicy", gym.make("OptimizerSearch-v0", observation="onehot")).learn(10_000)',
    "MaskablePPO": 'MaskablePPO("MlpPolicy", gym.make("OptimizerSearch-v0")).learn(10_000)',
    "SubprocVecEnv": ('A2C("MlpPolicy", make_vec_env("nos_gym:OptimizerSearch-v0", n_envs=4, '
                      'vec_env_cls=SubprocVecEnv)).learn(10_000)'),
}
# the budget each runs with here (PPO, TRPO and MaskablePPO collect 2,048 steps per rollout anyway)
BUDGETS = {"PPO": 2048, "A2C": 500, "DQN": 300, "TRPO": 2048, "QRDQN": 300, "RecurrentPPO": 256,
           "MaskablePPO": 2048, "SubprocVecEnv": 400}
VECTOR_ENVS = {
    "make_vec": 'gym.make_vec("OptimizerSearch-v0", num_envs=4)',
    "make_vec sync": 'gym.make_vec("OptimizerSearch-v0", num_envs=4, vectorization_mode="sync")',
    "make_vec async": 'gym.make_vec("OptimizerSearch-v0", num_envs=4, vectorization_mode="async")',
    "SyncVectorEnv": 'SyncVectorEnv([lambda: gym.make("OptimizerSearch-v0")] * 4)',
    "AsyncVectorEnv": 'AsyncVectorEnv([lambda: gym.make("nos_gym:OptimizerSearch-v0")] * 4)',
}

#: the Bench env reads the shipped NOS-Bench table; tests/test_bench.py checks it on a stand-in meanwhile
NEEDS_TABLE = pytest.mark.skipif(bench.DEFAULT not in bench.available(), reason="no NOS-Bench table shipped yet")


class Recorder(gymnasium.Wrapper):
    """Counts what a line's env really did: steps, finished episodes, their rewards, projections."""

    made: list["Recorder"] = []

    def __init__(self, env):
        super().__init__(env)
        self.steps, self.projected, self.episodes = 0, 0, []
        Recorder.made.append(self)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.projected += bool(info["projected"])
        if terminated:
            self.episodes.append((reward, info["rule"]))
        return obs, reward, terminated, truncated, info


def cheap(env_id: str) -> dict:
    """``CHEAP`` for an env scored on Rosenbrock; nothing for NOS-Bench, whose reward costs nothing (and which
    takes no Rosenbrock option)."""
    return {} if nos_gym.ENV_IDS.get(env_id.split(":")[-1], {}).get("task") == "nosbench" else CHEAP


class CheapGym:
    """``gymnasium`` as the table's lines see it, with ``CHEAP`` task options in every Rosenbrock env."""

    def __getattr__(self, name):
        return getattr(gymnasium, name)

    def make(self, env_id, **kwargs):
        env = gymnasium.make(env_id, **{**cheap(env_id), **kwargs})
        # DQN's and QRDQN's random exploration draws from the action space: seeded, a line's run is the same every
        # time. (A random rule scores > 0 here with p = 0.31, so 300 DQN steps -- 10 random episodes, then
        # greedy ones -- can draw only zero rewards: seed 0 does; 1, 2 and 3 do not.)
        env.action_space.seed(1)
        return Recorder(env)

    def make_vec(self, env_id, **kwargs):
        return gymnasium.make_vec(env_id, **{**cheap(env_id), **kwargs})


def cheap_make_vec_env(env_id, **kwargs):
    return make_vec_env(env_id, env_kwargs={**cheap(env_id), **kwargs.pop("env_kwargs", {})}, **kwargs)


NAMESPACE = {"gym": CheapGym(), "nos_gym": nos_gym, "PPO": PPO, "A2C": A2C, "DQN": DQN, "TRPO": TRPO,
             "QRDQN": QRDQN, "RecurrentPPO": RecurrentPPO, "MaskablePPO": MaskablePPO,
             "make_vec_env": cheap_make_vec_env, "SubprocVecEnv": SubprocVecEnv,
             "SyncVectorEnv": SyncVectorEnv, "AsyncVectorEnv": AsyncVectorEnv}


def run_line(line: str, budget: int | None = None):
    if budget is not None:
        assert line.count("10_000") == 1
        line = line.replace("10_000", str(budget))
    Recorder.made.clear()
    # the lines draw their networks and exploration from the global generators: seed them, so that a
    # test does not depend on what the tests before it drew
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    return eval(line, dict(NAMESPACE))


def test_docs_table_holds_exactly_these_lines():
    text = TABLE_PAGE.read_text()
    for line in [*ALGORITHMS.values(), *VECTOR_ENVS.values()]:
        assert f"`{line}`" in text, line


# -------------------------------------------------------------------- SB3, sb3-contrib
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_algorithm_line_trains_on_the_registered_id(name):
    budget = BUDGETS[name]
    model = run_line(ALGORITHMS[name], budget)
    assert model.num_timesteps >= budget
    episodes = list(model.ep_info_buffer)  # SB3's Monitor: the last (up to) 100 finished episodes
    assert len(episodes) >= min(100, budget // 10 - 4)
    assert all(ep["l"] == 10 for ep in episodes)  # the id's default: depth 2, 5 x 2 tokens
    assert all(0.0 <= ep["r"] <= 1.0 for ep in episodes)
    if name == "SubprocVecEnv":  # its envs live in 4 worker processes
        assert isinstance(model.env, SubprocVecEnv) and model.env.num_envs == 4
        model.env.close()
        return
    (env,) = Recorder.made
    assert env.steps == model.num_timesteps and len(env.episodes) == env.steps // 10
    rewards = np.array([r for r, _ in env.episodes])
    assert ((0 <= rewards) & (rewards <= 1)).all() and rewards.max() > 0
    assert len({rule for _, rule in env.episodes}) > len(env.episodes) // 4  # it explores
    if name == "MaskablePPO":
        assert env.projected == 0  # the masks came through gym.make's wrappers
    else:
        assert env.projected > 0  # unmasked: invalid tokens were projected onto valid ones
    print(f"{name}: {env.steps} steps, {len(env.episodes)} rules, best {rewards.max():.3f}")


@pytest.mark.parametrize("env_id", [pytest.param(i, marks=NEEDS_TABLE) if i == "OptimizerSearch-Bench-v0" else i
                                    for i in nos_gym.ENV_IDS])
def test_every_algorithm_builds_and_acts_on_every_registered_id(env_id):
    for name, line in ALGORITHMS.items():
        if name == "SubprocVecEnv":
            continue
        model = run_line(line.replace('"OptimizerSearch-v0"', f'"{env_id}"').replace(".learn(10_000)", ""))
        (env,) = Recorder.made
        assert env.unwrapped.depth == nos_gym.ENV_IDS[env_id].get("depth", 2)
        obs, info = env.reset(seed=0)
        masks = {"action_masks": env.unwrapped.action_masks()} if name == "MaskablePPO" else {}
        action, _ = model.predict(obs, deterministic=True, **masks)
        assert env.action_space.contains(int(action))
        _, _, _, _, info = env.step(action)
        assert info["projected"] is False or name != "MaskablePPO"


def test_recurrent_ppo_on_the_multidiscrete_observation_is_an_sb3_limitation():
    """SB3 sizes RecurrentPPO's LSTM with sum(nvec), a NumPy integer, and torch's nn.LSTM wants a
    Python int: hence observation="onehot" in the table's line. If this fails, SB3 fixed it:
    drop the note and the argument."""
    with pytest.raises(TypeError, match="input_size"):
        RecurrentPPO("MlpLstmPolicy", gymnasium.make("OptimizerSearch-v0", **CHEAP))


def test_make_vec_env_asks_for_rgb_array_and_gets_it():
    """SB3's make_vec_env passes render_mode="rgb_array" (and retries without it only on a TypeError)."""
    venv = cheap_make_vec_env("OptimizerSearch-v0", n_envs=2, vec_env_cls=DummyVecEnv)
    assert venv.render_mode == "rgb_array"
    venv.reset()
    for _ in range(3):
        venv.step(np.array([0, 1]))
    tiled = venv.render()
    h, w = frame_size(2)[::-1]
    assert tiled.shape == (2 * h, w, 3) and tiled.dtype == np.uint8  # SB3 tiles the 2 frames


# ---------------------------------------------------------------- Gymnasium vector envs
@pytest.mark.parametrize("name", list(VECTOR_ENVS))
def test_each_vector_env_line_runs_masked_episodes(name):
    envs = run_line(VECTOR_ENVS[name])
    try:
        if name == "make_vec":  # the registered vector entry point: 4 programs scored as one batch
            assert isinstance(envs, OptimizerSearchVectorEnv)
        assert envs.num_envs == 4
        rng = np.random.default_rng(0)
        obs, info = envs.reset(seed=0)
        assert obs.shape == (4, 11) and info["action_mask"].shape == (4, 34)
        for _episode in range(2):
            for step in range(10):
                mask = info["action_mask"].astype(bool)
                obs, rewards, terminated, truncated, info = envs.step((rng.random(mask.shape) * mask).argmax(1))
                assert not info["projected"].any() and not truncated.any()
                assert terminated.all() == (step == 9) and (terminated.any() == (step == 9))
            assert ((0 <= rewards) & (rewards <= 1)).all()
            assert all(len(tokens) == 10 for tokens in info["tokens"]) and info["_rule"].all()
            assert all(parse(rule).canonical_key == key for rule, key in zip(info["rule"], info["canonical_key"]))
            obs, _, terminated, _, info = envs.step(np.zeros(4, dtype=np.int64))  # next-step autoreset
            assert (obs == 0).all() and not terminated.any()
    finally:
        envs.close()


# ------------------------------------------------------------------------ rgb_array
def _is_picture(frame, depth):
    w, h = frame_size(depth)
    assert frame.shape == (h, w, 3) and frame.dtype == np.uint8
    assert (frame < 250).any(axis=2).mean() > 0.02  # ink on the page
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 20  # colours, text, lines: not blank


def test_rgb_array_frame_at_each_step_changes_as_tokens_are_added():
    env = gymnasium.make("OptimizerSearch-v0", render_mode="rgb_array", **CHEAP)
    rule = parse("g * exp(sign(g) * sign(m))")
    env.reset(seed=0)
    frames, seconds = [env.render()], []
    for tok in rule.tokens:
        _, reward, terminated, _, _ = env.step(env.unwrapped.vocab.index(tok))
        t = time.perf_counter()
        frames.append(env.render())
        seconds.append(time.perf_counter() - t)
    assert terminated and len(frames) == 11
    for frame in frames:
        _is_picture(frame, 2)
    for before, after in zip(frames, frames[1:]):
        assert (before != after).any(axis=2).mean() > 0.001  # each token changes the picture
    assert np.array_equal(frames[-1], draw_program(rule, note=f"reward {reward:.4f}"))
    # RecordVideo renders after every step: the time is printed, not asserted (shared machines are noisy)
    print(f"frame: {1000 * np.mean(seconds):.1f} ms on average")
    # Gymnasium's frame collection (what RecordVideo builds on) through gym.make
    collected = gymnasium.make("OptimizerSearch-v0", render_mode="rgb_array_list", depth=1, **CHEAP)
    collected.reset(seed=0)
    for tok in ("adam", "g", "id", "id", "keep"):
        collected.step(collected.unwrapped.vocab.index(tok))
    frames = collected.render()
    assert len(frames) == 6 and all(f.shape == (400, 480, 3) for f in frames)


def test_rgb_array_env_passes_the_checker_and_vector_envs_render_one_frame_per_sub_env():
    gym_check_env(gymnasium.make("OptimizerSearch-v0", render_mode="rgb_array", depth=1, **CHEAP).unwrapped,
                  skip_render_check=False)
    envs = gymnasium.make_vec("OptimizerSearch-v0", num_envs=3, render_mode="rgb_array", depth=1, **CHEAP)
    _, info = envs.reset(seed=0)
    envs.step(info["action_mask"].argmax(1))
    frames = envs.render()
    assert len(frames) == 3
    for frame in frames:
        _is_picture(frame, 1)


def test_record_video_writes_an_episode(tmp_path):
    # RecordVideo encodes with moviepy: a dev dependency, so this runs in CI
    env = gymnasium.wrappers.RecordVideo(
        gymnasium.make("OptimizerSearch-v0", render_mode="rgb_array", depth=1, **CHEAP), str(tmp_path / "videos"))
    env.reset(seed=0)
    for tok in ("adam", "g", "id", "id", "keep"):
        env.step(env.unwrapped.vocab.index(tok))
    env.close()
    videos = list((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1_000


def test_cli_eval_draws_each_rule(tmp_path, capsys):
    from nos_gym.cli import main

    out = tmp_path / "rule.png"
    assert main(["eval", "powersign", "ADAM", "--task-options", f"{{iterations: {ITERATIONS}}}",
                 "--draw", str(out), "--json"]) == 0
    assert re.search(r"^\[", capsys.readouterr().out)  # stdout stays JSON
    from PIL import Image

    for path, depth in ((out, 2), (tmp_path / "rule-2.png", 1)):
        _is_picture(np.asarray(Image.open(path).convert("RGB")), depth)
