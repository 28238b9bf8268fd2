"""Function schemas: SGD schema.json and OpenAI tools JSON in, tools JSON out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import FIXTURES, SHARED_DATA

from dialogtune.cli import main
from dialogtune.errors import DataError
from dialogtune.retrieval.schemas import (
    FUNCTION_NAME,
    Function,
    Parameter,
    functions_from_tools,
    load_functions,
    read_functions,
    tools_json,
    write_tools_json,
)

SGD_SCHEMA = FIXTURES / "sgd" / "schema.json"


def test_sgd_intents_become_functions_with_their_slots():
    functions = read_functions(SGD_SCHEMA.parent)  # a directory means its schema.json
    assert [f.name for f in functions] == ["Restaurants_1__FindRestaurants", "Restaurants_1__ReserveRestaurant",
                                           "Weather_1__GetWeather", "RideSharing_2__GetRide", "Music_1__PlaySong"]
    reserve = functions[1]
    assert (reserve.service, reserve.intent) == ("Restaurants_1", "ReserveRestaurant")
    assert reserve.description == ("Reserve a table at a restaurant. "
                                   "Service: A leading provider for restaurant search and reservations.")
    assert reserve.parameters == (
        Parameter("restaurant_name", "Name of the restaurant", "string", None, required=True),
        Parameter("city", "City in which the restaurant is located", "string", None, required=True),
        Parameter("party_size", "Party size for a reservation", "string", ("1", "2", "3", "4", "5", "6"),
                  required=False, default="2"),
    )
    assert all(FUNCTION_NAME.match(f.name) for f in functions)


def test_tools_json_shape():
    weather = next(f for f in read_functions(SGD_SCHEMA) if f.intent == "GetWeather")
    assert tools_json([weather]) == [{"type": "function", "function": {
        "name": "Weather_1__GetWeather",
        "description": "Get the weather of a certain location on a date. Service: Check the weather for any place and any date.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "Name of the city"},
            "date": {"type": "string", "description": "Date for the weather", "default": "2019-03-01"},
        }, "required": ["city"]},
    }}]


def test_round_trip_sgd_to_tools_and_back(tmp_path):
    functions = read_functions(SGD_SCHEMA)
    write_tools_json(functions, tmp_path / "tools.json")
    assert read_functions(tmp_path / "tools.json") == functions


def test_sgd_dontcare_default_leaves_the_parameter_optional_without_default(tmp_path):
    schema = [{"service_name": "Bank_1", "description": "", "slots": [
        {"name": "account", "description": "Account", "is_categorical": True, "possible_values": ["checking", "savings"]}],
        "intents": [{"name": "Check", "description": "Check a balance", "required_slots": [],
                     "optional_slots": {"account": "dontcare"}}]}]
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    [function] = read_functions(tmp_path)
    assert function.description == "Check a balance."
    assert function.parameters == (Parameter("account", "Account", "string", ("checking", "savings")),)


def test_generic_tools_keep_types_and_have_no_service(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean", "description": "UTC?"},
                                         "digits": {"type": "integer", "description": "", "enum": [2, 4]}},
        "required": ["utc"], "additionalProperties": False}}},
             {"type": "function", "function": {"name": "ping"}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    get_time, ping = read_functions(tmp_path / "tools.json")
    assert get_time == Function("get_time", "Time now", (Parameter("utc", "UTC?", "boolean", None, True),
                                                         Parameter("digits", "", "integer", (2, 4))))
    assert (get_time.service, get_time.intent) == (None, "get_time")
    assert ping == Function("ping", "")


def test_tools_generated_from_pydantic_models_are_read():
    import openai
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        """Get the weather."""
        city: str
        days: int = 1

    tool = openai.pydantic_function_tool(GetWeather)  # titles, strict, additionalProperties: false
    assert functions_from_tools([tool], Path("tools.json")) == [Function("GetWeather", "Get the weather.", (
        Parameter("city", "", "string", None, True), Parameter("days", "", "integer", None, True, 1)))]


@pytest.mark.parametrize(("function", "message"), [
    ({"name": "f", "parameters": {"type": "array"}}, "tools[0] function 'f': 'parameters' must be a JSON Schema"),
    ({"name": "f", "parameters": {"type": "object", "properties": {"where": {"type": "object", "properties": {}}}}},
     "function 'f' parameter 'where': nested objects are not supported"),
    ({"name": "f", "parameters": {"type": "object", "properties": {"ids": {"type": "array"}}}},
     "parameter 'ids': nested arrays are not supported"),
    ({"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}},
     "parameter 'n': JSON Schema keyword 'minimum' is not supported"),
    ({"name": "f", "parameters": {"type": "object", "properties": {}, "required": ["x"]}},
     "required parameter 'x' is not among the properties"),
    ({"name": "Restaurants_1.Find"}, "function name 'Restaurants_1.Find' is not a valid tools name"),
])
def test_tools_json_that_cannot_be_represented_is_refused(tmp_path, function, message):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([{"type": "function", "function": function}]))
    with pytest.raises(DataError, match=re.escape(message)) as err:
        read_functions(path)
    assert str(path) in str(err.value)


def test_sgd_intent_slot_missing_from_service_is_named(tmp_path):
    schema = [{"service_name": "Bank_1", "slots": [], "intents": [
        {"name": "Pay", "required_slots": ["amount"], "optional_slots": {}}]}]
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(DataError, match="service 'Bank_1' intent 'Pay': slot 'amount' is not among"):
        read_functions(tmp_path)


def test_duplicates_across_files_merge_and_conflicts_are_refused(tmp_path):
    functions = read_functions(SGD_SCHEMA)
    reordered = [Function(f.name, f.description, f.parameters[::-1]) for f in functions]
    write_tools_json(reordered[:2], tmp_path / "same.json")
    assert load_functions([SGD_SCHEMA, tmp_path / "same.json"]) == functions
    changed = Function(functions[0].name, "something else", functions[0].parameters)
    write_tools_json([changed], tmp_path / "other.json")
    with pytest.raises(DataError, match="'Restaurants_1__FindRestaurants' differs between .*schema.json and .*other.json"):
        load_functions([SGD_SCHEMA, tmp_path / "other.json"])


def test_schema_command_writes_tools_and_counts(tmp_path, capsys):
    out = tmp_path / "tools.json"
    assert main(["schema", str(SGD_SCHEMA.parent), str(SGD_SCHEMA), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 5 functions from 4 services to {out}"
    assert read_functions(out) == read_functions(SGD_SCHEMA)


def test_schema_command_error_is_a_message(tmp_path, capsys):
    assert main(["schema", str(tmp_path), "-o", str(tmp_path / "tools.json")]) == 2
    assert "no schema.json in this directory" in capsys.readouterr().err


SGD = SHARED_DATA / "sgd"


@pytest.mark.skipif(not (SGD / "train" / "schema.json").exists() or not (SGD / "dev" / "schema.json").exists(),
                    reason="no SGD data in ../shared/data")
def test_real_sgd_train_and_dev_schemas(tmp_path):
    raw = {split: json.loads((SGD / split / "schema.json").read_text()) for split in ("train", "dev")}
    intents = {split: {(s["service_name"], i["name"]) for s in services for i in s["intents"]}
               for split, services in raw.items()}
    train, dev = read_functions(SGD / "train"), read_functions(SGD / "dev")
    assert len(train) == sum(len(s["intents"]) for s in raw["train"]) == len(intents["train"])
    assert len(dev) == sum(len(s["intents"]) for s in raw["dev"])
    merged = load_functions([SGD / "train", SGD / "dev"])
    assert len(merged) == len(intents["train"] | intents["dev"])
    assert len({f.service for f in merged}) == len({s["service_name"] for split in raw.values() for s in split})
    assert all(FUNCTION_NAME.match(f.name) for f in merged)
    write_tools_json(merged, tmp_path / "tools.json")
    assert read_functions(tmp_path / "tools.json") == merged
