"""Cut examples longer than `max_length` into pieces that fit, at message boundaries.

Each piece keeps the system prompt, the turn being answered and as much of the most recent
context as fits, and no trained message is ever cut. A trained message that cannot fit even
alone is reported, never silently lost.

Where the pieces start and end is planned once, by token estimates from the full example's
encoding (`plan_windows`). The planned pieces of a whole batch are tokenized together ahead of
time (`fit_ahead`); `fit` then walks the same plan, and only when a piece had to shrink to fit
does it plan the rest again from there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from dialogtune.render import ExampleRejected, Rendered
from dialogtune.tasks import Example

if TYPE_CHECKING:
    from dialogtune.locate import Located
    from dialogtune.tokenize import ExampleEncoder, Tokenized, TokenizeStats


@dataclass(slots=True)
class Layout:
    """Where a long example's messages sit, for cutting it: token estimates per message."""

    n_system: int  # leading system messages, repeated in every piece
    sizes: list[int]  # tokens per message, from the full encoding
    head: int  # tokens before the first non-system message
    trained: list[int]  # indices of the trained messages


@dataclass(frozen=True, slots=True)
class Window:
    """The messages begin..end of one piece (with the system prompt); trained from `first` on."""

    begin: int
    floor: int  # the turn `first` answers: context is never dropped past it
    first: int  # the piece's first trained message
    end: int


def layout_of(example: Example, render: Rendered, located: Located) -> Layout:
    messages = example.messages
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] == "system":
        n_system += 1
    # Token estimate per message from the full encoding: from its start to the next message's.
    starts = [located.token_at(s, len(render.text), 1) if s is not None else None for s in render.message_starts]
    known = sorted((s, i) for i, s in enumerate(starts) if s is not None)
    sizes = [0] * len(messages)
    for (start, index), following in zip(known, [s for s, _ in known[1:]] + [len(located.ids)]):
        sizes[index] = following - start
    head = starts[n_system] if n_system < len(starts) and starts[n_system] is not None else 0
    trained = [i for i in range(n_system, len(messages)) if messages[i]["train"]]
    return Layout(n_system, sizes, head, trained)


def plan_windows(layout: Layout, max_length: int, cursor: int = 0) -> Iterator[Window]:
    """The pieces from trained turn number `cursor` on, by token estimates: each next piece
    starts at the first trained turn after the previous one's end."""
    while cursor < len(layout.trained):
        window = _window(layout, max_length, cursor)
        yield window
        cursor = _after(layout.trained, window.end)


def _window(layout: Layout, max_length: int, cursor: int) -> Window:
    """The piece that starts with trained turn number `cursor`."""
    sizes, n_system, head, trained = layout.sizes, layout.n_system, layout.head, layout.trained
    first = trained[cursor]
    # The turn being answered always comes along; more context up to half the row, then
    # as many following turns as fit, then more context if room is left.
    floor = first - 1 if first > n_system else first
    budget = max(max_length // 2, head + sum(sizes[floor : first + 1]))
    begin = min(floor, _extend_back(sizes, n_system, first, head + sizes[first], budget))
    estimate = head + sum(sizes[begin : first + 1])
    end = first
    while end + 1 < len(sizes) and estimate + sizes[end + 1] <= max_length:
        end += 1
        estimate += sizes[end]
    end = max(i for i in trained if first <= i <= end)
    begin = _extend_back(sizes, n_system, begin, head + sum(sizes[begin : end + 1]), max_length)
    return Window(begin, floor, first, end)


def _extend_back(sizes: list[int], n_system: int, begin: int, estimate: int, budget: int) -> int:
    while begin - 1 >= n_system and estimate + sizes[begin - 1] <= budget:
        begin -= 1
        estimate += sizes[begin]
    return begin


def _after(trained: list[int], end: int) -> int:
    """The number of the first trained turn after message `end`: where the next piece starts."""
    return next((k for k, i in enumerate(trained) if i > end), len(trained))


def _shrink(window: Window, layout: Layout) -> Window | None:
    """The next smaller piece to try: without its oldest context (never the turn at `floor`,
    the one being answered), else without its last trained turn (it goes to the next piece)."""
    if window.begin < window.floor:
        return replace(window, begin=window.begin + 1)
    if window.end > window.first:
        return replace(window, end=max(i for i in layout.trained if window.first <= i < window.end))
    return None


def piece_of(example: Example, n_system: int, window: Window) -> Example:
    """The window's messages with the system prompt; only turns from `first` on are trained."""
    messages = example.messages
    body = [dict(m) for m in messages[window.begin : window.end + 1]]
    for offset, m in enumerate(body):
        m["train"] = m["train"] and window.begin + offset >= window.first
    return Example(messages[:n_system] + body, example.dialogue_id, example.group, example.source, example.line)


def fit_ahead(encoder: ExampleEncoder, long: list[tuple[Example, Rendered, Located]]
              ) -> list[tuple[Layout, dict[Window, Tokenized]]]:
    """Tokenize, all in one parallel batch, the planned pieces of each long example (the
    estimates are nearly always right), so `fit` rarely encodes on its own. A piece the
    template refuses is left out: `fit` meets it again if it needs it, and reports it there."""
    layouts = [layout_of(*item) for item in long]
    plans = [list(plan_windows(layout, encoder.max_length)) for layout in layouts]
    pieces = [piece_of(example, layout.n_system, window)
              for (example, _, _), layout, plan in zip(long, layouts, plans, strict=True) for window in plan]
    tokenized = iter(encoder.encode_many(pieces))
    ready = []
    for layout, plan in zip(layouts, plans, strict=True):
        done = {window: next(tokenized) for window in plan}
        ready.append((layout, {window: piece for window, piece in done.items() if piece is not None}))
    return ready


def fit(encoder: ExampleEncoder, example: Example, layout: Layout, ready: dict[Window, Tokenized],
        stats: TokenizeStats) -> Iterator[Tokenized]:
    """The pieces of one long example that fit, in order; the turns that cannot fit are
    rejects. `ready` holds the pieces `fit_ahead` tokenized."""
    n_system = layout.n_system
    windows = plan_windows(layout, encoder.max_length)
    pieces = 0
    while (window := next(windows, None)) is not None:
        try:
            fitted = _fit_window(encoder, example, layout, window, ready)
        except ExampleRejected as err:
            stats.reject(example, str(err))
            return
        if fitted is None:
            stats.turns_too_long += 1
            who = example.messages[window.first].get("name") or "assistant"
            context = " with the turn it answers" if window.floor < window.first else ""
            stats.reject(example, (
                f"trained turn {window.first - n_system} ({who}) does not fit in max_length={encoder.max_length}"
                f" tokens{context}; raise max_length to keep it"))
            kept_end = window.first
        else:
            tokenized, kept = fitted
            if kept.begin > n_system:
                stats.context_truncated += 1
            pieces += 1
            yield tokenized
            kept_end = kept.end
        if kept_end != window.end:  # the plan assumed this piece ended elsewhere: plan the rest anew
            windows = plan_windows(layout, encoder.max_length, _after(layout.trained, kept_end))
    if pieces > 1:
        stats.examples_split += 1


def _fit_window(encoder: ExampleEncoder, example: Example, layout: Layout, window: Window,
                ready: dict[Window, Tokenized]) -> tuple[Tokenized, Window] | None:
    """The window's piece, shrunk until it fits, and the window it was shrunk to; None if even
    the trained turn at `first` with the turn it answers does not fit."""
    while window is not None:
        tokenized = ready.get(window)
        if tokenized is None:
            tokenized, _ = encoder.encode_one(piece_of(example, layout.n_system, window))
        if len(tokenized.input_ids) <= encoder.max_length:
            return tokenized, window
        window = _shrink(window, layout)
    return None
