"""Dialogue state: what a conversation has asked for so far, and the call a backend would run.

SGD annotates each user turn with, per service, the active intent and every slot value given up
to that turn. A turn's call is that state: the function (service + active intent) and the
values of its parameters. Values belong to the service, not the intent, because SGD carries them
across a service's intents (the city found by FindRestaurants is the city ReserveRestaurant books
in). Understanding predicts, per turn, only what changed; `DialogueState.update` folds it in.

    state = DialogueState()
    call = state.update("Restaurants_1__ReserveRestaurant", {"time": "7 pm"}, functions)
    call.as_dict()  # {"function": "Restaurants_1__ReserveRestaurant", "arguments": {"city": ..., "time": "7 pm"}}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dialogtune.dialogue import Dialogue
from dialogtune.retrieval.exemplars import NO_INTENT
from dialogtune.retrieval.schemas import service_of, sgd_function_name


@dataclass(frozen=True)
class Call:
    function: str | None  # None: the turn asks for nothing
    arguments: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"function": self.function, "arguments": dict(self.arguments)} if self.function \
            else {"function": None}


@dataclass
class DialogueState:
    """Slot values per service, kept across turns."""
    values: dict[str, dict[str, str]] = field(default_factory=dict)

    def update(self, function: str | None, changes: Mapping[str, str | None],
               parameters: Mapping[str, list[str]] | None = None) -> Call:
        """Fold one turn's changes (slot -> new value; None: not said) into the state and return
        the turn's call. `parameters`: function -> its parameter names, so the call carries only
        the function's own arguments (a service's other intents may hold more values)."""
        if function is None:
            return Call(None)
        held = self.values.setdefault(service_of(function), {})
        held.update({slot: value for slot, value in changes.items() if value is not None})
        names = parameters.get(function) if parameters is not None else None
        return Call(function, {slot: value for slot, value in held.items() if names is None or slot in names})


# --- gold state from SGD annotations ---------------------------------------------------------

@dataclass(frozen=True)
class UserTurn:
    """One SGD user turn with what understanding should produce for it."""
    index: int  # position in the dialogue's turns
    function: str | None  # the active intent of the turn's frame, as `Service__Intent`; None: nothing
    changes: dict[str, str]  # slot values new or changed in this turn (the targets)
    state: dict[str, list[str]]  # the frame's whole state: slot -> every acceptable value
    service: str | None
    also: tuple[str, ...] = ()  # other functions the turn opens or changes (one call per turn is made)


def _said(values: list[str], text: str) -> str:
    """The variant of a value the conversation says (SGD lists several), else the first."""
    lowered = text.lower()
    return next((value for value in values if value.lower() in lowered), values[0])


def _frames_of_turn(frames: list[dict], previous: dict[str, tuple[str, dict]]) -> list[dict]:
    """The frames the turn is about, the first being its call: the active ones that changed
    (intent or values), else the first active one; none when no service has an active intent."""
    active = [f for f in frames if f["state"].get("active_intent", NO_INTENT) != NO_INTENT]
    changed = [f for f in active if previous.get(f["service"]) != (f["state"]["active_intent"],
                                                                   f["state"].get("slot_values", {}))]
    return changed or active[:1]


def _function(frame: dict) -> str:
    return sgd_function_name(frame["service"], frame["state"]["active_intent"])


def sgd_user_turns(dialogue: Dialogue) -> Iterator[UserTurn]:
    """Each USER turn of an SGD dialogue with its gold function and slot changes."""
    previous: dict[str, tuple[str, dict]] = {}  # service -> (intent, slot values) at its last user turn
    for index, turn in enumerate(dialogue.turns):
        if turn.speaker != "USER":
            continue
        frames = [f for f in turn.meta.get("frames", []) if isinstance(f.get("state"), dict)]
        chosen = _frames_of_turn(frames, previous)
        if not chosen:
            changes, function, state, service = {}, None, {}, None
        else:
            frame = chosen[0]
            service, state = frame["service"], frame["state"].get("slot_values", {})
            before = previous.get(service, (NO_INTENT, {}))[1]
            # what this turn and the one before it say: a value the user accepts ("that one")
            # comes from the system's offer
            heard = " ".join(t.text for t in dialogue.turns[max(0, index - 1): index + 1])
            changes = {slot: _said(values, heard) for slot, values in state.items()
                       if values and values != before.get(slot)}
            function = _function(frame)
        for f in frames:
            previous[f["service"]] = (f["state"].get("active_intent", NO_INTENT), f["state"].get("slot_values", {}))
        yield UserTurn(index, function, changes, state, service, tuple(_function(f) for f in chosen[1:]))
