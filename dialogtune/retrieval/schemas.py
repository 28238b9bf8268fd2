"""Function schemas: what the understanding task can call, read from SGD `schema.json` or from
OpenAI tools JSON, written back as tools JSON.

    functions = load_functions([Path("sgd/train"), Path("sgd/dev")])
    write_tools_json(functions, Path("tools.json"))

An SGD service intent becomes one function named `Service_1__IntentName`. OpenAI (and Anthropic)
function names must match ^[a-zA-Z0-9_-]{1,64}$, so SGD's natural `Service_1.Intent` is not
allowed; SGD service names hold single underscores only and intent names none, so a double
underscore separates them unambiguously (and the name stays a valid identifier for templates that
render calls as code). `Function.service` and `Function.intent` recover the two halves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dialogtune.errors import DataError
from dialogtune.files import write_json
from dialogtune.readers._io import load_json

SERVICE_SEPARATOR = "__"
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
PARAMETER_TYPES = ("string", "integer", "number", "boolean")
# SGD's default "dontcare" means "no constraint", which a JSON Schema says by leaving the
# parameter optional; as a `default` it would also contradict the enum of categorical slots.
SGD_NO_CONSTRAINT = "dontcare"
_PROPERTY_KEYS = {"type", "description", "enum", "default"}
# JSON Schema's annotations constrain no value: accepted and not kept. Generated tools carry them
# (pydantic, and so `openai.pydantic_function_tool`, gives every field a `title`).
_ANNOTATIONS = {"title", "examples", "deprecated", "readOnly", "writeOnly", "$comment"}


@dataclass(frozen=True)
class Parameter:
    name: str
    description: str
    type: str = "string"
    enum: tuple[Any, ...] | None = None  # the possible values, when the parameter has a closed set
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: tuple[Parameter, ...] = ()

    @property
    def service(self) -> str | None:
        """The SGD service (`Restaurants_1`), or None for a function not named `Service__Intent`."""
        service, separator, _ = self.name.partition(SERVICE_SEPARATOR)
        return service if separator else None

    @property
    def intent(self) -> str:
        return self.name.partition(SERVICE_SEPARATOR)[2] or self.name

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)


def service_of(function: str) -> str:
    """The part of a function name its slot values belong to: the SGD service, or the whole name
    (a plain tool is its own service)."""
    service, separator, _ = function.partition(SERVICE_SEPARATOR)
    return service if separator else function


def sgd_function_name(service: str, intent: str) -> str:
    return f"{service}{SERVICE_SEPARATOR}{intent}"


# --- SGD schema.json ---------------------------------------------------------------------------

def _field(entry: Any, key: str, kind: type, where: str, path: Path) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind):
        raise DataError(f"{path}: {where}: expected a {kind.__name__} field '{key}'")
    return value


def _join_descriptions(intent: str, service: str) -> str:
    """The intent says what the call does; the service says in which domain, which is what tells
    apart same-named intents (`Services_1__BookAppointment` is a hair stylist, `Services_3__...` a
    doctor) when descriptions are searched by embedding."""
    intent, service = intent.strip().rstrip("."), service.strip().rstrip(".")
    return f"{intent}. Service: {service}." if service else f"{intent}."


def functions_from_sgd(schema: list, path: Path) -> list[Function]:
    functions = []
    for s_index, service in enumerate(schema):
        where = f"[{s_index}]"
        service_name = _field(service, "service_name", str, where, path)
        where = f"service {service_name!r}"
        service_description = service.get("description") or ""
        slots = {}
        for slot in _field(service, "slots", list, where, path):
            slots[_field(slot, "name", str, f"{where} slots", path)] = slot
        for intent in _field(service, "intents", list, where, path):
            intent_name = _field(intent, "name", str, f"{where} intents", path)
            at = f"{where} intent {intent_name!r}"
            required = _field(intent, "required_slots", list, at, path)
            optional = _field(intent, "optional_slots", dict, at, path)
            parameters = []
            for slot_name in [*required, *optional]:
                slot = slots.get(slot_name)
                if slot is None:
                    raise DataError(f"{path}: {at}: slot {slot_name!r} is not among the service's slots")
                default = optional.get(slot_name)
                parameters.append(Parameter(
                    name=slot_name,
                    description=slot.get("description") or "",
                    # SGD annotates every value as a string ("2", "True"): the arguments read from
                    # its dialogues are strings, so the schema says so too.
                    type="string",
                    enum=tuple(slot["possible_values"]) if slot.get("is_categorical") else None,
                    required=slot_name in required,
                    default=None if default == SGD_NO_CONSTRAINT else default,
                ))
            functions.append(Function(
                name=_checked_name(sgd_function_name(service_name, intent_name), at, path),
                description=_join_descriptions(intent.get("description") or "", service_description),
                parameters=tuple(parameters),
            ))
    return functions


def _checked_name(name: str, where: str, path: Path) -> str:
    if not FUNCTION_NAME.match(name):
        raise DataError(f"{path}: {where}: function name {name!r} is not a valid tools name "
                        "(expected 1-64 characters from a-z, A-Z, 0-9, _ and -)")
    return name


# --- OpenAI tools JSON ---------------------------------------------------------------------------

def functions_from_tools(tools: list, path: Path) -> list[Function]:
    functions = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise DataError(f'{path}: {where}: expected {{"type": "function", "function": {{...}}}}')
        spec = tool["function"]
        name = _checked_name(_field(spec, "name", str, where, path), where, path)
        where = f"{where} function {name!r}"
        description = spec.get("description", "")
        if not isinstance(description, str):
            raise DataError(f"{path}: {where}: 'description' must be a string")
        functions.append(Function(name, description, _parameters_from_json_schema(spec.get("parameters"), where, path)))
    return functions


def _parameters_from_json_schema(schema: Any, where: str, path: Path) -> tuple[Parameter, ...]:
    if schema is None:  # OpenAI allows a function without parameters
        return ()
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise DataError(f"{path}: {where}: 'parameters' must be a JSON Schema with \"type\": \"object\"")
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise DataError(f"{path}: {where}: 'properties' must be an object and 'required' a list")
    unknown = [name for name in required if name not in properties]
    if unknown:
        raise DataError(f"{path}: {where}: required parameter {unknown[0]!r} is not among the properties")
    parameters = []
    for name, spec in properties.items():
        at = f"{where} parameter {name!r}"
        if not isinstance(spec, dict):
            raise DataError(f"{path}: {at}: expected a JSON Schema object")
        kind = spec.get("type")
        if kind in ("object", "array"):
            raise DataError(f"{path}: {at}: nested {kind}s are not supported "
                            f"(expected a flat parameter of type {', '.join(PARAMETER_TYPES)})")
        if kind not in PARAMETER_TYPES:
            raise DataError(f"{path}: {at}: type {kind!r} is not supported (expected one of {', '.join(PARAMETER_TYPES)})")
        extra = sorted(set(spec) - _PROPERTY_KEYS - _ANNOTATIONS)
        if extra:
            raise DataError(f"{path}: {at}: JSON Schema keyword {extra[0]!r} is not supported "
                            f"(expected only {', '.join(sorted(_PROPERTY_KEYS))})")
        enum = spec.get("enum")
        if enum is not None and not isinstance(enum, list):
            raise DataError(f"{path}: {at}: 'enum' must be a list of values")
        parameters.append(Parameter(
            name=name, description=spec.get("description", ""), type=kind,
            enum=tuple(enum) if enum is not None else None, required=name in required, default=spec.get("default"),
        ))
    return tuple(parameters)


def tools_json(functions: Iterable[Function]) -> list[dict]:
    tools = []
    for function in functions:
        properties = {}
        for p in function.parameters:
            prop: dict[str, Any] = {"type": p.type, "description": p.description}
            if p.enum is not None:
                prop["enum"] = list(p.enum)
            if p.default is not None:
                prop["default"] = p.default
            properties[p.name] = prop
        parameters = {"type": "object", "properties": properties,
                      "required": [p.name for p in function.parameters if p.required]}
        tools.append({"type": "function",
                      "function": {"name": function.name, "description": function.description, "parameters": parameters}})
    return tools


def write_tools_json(functions: Iterable[Function], path: Path) -> None:
    write_json(path, tools_json(functions))  # whole or not at all: it may be the user's -o file


# --- files ---------------------------------------------------------------------------------------

def schema_file(path: Path) -> Path:
    """A schema file, or the `schema.json` of an SGD split directory."""
    if not path.is_dir():
        return path
    for name in ("schema.json", "schema.json.gz"):
        if (path / name).exists():
            return path / name
    raise DataError(f"{path}: no schema.json in this directory")


def read_functions(path: Path) -> list[Function]:
    """The functions of one SGD schema or tools JSON file (told apart by their entries)."""
    path = schema_file(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list (SGD services or OpenAI tools)")
    if data and isinstance(data[0], dict) and "service_name" in data[0]:
        return functions_from_sgd(data, path)
    return functions_from_tools(data, path)


def same_function(a: Function, b: Function) -> bool:
    """Equal but for the order of parameters, which a JSON Schema object does not fix (SGD's train
    and dev schemas list the optional slots of `Events_1__FindEvents` in different orders)."""
    return (a.name, a.description) == (b.name, b.description) and sorted(a.parameters, key=_by_name) == sorted(
        b.parameters, key=_by_name)


def _by_name(parameter: Parameter) -> str:
    return parameter.name


def load_functions(paths: Iterable[Path]) -> list[Function]:
    """The functions of several schema files, in first-seen order. A function in several files
    (SGD's train and dev share services) is kept once when the same and refused when not."""
    seen: dict[str, tuple[Function, Path]] = {}
    for path in paths:
        for function in read_functions(path):
            earlier = seen.get(function.name)
            if earlier is None:
                seen[function.name] = (function, path)
            elif not same_function(earlier[0], function):
                raise DataError(f"function {function.name!r} differs between {earlier[1]} and {path}: "
                                "a name must mean one function")
    return [function for function, _ in seen.values()]
