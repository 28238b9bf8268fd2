"""Dialogue state: gold calls read from SGD frames, and the state a conversation's turns build."""

from __future__ import annotations

from helpers import FIXTURES

from dialogtune.readers import sgd
from dialogtune.state import Call, DialogueState, service_of, sgd_user_turns

SGD_FIXTURE = FIXTURES / "retrieval" / "sgd"


def fixture_turns():
    return {d.id: list(sgd_user_turns(d)) for d in sgd.read(SGD_FIXTURE)}


def test_gold_turns_carry_the_function_and_only_what_changed():
    turns = fixture_turns()["2_00000"]
    assert [(t.index, t.function) for t in turns] == [
        (0, None), (2, "Restaurants_1__ReserveRestaurant"), (4, "Restaurants_1__ReserveRestaurant"),
        (6, "Restaurants_1__FindRestaurants"), (8, None)]
    assert turns[1].changes == {"restaurant_name": "Sushi Ran", "city": "Sausalito", "party_size": "4"}
    assert turns[2].changes == {"party_size": "5"}  # the rest of the state is unchanged
    assert turns[2].state == {"restaurant_name": ["Sushi Ran"], "city": ["Sausalito"], "party_size": ["5"]}
    # a new intent of the same service keeps the service's values; only the new ones are targets
    assert turns[3].changes == {"city": "Oakland", "cuisine": "Thai"}


def test_a_turn_opening_two_services_calls_the_first_and_names_the_other():
    turns = fixture_turns()["2_00001"]
    assert (turns[0].function, turns[0].also) == ("Music_1__PlaySong", ("Weather_1__GetWeather",))
    # Weather's city was Paris since turn 0 (its second frame): Rome is a change
    assert (turns[1].function, turns[1].changes) == ("Weather_1__GetWeather", {"city": "Rome"})


def test_state_accumulates_per_service_and_calls_carry_the_functions_own_arguments():
    parameters = {"R__Find": ["city", "cuisine"], "R__Reserve": ["restaurant_name", "city", "time"]}
    state = DialogueState()
    assert state.update("R__Find", {"city": "Oakland", "cuisine": None}, parameters) == Call("R__Find", {"city": "Oakland"})
    assert state.update("R__Find", {"cuisine": "Thai"}, parameters).arguments == {"city": "Oakland", "cuisine": "Thai"}
    reserve = state.update("R__Reserve", {"restaurant_name": "Farmhouse", "time": "7 pm"}, parameters)
    assert reserve == Call("R__Reserve", {"city": "Oakland", "restaurant_name": "Farmhouse", "time": "7 pm"})
    assert state.update(None, {}, parameters).as_dict() == {"function": None}
    assert state.update("R__Find", {"city": "Berkeley"}, parameters).as_dict() == {
        "function": "R__Find", "arguments": {"city": "Berkeley", "cuisine": "Thai"}}
    assert service_of("R__Find") == "R" and service_of("get_weather") == "get_weather"
