"""The paper's controller: a single-layer LSTM that writes a rule token by token.

Section 3.2 and Figure 3: every prediction is a softmax classifier whose choice is fed
into the next step as input; "since the operand bank grows as more iterations are
computed, we use different softmax weights at every step of prediction". Section 4.2:
a single-layer LSTM with hidden state 150, weights initialised uniformly in
[-0.08, 0.08]. Section 4.1: constraints are "implemented by manually setting the logits
corresponding to the forbidden operands or functions to -inf".

Each softmax ranges over the whole flat vocabulary (the env's ``Discrete(V)``); the
env's mask leaves only the tokens valid at that position (right kind, constraints), so
position t's head in effect ranges over the operand bank of its group.

Sampling goes one step at a time (``initial_state`` / ``step``), so the controller can
take each step's masks from the env; training re-runs the sampled strings with their
saved masks (``evaluate``) to get log-probabilities and entropies with gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["LSTMController", "masked_categorical_stats", "masked_kl"]


@dataclass
class ControllerState:
    """Recurrent state between sampling steps: LSTM (h, c) and the previous token."""

    h: Tensor
    c: Tensor
    prev: Tensor  # (N,) long; the start token before the first step


class LSTMController(nn.Module):
    """Single-layer LSTM controller with a separate softmax per position.

    Args:
        vocab_size: V, the env's ``Discrete(V)``.
        length: tokens per rule (5 * depth).
        hidden_size: LSTM hidden state (and token embedding) size; the paper's 150.
        init_scale: every weight starts uniform in [-init_scale, init_scale]; the paper's 0.08.
    """

    def __init__(self, vocab_size: int, length: int, hidden_size: int = 150, init_scale: float = 0.08):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.length = int(length)
        self.hidden_size = int(hidden_size)
        # token ids 0..V-1 and a start token V, embedded as the LSTM's input
        self.embed = nn.Embedding(self.vocab_size + 1, self.hidden_size)
        self.cell = nn.LSTMCell(self.hidden_size, self.hidden_size)
        # one softmax (weight, bias) per position
        self.head_weight = nn.Parameter(torch.empty(self.length, self.hidden_size, self.vocab_size))
        self.head_bias = nn.Parameter(torch.empty(self.length, self.vocab_size))
        for p in self.parameters():
            nn.init.uniform_(p, -init_scale, init_scale)

    # ------------------------------------------------------------------ sampling
    def initial_state(self, n: int) -> ControllerState:
        z = self.head_bias.new_zeros(n, self.hidden_size)
        start = torch.full((n,), self.vocab_size, dtype=torch.long, device=z.device)
        return ControllerState(z, z.clone(), start)

    def logits(self, state: ControllerState, t: int, mask: Tensor) -> tuple[Tensor, ControllerState]:
        """Masked logits ``(N, V)`` at position ``t`` (invalid tokens -inf) and the advanced state."""
        h, c = self.cell(self.embed(state.prev), (state.h, state.c))
        out = h @ self.head_weight[t] + self.head_bias[t]
        return out.masked_fill(~mask, float("-inf")), ControllerState(h, c, state.prev)

    @torch.no_grad()
    def step(self, state: ControllerState, t: int, mask: Tensor,
             generator: torch.Generator | None = None, greedy: bool = False) -> tuple[Tensor, ControllerState]:
        """Sample the token at position ``t`` for each row; returns ``(actions (N,), new state)``."""
        if mask.dtype != torch.bool:
            mask = mask.bool()
        if not bool(mask.any(-1).all()):
            raise ValueError(f"position {t}: a row of the mask allows no token")
        logits, state = self.logits(state, t, mask)
        if greedy:
            actions = logits.argmax(-1)
        else:
            actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        state.prev = actions
        return actions, state

    def actor(self, n: int, generator: torch.Generator | None = None) -> Callable[[int, np.ndarray], np.ndarray]:
        """An ``act(t, masks)`` for ``nos_gym.agents.rollout``: samples n rules through an env,
        one token per call, each step with the env's masks."""
        state = self.initial_state(n)

        def act(t: int, masks: np.ndarray) -> np.ndarray:
            nonlocal state
            actions, state = self.step(state, t, torch.from_numpy(masks), generator)
            return actions.numpy()

        return act

    @torch.no_grad()
    def sample(self, masker, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` strings sampled with masks from a ``nos_gym.dsl.Masker`` (no env): ``(tokens, masks)``.

        The env does the same job during a search (``nos_gym.agents.rollout``); this is for
        tests and quick looks at what the controller writes.
        """
        state = self.initial_state(n)
        tokens = torch.empty(n, self.length, dtype=torch.long)
        masks = torch.empty(n, self.length, self.vocab_size, dtype=torch.bool)
        for t in range(self.length):
            m = torch.stack([torch.as_tensor(masker.mask(tokens[i, :t].tolist())) for i in range(n)])
            masks[:, t] = m
            tokens[:, t], state = self.step(state, t, m, generator)
        return tokens, masks

    # ------------------------------------------------------------------ training
    def forward(self, tokens: Tensor, masks: Tensor) -> Tensor:
        """Masked logits ``(N, L, V)`` for whole sampled strings (teacher forcing)."""
        n, length = tokens.shape
        state = self.initial_state(n)
        out = []
        for t in range(length):
            logits, state = self.logits(state, t, masks[:, t])
            state.prev = tokens[:, t]
            out.append(logits)
        return torch.stack(out, 1)

    def evaluate(self, tokens: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(log_prob (N,), entropy (N,), logits (N, L, V))`` of whole strings.

        ``log_prob`` and ``entropy`` are summed over positions (the string is one action
        of the paper's policy).
        """
        logits = self.forward(tokens, masks)
        logp_tok, ent_tok = masked_categorical_stats(logits, masks, tokens)
        return logp_tok.sum(-1), ent_tok.sum(-1), logits


def masked_categorical_stats(logits: Tensor, masks: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position log-prob of ``tokens`` and entropy, with -inf logits at masked entries.

    ``0 * -inf`` is kept out of the sums (and their gradients) by zeroing masked entries
    of log-softmax before multiplying.
    """
    logp = torch.log_softmax(logits, -1)
    logp_safe = logp.masked_fill(~masks, 0.0)
    p = logp_safe.exp() * masks
    entropy = -(p * logp_safe).sum(-1)
    chosen = logp_safe.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen, entropy


def masked_kl(old_logits: Tensor, new_logits: Tensor, masks: Tensor) -> Tensor:
    """KL(old || new) of each string's per-position distributions, summed over positions: ``(N,)``."""
    old = torch.log_softmax(old_logits, -1).masked_fill(~masks, 0.0)
    new = torch.log_softmax(new_logits, -1).masked_fill(~masks, 0.0)
    p = old.exp() * masks
    return (p * (old - new)).sum(-1).sum(-1)
