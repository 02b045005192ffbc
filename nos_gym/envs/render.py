"""A picture of an update rule: the paper's computation graph (Bello et al. 2017, Figures 1 and 3).

Each group ``k`` is drawn as a column, top to bottom: its two operands, the two unary
functions applied to them, and the binary function that joins them. The result of group
``k`` is the operand ``r{k}`` of later groups (a curved arrow from its binary box to every
operand slot that reads it); the last group's result ``d`` is the update
``w <- w - lr * d``. A partial rule (the env mid-episode) is drawn with its empty slots
as dashed placeholders and the slot being written next outlined in orange.

>>> from nos_gym.envs.render import draw_program, save_program_png
>>> frame = draw_program("g * exp(sign(g) * sign(m))")   # (H, W, 3) uint8
>>> save_program_png("ADAM * exp(m)", "adam_exp_m.png")

Drawing uses matplotlib's Agg canvas (no display, no pyplot state); one figure per image
size is kept and redrawn, so a frame takes a few tens of milliseconds, fast enough for
``gymnasium.wrappers.RecordVideo``. ``OptimizerSearchEnv(render_mode="rgb_array")``
returns these frames from ``render()``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nos_gym.dsl.program import Program
from nos_gym.dsl.vocabulary import (
    BASE_OPERANDS,
    GROUP_SIZE,
    SLOT_KINDS,
    Vocabulary,
    is_result_operand,
    result_index,
)

GROUP_WIDTH = 320   # pixels per group column
HEIGHT = 400        # pixels
MIN_WIDTH = 480

_UNARY_LABELS = {
    "id": "x", "neg": "-x", "exp": "exp(x)", "log_abs": "log|x|", "clip1e-5": "clip(x, 1e-5)",
    "clip1e-4": "clip(x, 1e-4)", "clip1e-3": "clip(x, 1e-3)", "drop0.1": "drop(x, 0.1)",
    "drop0.3": "drop(x, 0.3)", "drop0.5": "drop(x, 0.5)", "sign": "sign(x)", "sqrt_abs": "sqrt|x|",
}
_BINARY_LABELS = {"add": "x + y", "sub": "x - y", "mul": "x * y", "div": "x / (y + eps)", "keep": "x (keep left)"}
_FACE = {"operand": "#cfe2f3", "result": "#ead1dc", "unary": "#d9ead3", "binary": "#fce5cd", "update": "#fff2cc"}
_EMPTY_EDGE, _NEXT_EDGE, _EDGE = "#9e9e9e", "#e67e22", "#333333"


def frame_size(depth: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the picture of a depth-``depth`` rule (both even)."""
    return max(MIN_WIDTH, GROUP_WIDTH * int(depth)), HEIGHT


def _token_names(program: Any, vocab: Vocabulary | None, depth: int | None) -> tuple[list[str], int]:
    """Token names written so far and the rule's depth, from any accepted form of ``program``."""
    if isinstance(program, Program):
        return list(program.tokens), depth or program.depth
    if isinstance(program, str):
        from nos_gym.dsl.notation import parse

        p = parse(program)
        return list(p.tokens), depth or p.depth
    items = list(program)
    if items and not isinstance(items[0], str):  # token ids
        if vocab is None:
            if depth is None:
                raise ValueError("token ids need vocab=... or depth=... to be read")
            vocab = Vocabulary(depth)
        names = vocab.tokens
        items = [names[int(i)] for i in items]
    if depth is None:
        depth = vocab.depth if vocab is not None else max(1, -(-len(items) // GROUP_SIZE))
    if len(items) > GROUP_SIZE * depth:
        raise ValueError(f"{len(items)} tokens do not fit a depth-{depth} rule ({GROUP_SIZE * depth} tokens)")
    return items, int(depth)


class ProgramRenderer:
    """Draws rules as RGB arrays, reusing one matplotlib figure per image size.

    Not thread-safe by itself (``draw_program`` guards its shared renderer with a lock);
    an env keeps its own.
    """

    def __init__(self, dpi: int = 100):
        self.dpi = dpi
        self._figures: dict[tuple[int, int], tuple[Any, Any, Any]] = {}

    def _canvas(self, width: int, height: int):
        key = (width, height)
        if key not in self._figures:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(width / self.dpi, height / self.dpi), dpi=self.dpi)
            canvas = FigureCanvasAgg(fig)
            ax = fig.add_axes((0, 0, 1, 1))
            self._figures[key] = (fig, canvas, ax)
        return self._figures[key]

    def __call__(self, program: Any, vocab: Vocabulary | None = None, depth: int | None = None, *,
                 note: str | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        tokens, depth = _token_names(program, vocab, depth)
        width, height = size or frame_size(depth)
        fig, canvas, ax = self._canvas(int(width), int(height))
        ax.clear()
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)  # y grows downwards, as in the picture
        ax.set_axis_off()
        _draw(ax, tokens, depth, width, height, note)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3])


_shared = ProgramRenderer()
_lock = threading.Lock()


def draw_program(program: Program | str | Sequence[str] | Sequence[int], vocab: Vocabulary | None = None,
                 depth: int | None = None, *, note: str | None = None,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """The computation graph of a rule, complete or partial, as an ``(H, W, 3)`` uint8 array.

    ``program``: a ``Program``, a rule in paper notation, or the tokens written so far
    (names, or ids of ``vocab``/``Vocabulary(depth)``). ``depth``: the number of groups to
    draw (default: the program's, or the vocabulary's for a partial rule), so that empty
    slots appear as placeholders. ``note``: an extra line under the title (e.g. the reward).
    ``size``: ``(width, height)`` in pixels; default ``frame_size(depth)``.
    """
    with _lock:
        return _shared(program, vocab, depth, note=note, size=size)


def save_program_png(program: Program | str | Sequence[str] | Sequence[int], path: str | Path,
                     vocab: Vocabulary | None = None, depth: int | None = None, **kwargs: Any) -> Path:
    """Draw ``program`` (as ``draw_program``) and write it to ``path`` as a PNG; returns the path."""
    from PIL import Image

    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_program(program, vocab, depth, **kwargs)).save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------ drawing
def _label(tok: str, kind: str) -> str:
    if kind == "operand":
        return tok if is_result_operand(tok) else BASE_OPERANDS[tok].replace(" * ", "·")
    return (_UNARY_LABELS if kind == "unary" else _BINARY_LABELS).get(tok, tok)


def _draw(ax, tokens: list[str], depth: int, width: int, height: int, note: str | None) -> None:
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as MplPath

    n = len(tokens)
    length = GROUP_SIZE * depth
    colw = width / depth
    y_op, y_un, y_bin, y_out = 0.27 * height, 0.45 * height, 0.63 * height, 0.81 * height
    bh = 0.085 * height
    small_w, big_w = 0.40 * min(colw, GROUP_WIDTH), 0.56 * min(colw, GROUP_WIDTH)

    # title: the rule when complete, else where the writing stands
    if n == length:
        title = Program(tuple(tokens)).format()
    else:
        group, slot = divmod(n, GROUP_SIZE)
        title = f"writing token {n + 1} of {length}: group {group + 1}, {SLOT_KINDS[slot]}"
    size = min(13.0, 1.6 * width / max(len(title), 1) * 72 / 100)
    ax.text(width / 2, 0.055 * height, title, ha="center", va="center", fontsize=size,
            fontweight="bold" if n == length else "normal")
    if note:
        ax.text(width / 2, 0.115 * height, note, ha="center", va="center", fontsize=9, color="#555555")

    def box(x: float, y: float, w: float, i: int, kind: str) -> None:
        if i < n:
            tok = tokens[i]
            face = _FACE["result" if kind == "operand" and is_result_operand(tok) else kind]
            style = dict(facecolor=face, edgecolor=_EDGE, linewidth=1.0)
            text, color = _label(tok, kind), "black"
        else:
            nxt = i == n
            style = dict(facecolor="white", edgecolor=_NEXT_EDGE if nxt else _EMPTY_EDGE,
                         linewidth=2.0 if nxt else 1.0, linestyle="--")
            text, color = (kind if nxt else "?"), (_NEXT_EDGE if nxt else _EMPTY_EDGE)
        ax.add_patch(FancyBboxPatch((x - w / 2, y - bh / 2), w, bh,
                                    boxstyle="round,pad=0,rounding_size=6", **style))
        ax.text(x, y, text, ha="center", va="center", fontsize=9 if len(text) < 14 else 8, color=color)

    def arrow(a: tuple[float, float], b: tuple[float, float], filled: bool, rad: float = 0.0,
              color: str | None = None, dotted: bool = False) -> None:
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, shrinkA=0, shrinkB=0,
                                     connectionstyle=f"arc3,rad={rad}",
                                     color=color or (_EDGE if filled else _EMPTY_EDGE),
                                     linewidth=1.0, linestyle=":" if dotted or not filled else "-"))

    result_arrows: list[tuple[int, float, float]] = []  # (group k, x, y top) of operand slots reading r_k
    for g in range(depth):
        cx = (g + 0.5) * colw
        base = g * GROUP_SIZE
        xs = (cx - 0.24 * min(colw, GROUP_WIDTH), cx + 0.24 * min(colw, GROUP_WIDTH))
        ax.text(cx, 0.155 * height, f"group {g + 1}", ha="center", va="center", fontsize=8, color="#777777")
        keep = base + 4 < n and tokens[base + 4] == "keep"
        for side in (0, 1):
            box(xs[side], y_op, small_w, base + side, "operand")
            box(xs[side], y_un, small_w, base + 2 + side, "unary")
            arrow((xs[side], y_op + bh / 2), (xs[side], y_un - bh / 2), base + 2 + side < n)
            arrow((xs[side], y_un + bh / 2), (cx + (side - 0.5) * 0.35 * big_w, y_bin - bh / 2),
                  base + 4 < n, dotted=keep and side == 1)
            if base + side < n and is_result_operand(tokens[base + side]):
                result_arrows.append((result_index(tokens[base + side]), xs[side], y_op - bh / 2))
        box(cx, y_bin, big_w, base + 4, "binary")
        if g == depth - 1:  # the update
            done = n == length
            ax.add_patch(FancyBboxPatch((cx - big_w / 2 - 10, y_out - bh / 2), big_w + 20, bh,
                                        boxstyle="round,pad=0,rounding_size=6", facecolor=_FACE["update"]
                                        if done else "white", edgecolor=_EDGE if done else _EMPTY_EDGE,
                                        linestyle="-" if done else "--"))
            ax.text(cx, y_out, "w ← w − lr · d", ha="center", va="center", fontsize=10,
                    color="black" if done else _EMPTY_EDGE)
            arrow((cx, y_bin + bh / 2), (cx, y_out - bh / 2), done)
            ax.text(cx + 6, (y_bin + y_out) / 2, "d", ha="left", va="center", fontsize=9, style="italic")
        else:
            ax.text(cx, y_bin + bh / 2 + 12, f"= r{g + 1}", ha="center", va="center", fontsize=9,
                    style="italic", color="black" if base + 4 < n else _EMPTY_EDGE)
    for k, x, y in result_arrows:  # r_k: from group k's binary box, through the gap right of its
        lane = 0.195 * height - 3 * (k - 1)  # column and along the top, down into the slot reading it
        verts = [((k - 0.5) * colw + big_w / 2, y_bin), (k * colw, y_bin), (k * colw, lane), (x, lane), (x, y)]
        ax.add_patch(FancyArrowPatch(path=MplPath(verts), arrowstyle="-|>", mutation_scale=10, color="#a64d79",
                                     linewidth=1.0))

    # the token string, as the ansi render writes it
    shown = tokens + ["_"] * (length - n)
    text = " | ".join(" ".join(shown[i: i + GROUP_SIZE]) for i in range(0, length, GROUP_SIZE))
    ax.text(width / 2, 0.95 * height, f"{text}   ({n}/{length})", ha="center", va="center",
            fontsize=min(8.0, 1.7 * width / max(len(text) + 10, 1) * 72 / 100), family="monospace",
            color="#555555")
