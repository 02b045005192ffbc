"""``OptimizerSearchEnv``: write an update rule token by token; the finished rule is scored.

The environment of Neural Optimizer Search (Bello et al. 2017, sections 3.1 and 4.1).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from nos_gym.dsl import Constraints, Masker, Program, SearchSpace, Vocabulary, get_space
from nos_gym.dsl.vocabulary import GROUP_SIZE, SLOT_KINDS
from nos_gym.tasks.base import Result, Task

INVALID_ACTION_MODES = ("project", "raise")
OBSERVATION_MODES = ("tokens", "onehot")
_SLOT_NAMES = ("first operand", "second operand", "first unary", "second unary", "binary")


class InvalidActionError(ValueError):
    """An action that the masks forbid, in ``invalid_action="raise"`` mode."""


class EvaluatorLike(Protocol):
    """What the env needs from an evaluator: ``nos_gym.evaluation.Evaluator`` is one."""

    def evaluate(self, programs: Sequence[Program]) -> list[Result]: ...


def make_evaluator(task: str | Task | None, evaluator: EvaluatorLike | None,
                   task_options: dict[str, Any] | None) -> EvaluatorLike:
    """The evaluator an env scores through: ``evaluator`` itself, or one over ``task``."""
    if evaluator is not None:
        if task is not None or task_options:
            raise ValueError("pass either evaluator=... or task=... (with task_options), not both: "
                             "the evaluator already holds its task")
        if not callable(getattr(evaluator, "evaluate", None)):
            raise TypeError(f"evaluator must have an evaluate(programs) method, got {type(evaluator).__name__}")
        return evaluator
    from nos_gym.evaluation import Evaluator

    return Evaluator("rosenbrock" if task is None else task, **(task_options or {}))


def close_evaluator(evaluator: EvaluatorLike) -> None:
    """Close ``evaluator`` if it can be closed (an ``Evaluator``: its worker processes, a store it opened)."""
    close = getattr(evaluator, "close", None)
    if callable(close):
        close()


class MaskTable:
    """The masks of a ``Masker``, memoised, for one program at a time or many in lockstep.

    The paper's constraints (distinct operands, no final addition, reuse of a result)
    depend only on the position and on the first operand of the current group, so a mask
    is computed once per (position, first operand) with ``Masker.mask`` and reused.
    """

    def __init__(self, masker: Masker):
        self.masker = masker
        self.vocab = masker.vocab
        self.V = len(masker.vocab)
        self.length = masker.length
        self._plain: dict[int, np.ndarray] = {}
        self._by_op1: dict[int, np.ndarray] = {}  # pos -> (V, V) table, row = first operand
        self._known: dict[int, np.ndarray] = {}   # pos -> which rows of that table are filled

    def mask(self, prefix: Sequence[int]) -> np.ndarray:
        """The bool mask at position ``len(prefix)`` (read-only: copy before changing it)."""
        pos = len(prefix)
        if pos % GROUP_SIZE != 1:
            m = self._plain.get(pos)
            if m is None:
                m = self._plain[pos] = self.masker.mask(prefix)
                m.flags.writeable = False
            return m
        op1 = int(prefix[-1])
        table, known = self._table(pos)
        if not known[op1]:
            table[op1] = self.masker.mask(prefix)
            known[op1] = True
        row = table[op1]
        row.flags.writeable = False
        return row

    def masks(self, prefixes: np.ndarray) -> np.ndarray:
        """``(N, V)`` bool masks for N prefixes of one length (``prefixes``: (N, pos) ids)."""
        n, pos = prefixes.shape
        if pos % GROUP_SIZE != 1:
            return np.repeat(self.mask(prefixes[0])[None, :], n, axis=0)
        op1 = prefixes[:, -1]
        table, known = self._table(pos)
        for i in np.flatnonzero(~known[op1]):
            if not known[op1[i]]:
                self.mask(prefixes[i])
        return table[op1]

    def _table(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        if pos not in self._by_op1:
            self._by_op1[pos] = np.zeros((self.V, self.V), dtype=bool)
            self._known[pos] = np.zeros(self.V, dtype=bool)
        return self._by_op1[pos], self._known[pos]


def project_action(action: int, mask: np.ndarray) -> int:
    """The documented projection: a valid action is kept; an invalid one becomes
    ``valid[action % len(valid)]``, where ``valid`` lists the valid ids in increasing order."""
    if mask[action]:
        return action
    valid = np.flatnonzero(mask)
    return int(valid[action % len(valid)])


def action_index(action: Any, n: int) -> int:
    """``action`` as a Python int in [0, n), or a ValueError saying what was wrong."""
    if type(action) is int or isinstance(action, np.integer):  # the common case, fast
        a = int(action)
        if not 0 <= a < n:
            raise ValueError(f"action {a} is outside Discrete({n}): token ids are 0..{n - 1}")
        return a
    arr = np.asarray(action)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.integer) or
                             (np.issubdtype(arr.dtype, np.floating) and float(arr.reshape(-1)[0]).is_integer())):
        raise ValueError(f"an action is one token id (an integer in [0, {n})), got {action!r}")
    a = int(arr.reshape(-1)[0])
    if not 0 <= a < n:
        raise ValueError(f"action {a} is outside Discrete({n}): token ids are 0..{n - 1}")
    return a


def invalid_action_message(vocab: Vocabulary, pos: int, action: int, mask: np.ndarray) -> str:
    group, slot = divmod(pos, GROUP_SIZE)
    choices = ", ".join(f"{i}={vocab.tokens[i]}" for i in np.flatnonzero(mask))
    return (f"action {action} (token {vocab.tokens[action]!r}) is not allowed at position {pos} "
            f"(group {group + 1}, {_SLOT_NAMES[slot]}, a {SLOT_KINDS[slot]}); valid choices: {choices}. "
            f"Sample with the mask (env.action_masks() or info['action_mask']), or use "
            f"invalid_action='project' to map any index onto a valid token")


def check_program_args(depth: Any, distinct_operands: Any, no_final_addition: Any,
                       reuse_result: Any) -> tuple[int, Constraints]:
    """The depth and the paper's constraints, checked: a bool is not a depth, and only a bool
    turns a constraint on or off (``"no"`` would otherwise read as True)."""
    if isinstance(depth, (bool, np.bool_)) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth is the number of groups, an integer >= 1 (the paper uses 1, 2, 3); got {depth!r}")
    flags = {"distinct_operands": distinct_operands, "no_final_addition": no_final_addition,
             "reuse_result": reuse_result}
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} turns a constraint of the paper on or off: True or False, got {value!r}")
    return int(depth), Constraints(*(bool(v) for v in flags.values()))


def observation_space(mode: str, length: int, V: int) -> spaces.Space:
    """The observation space of one env: "tokens" (MultiDiscrete) or "onehot" (Box)."""
    if mode == "tokens":
        return spaces.MultiDiscrete(np.array([V + 1] * length + [length + 1]), dtype=np.int64)
    if mode == "onehot":
        return spaces.Box(0.0, 1.0, shape=(length * (V + 1) + length + 1,), dtype=np.float32)
    raise ValueError(f"observation must be one of {OBSERVATION_MODES}, got {mode!r}")


def onehot(tokens_obs: np.ndarray, V: int) -> np.ndarray:
    """The "onehot" observations of "tokens" observations (shape (..., length + 1))."""
    length = tokens_obs.shape[-1] - 1
    flat = tokens_obs.reshape(-1, length + 1)
    out = np.zeros((flat.shape[0], length * (V + 1) + length + 1), dtype=np.float32)
    rows = np.arange(flat.shape[0])[:, None]
    out[rows, np.arange(length) * (V + 1) + flat[:, :length]] = 1.0
    out[rows[:, 0], length * (V + 1) + flat[:, length]] = 1.0
    return out.reshape(*tokens_obs.shape[:-1], -1)


#: the keys of a finished episode's info, besides ``action_mask`` and ``projected``
TERMINAL_KEYS = ("tokens", "rule", "canonical_key", "metrics", "cached", "error", "source")


def terminal_info(program: Program, result: Result) -> dict[str, Any]:
    """The info of a finished episode (fresh objects: the caller may keep and change it)."""
    values = (program.tokens, program.format(), program.canonical_key, copy.deepcopy(result.metrics),
              bool(result.cached), result.error, result.source)
    return dict(zip(TERMINAL_KEYS, values, strict=True))


class OptimizerSearchEnv(gym.Env[np.ndarray, np.int64]):
    """
    ## Description

    Neural Optimizer Search (Bello, Zoph, Vasudevan and Le, ICML 2017) as a sequential
    decision problem. The agent writes an update rule in the paper's language, one token
    per step: a program of depth ``n`` is ``5n`` tokens in groups ``op1 op2 u1 u2 b``, each
    computing ``b(u1(op1), u2(op2))``; the result of group ``k`` becomes operand ``r{k}``
    of later groups, and the last group's result ``d`` is the update ``w <- w - lr * d``.
    When the program is complete the task (by default the Rosenbrock fast reward of
    section 5.1) trains with it and its score is the reward.

    ## Action Space

    ``Discrete(V)`` over the whole vocabulary of ``nos_gym.dsl.Vocabulary(depth)``: the 16
    base operands, the results ``r1 .. r{depth-1}``, the 12 unary and the 5 binary
    functions (V = 33 + depth - 1), in that order. Only some tokens are valid at each
    position (the slot's kind, the search space, the results computed so far and the
    enabled constraints): ``env.action_masks()`` returns them as a bool array (the
    sb3-contrib convention) and ``info["action_mask"]`` as int8, usable as
    ``env.action_space.sample(mask=info["action_mask"])``.

    An invalid action is, by default (``invalid_action="project"``), replaced by
    ``valid[action % len(valid)]``, with ``valid`` the valid ids in increasing order (a valid
    action is kept): deterministic, and it lets unmasked agents (SB3 PPO, A2C, DQN,
    RecurrentPPO, TRPO) and the env checkers run unchanged. ``info["projected"]`` says when
    it happened. With ``invalid_action="raise"`` an ``InvalidActionError`` names the token,
    the position and the valid choices. An index outside ``[0, V)`` is always a ``ValueError``.

    ## Observation Space

    ``MultiDiscrete([V + 1] * 5n + [5n + 1])``, int64, shape ``(5n + 1,)``:
    ``obs[i]`` is ``1 + token id`` of the i-th token written so far and ``0`` for a
    position not written yet; ``obs[5n]`` is the position (the number of tokens written).
    It holds the whole prefix, so a memoryless policy can act on it.

    With ``observation="onehot"``: the same as a float32 ``Box(0, 1)`` of shape
    ``(5n * (V + 1) + 5n + 1,)``, each of the 5n entries and the position one-hot encoded
    (what SB3 makes of the MultiDiscrete form internally). Use it with sb3-contrib's
    RecurrentPPO: SB3 sizes its LSTM from a MultiDiscrete space with a NumPy integer,
    which torch 2.x's ``nn.LSTM`` rejects.

    ## Rewards

    0 at every step but the last. The last step's reward is the task's score of the
    finished program, in [0, 1]. A rule whose training produces NaN or inf scores 0 (the
    task and ``Result`` clamp it; nothing is raised). Scores go through an ``Evaluator``,
    which caches them by canonical program key: ``info["cached"]`` says when a score was
    reused, and ``info["source"]`` where it came from (the Evaluator's funnel): "trained",
    "cache", "store", "fingerprint" (the score of a rule that behaves identically on the
    probe, named in ``metrics["equivalent_to"]``) or "screen" (a degenerate rule -- NaN/inf,
    zero, ignoring the gradient or never descending on the probe -- given the task's
    ``screen_score()`` untrained; ``error`` says why).

    ## Starting State

    The empty program: all zeros. Nothing is random; ``reset(seed=...)`` only seeds
    ``np_random`` for wrappers and samplers.

    ## Episode End

    The episode terminates after exactly ``5n`` steps, when the program is complete.
    It never truncates. The terminal ``info`` holds ``tokens`` (token names), ``rule``
    (paper notation), ``canonical_key``, ``metrics`` (the task's), ``cached``, ``error``
    (None or why the rule scored 0 or was screened) and ``source``. Stepping a finished episode raises: call ``reset()``.

    ## Arguments

    ```python
    import gymnasium as gym
    import nos_gym

    env = gym.make("OptimizerSearch-v0", task="rosenbrock", depth=2, space="full")
    ```

    - ``task``: a registered task name (``nos_gym.tasks.available()``) or a ``Task``
      object; default "rosenbrock". ``task_options``: keyword arguments for
      ``nos_gym.tasks.make(task, **task_options)``, e.g. ``{"iterations": 1000}``.
    - ``evaluator``: score through this evaluator (anything with ``evaluate(programs)``)
      instead of a new ``Evaluator(task)``; share one between envs to share its cache.
      ``env.close()`` closes the Evaluator the env built (its worker processes, a store it
      opened), not one passed in: whoever made that one closes it.
    - ``depth``: number of groups n (1, 2 or 3 in the paper).
    - ``space``: search space name ("full", "extended", "small", "sign") or a ``SearchSpace``.
    - ``distinct_operands``, ``no_final_addition``, ``reuse_result``: the paper's three
      constraints (section 4.1), each on by default, enforced through the masks.
    - ``invalid_action``: "project" (default) or "raise".
    - ``observation``: "tokens" (default, MultiDiscrete) or "onehot" (Box).
    - ``render_mode``: None, "ansi" (``render()`` returns the program so far as text) or
      "rgb_array" (``render()`` returns an ``(H, W, 3)`` uint8 picture of the rule being
      written: the paper's computation graph, operands -> unary -> binary, each group's
      result ``r{k}`` feeding later groups, empty slots as dashed placeholders and the
      reward once the rule is scored; ``nos_gym.envs.render.draw_program`` draws it,
      so ``gymnasium.wrappers.RecordVideo``, ``render_mode="rgb_array_list"`` and SB3's
      ``make_vec_env`` (which asks for "rgb_array") work). H = 400, W = max(480, 320 * depth).

    Preset ids: ``OptimizerSearch-Rosenbrock-v0`` (Rosenbrock, full space, depth 2),
    ``OptimizerSearch-RosenbrockSmall-v0`` (Rosenbrock, small space, depth 1: a search
    that MaskablePPO solves in minutes), ``OptimizerSearch-Quadratic-v0`` (noisy
    ill-conditioned quadratic, full space, depth 2).

    ## Version History

    * v0: Initial version. Later in v0: ``render_mode="rgb_array"`` added (rendering only:
      spaces, dynamics and rewards unchanged, so the version stays v0).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, task: str | Task | None = None, depth: int = 2, space: str | SearchSpace = "full",
                 distinct_operands: bool = True, no_final_addition: bool = True, reuse_result: bool = True,
                 invalid_action: str = "project", evaluator: EvaluatorLike | None = None,
                 task_options: dict[str, Any] | None = None, render_mode: str | None = None,
                 observation: str = "tokens"):
        depth, constraints = check_program_args(depth, distinct_operands, no_final_addition, reuse_result)
        if observation not in OBSERVATION_MODES:
            raise ValueError(f"observation must be one of {OBSERVATION_MODES}, got {observation!r}")
        if invalid_action not in INVALID_ACTION_MODES:
            raise ValueError(f"invalid_action must be one of {INVALID_ACTION_MODES}, got {invalid_action!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.depth = depth
        self.space = get_space(space)
        self.constraints = constraints
        self.invalid_action = invalid_action
        self.render_mode = render_mode
        self.evaluator = make_evaluator(task, evaluator, task_options)
        self._owns_evaluator = evaluator is None
        self.mask_table = MaskTable(Masker(self.space, self.depth, self.constraints))
        self.vocab = self.mask_table.vocab
        self.length = GROUP_SIZE * self.depth
        V = len(self.vocab)
        self.action_space = spaces.Discrete(V)
        self.observation = observation
        self.observation_space = observation_space(observation, self.length, V)
        self._obs = np.zeros(self.length + 1, dtype=np.int64)
        self._ids: list[int] = []
        self._mask = self.mask_table.mask([])
        self._done = True
        self._last_info: dict[str, Any] = {}
        self._last_reward: float | None = None

    # ------------------------------------------------------------------------- API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._obs[:] = 0
        self._ids = []
        self._mask = self.mask_table.mask(self._ids)
        self._done = False
        self._last_info = {}
        self._last_reward = None
        return self._observe(), {"action_mask": self._mask.astype(np.int8)}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError("the program is complete (or reset() was never called): call reset() "
                               "before step()")
        a = action_index(action, self.action_space.n)
        pos = len(self._ids)
        projected = False
        if not self._mask[a]:
            if self.invalid_action == "raise":
                raise InvalidActionError(invalid_action_message(self.vocab, pos, a, self._mask))
            a = project_action(a, self._mask)
            projected = True
        self._ids.append(a)
        self._obs[pos] = a + 1
        self._obs[self.length] = pos + 1
        if pos + 1 < self.length:
            self._mask = self.mask_table.mask(self._ids)
            return self._observe(), 0.0, False, False, {"action_mask": self._mask.astype(np.int8),
                                                          "projected": projected}
        self._done = True
        self._mask = np.zeros(len(self.vocab), dtype=bool)
        program = Program.from_ids(self._ids, self.vocab)
        result = self.evaluator.evaluate([program])[0]
        info = terminal_info(program, result)
        info["action_mask"] = self._mask.astype(np.int8)
        info["projected"] = projected
        self._last_info = info
        self._last_reward = float(result.reward)
        return self._observe(), self._last_reward, True, False, info

    def action_masks(self) -> np.ndarray:
        """Bool mask of the valid actions now (all False once the program is complete)."""
        return self._mask.copy()

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "rgb_array":
            from nos_gym.envs.render import draw_program

            note = None
            if self._last_reward is not None:
                cached = " (cached)" if self._last_info.get("cached") else ""
                note = f"reward {self._last_reward:.4f}{cached}"
            return draw_program(self._ids, self.vocab, self.depth, note=note)
        if self.render_mode != "ansi":
            return None
        toks = [self.vocab.tokens[i] for i in self._ids] + ["_"] * (self.length - len(self._ids))
        groups = [" ".join(toks[i: i + GROUP_SIZE]) for i in range(0, self.length, GROUP_SIZE)]
        text = f"[{' | '.join(groups)}] {len(self._ids)}/{self.length}"
        if len(self._ids) == self.length:
            text += f"  {Program.from_ids(self._ids, self.vocab).format()}"
        return text

    def close(self) -> None:
        """Close the Evaluator this env built (its worker processes, a store it opened); one passed in stays open."""
        if getattr(self, "_owns_evaluator", False):
            close_evaluator(self.evaluator)
        super().close()

    # ------------------------------------------------------------------------ extras
    def _observe(self) -> np.ndarray:
        if self.observation == "tokens":
            return self._obs.copy()
        return onehot(self._obs, len(self.vocab))

    @property
    def program(self) -> Program | None:
        """The finished program of the current episode (None while it is being written)."""
        return Program.from_ids(self._ids, self.vocab) if len(self._ids) == self.length else None
