"""The job config: one YAML file, one section per module, validated with messages that name
the key, the bad value and what would be valid."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dialogtune.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Columns(Strict):
    speaker: str | None = None
    text: str | None = None
    episode: str | None = None
    season: str | None = None  # with an episode column: S1E1 and S2E1 are different dialogues


class DataConfig(Strict):
    path: list[str]  # files or directories, read in order
    format: str = "auto"
    columns: Columns = Columns()  # script_csv: which columns hold speaker, text, episode
    speakers: list[str] | None = None  # transcript: only these names start a turn
    actions: Literal["keep", "drop"] = "keep"  # transcript: keep or remove (parenthesised actions)
    sample: float | None = Field(default=None, gt=0.0, le=1.0)  # keep this share of dialogues (by a hash of the id)

    @field_validator("path", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Rounds(Strict):
    rounds: int = Field(ge=0)


class TaskConfig(Strict):
    name: Literal["respond", "summarize", "understand", "memory"] = "respond"
    speakers_as: list[str] | None = Field(default=None, alias="as")  # respond, memory: who the model speaks as
    context: Literal["full"] | Rounds = "full"  # respond: whole dialogues, or N previous turns
    system_prompt: str | None = None

    @field_validator("context", mode="before")
    @classmethod
    def _full_or_rounds(cls, value: Any) -> Any:
        # One clear message instead of one per member of the union.
        if value == "full":
            return value
        if isinstance(value, dict) and set(value) == {"rounds"} and isinstance(value["rounds"], int) \
                and not isinstance(value["rounds"], bool) and value["rounds"] >= 0:
            return value
        raise ValueError(f'expected "full" or {{rounds: N}} with a whole number N >= 0, got {value!r}')

    @field_validator("system_prompt")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value.strip() if value else value
    persona: bool = False  # respond: add the speaker's persona lines (PersonaChat) to the system prompt
    tool_calls: bool = False  # respond, SGD: each service call (trained), its results (never trained), the reply
    instruction: str = "Summarize the following dialogue:"  # summarize
    index: str | None = None  # understand: the retrieval index (`dialogtune index`) candidates come from
    candidates: int = Field(default=8, ge=1)  # understand: functions offered in the prompt, best first
    exemplars: int = Field(default=2, ge=0)  # understand: example utterances shown per candidate
    dialogue_services: bool = False  # understand: offer only the functions of the dialogue's services (SGD names them)

    @field_validator("speakers_as", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class SplitConfig(Strict):
    validation: float = Field(default=0.1, ge=0.0, lt=1.0)  # share of dialogues (or scenes/episodes)
    seed: int = 0


class ModelConfig(Strict):
    name: str = "smollm2-135m-instruct"  # hub name, local path, or the embedded default


class TemplateConfig(Strict):
    name: str = "model"  # the tokenizer's own, or chatml, user_assistant, transcript, dialogpt, llama2, vicuna
    end_of_turn: str | None = None  # override the marker a trained turn ends with


class PrepareConfig(Strict):
    data: DataConfig
    task: TaskConfig = TaskConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    template: TemplateConfig = TemplateConfig()
    max_length: int = Field(default=1024, gt=8)
    pack: bool = False
    pack_buffer: int = Field(default=5_000, ge=1)  # examples packed together (best-fit-decreasing within each)
    num_proc: int = Field(default=1, ge=1)  # processes that tokenize; the result is the same for any number
    output: str = "prepared"
    strict: bool = False  # stop at the first bad record instead of counting it


class LoraConfig(Strict):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"  # module names, or all-linear


# What the trainer computes at each evaluation that checkpoints can be ranked by, and whether
# a greater value is better for each.
VALIDATION_METRICS = {"eval_loss": False, "eval_perplexity": False}


class EvalConfig(Strict):
    every: int | None = None  # evaluate every N optimizer steps; None = once per epoch
    keep_best: int = Field(default=2, ge=1)  # checkpoints kept by metric (the newest is always kept too)
    metric: str = "eval_loss"  # what keep_best ranks by: one of VALIDATION_METRICS
    greater_is_better: bool | None = None  # unset: the metric's own direction (lower loss/perplexity is better)
    report: bool = False  # at the end, run `dialogtune eval` on the validation split (generation metrics)
    limit: int | None = Field(default=None, ge=1)  # with report: evaluate only the first N validation samples

    @field_validator("metric")
    @classmethod
    def _computed_in_training(cls, value: str) -> str:
        if value not in VALIDATION_METRICS:
            raise ValueError(f"{value!r} is not computed when training evaluates; choose one of:"
                             f" {', '.join(VALIDATION_METRICS)}")
        return value

    @model_validator(mode="after")
    def _direction_of_the_metric(self) -> EvalConfig:
        if self.greater_is_better is None:
            self.greater_is_better = VALIDATION_METRICS[self.metric]
        return self


class MemoryConfig(Strict):
    """task: memory: the memory model and its recurrent training (dialogtune.train.recurrent)."""

    slots: int = Field(default=16, ge=0)  # memory slots; 0 = the same model without memory (a baseline)
    window: int = Field(default=128, ge=0)  # history tokens each turn's step reads besides the memory
    time_horizon: int = Field(default=4, ge=1)  # timesteps per truncated-BPTT window (one optimizer step)
    reset: Literal["dialogue", "session"] = "dialogue"  # when a stream's memory starts afresh


class DistributedConfig(Strict):
    """How the processes of `accelerate launch`/`torchrun` share the work (dialogtune.train.distributed);
    a run of one process ignores it."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"  # ddp: a whole replica per process; fsdp/deepspeed shard it
    zero_stage: Literal[2, 3] = 3  # deepspeed: 2 shards optimizer state and gradients, 3 the weights too
    activation_checkpointing: bool = False  # fsdp: recompute each decoder layer in backward (its own, no extra gather)
    cpu_offload: bool = False  # fsdp: sharded weights and optimizer on CPU; deepspeed: optimizer (and stage-3 weights)

    @model_validator(mode="after")
    def _keys_of_the_strategy(self) -> DistributedConfig:
        # A key another engine reads would be ignored without a word: refuse it instead. (Keys
        # at their defaults pass, so a resolved config from run.json validates again.)
        readers = {"zero_stage": ("deepspeed",), "activation_checkpointing": ("fsdp",),
                   "cpu_offload": ("fsdp", "deepspeed")}
        for key in sorted(self.changed_keys()):
            if self.strategy not in readers[key]:
                hint = "; for ddp and deepspeed set train.gradient_checkpointing" if key == "activation_checkpointing" else ""
                raise ValueError(f"{key} applies to strategy {' or '.join(readers[key])}, not {self.strategy}{hint}")
        return self

    def changed_keys(self) -> set[str]:
        """The engine keys set to something other than their defaults."""
        return {key for key in ("zero_stage", "activation_checkpointing", "cpu_offload")
                if getattr(self, key) != type(self).model_fields[key].default}


class StreamConfig(Strict):
    """`stream:`: train reads the prepared train split as a stream (dialogtune.train.shards)."""

    shuffle_buffer: int = Field(default=10_000, ge=1)  # rows shuffled together
    seed: int = 0  # the shuffle's seed; epoch e shuffles with seed + e


class TrainJobConfig(PrepareConfig):
    """A whole job: the prepare sections plus how to train. `train:` goes to
    transformers.TrainingArguments unchanged (learning_rate, num_train_epochs, max_steps, ...)."""

    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfig = LoraConfig()
    quantization_bits: Literal[4, 8] = 4  # qlora
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    train: dict[str, Any] = Field(default_factory=dict)
    eval: EvalConfig = EvalConfig()
    run_dir: str = "runs/run"
    resume: Literal["never", "auto"] = "never"  # auto: continue from the newest complete checkpoint
    max_bad_steps: int = Field(default=3, ge=1)  # non-finite steps in a row before the run stops
    samples: int = Field(default=2, ge=0)  # replies generated from validation prompts at the end
    memory: MemoryConfig = MemoryConfig()  # task: memory
    distributed: DistributedConfig = DistributedConfig()  # several processes: DDP, FSDP or DeepSpeed
    stream: StreamConfig | None = None  # stream the train split (`stream: true` for the defaults); unset: load it

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_switch(cls, value: Any) -> Any:
        return {} if value is True else None if value is False else value


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for key in loc:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(key)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def describe_errors(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for error in err.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(p) for p in loc)
        if error["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            known = _field_names(parent) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"{source}: unknown key {key!r}{hint} (known here: {', '.join(known)})")
        elif error["type"] == "missing":
            lines.append(f"{source}: missing required key {key!r}")
        elif error["type"] == "value_error":
            lines.append(f"{source}: {key}: {error['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: {key}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set a.b=value` pairs into a nested dict; values are read as YAML (numbers, lists...)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set task.as=Bob")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return tree


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections (data:, task:, ...)")
    # Relative data paths are relative to the config file, so configs can travel with their data.
    if isinstance(data.get("data"), dict) and "path" in data["data"]:
        data["data"]["path"] = relative_to(path, data["data"]["path"])
    if isinstance(data.get("task"), dict) and isinstance(data["task"].get("index"), str):  # an input, like data
        data["task"]["index"] = relative_to(path, data["task"]["index"])[0]
    return data


def relative_to(config_path: Path, paths: Any) -> Any:
    """Paths named in a config file, relative ones taken from the file's folder (a string or a list
    of them; anything else is left for validation to name)."""
    listed = [paths] if isinstance(paths, str) else paths
    if not isinstance(listed, list):
        return paths
    return [str(config_path.parent / p) if isinstance(p, str) and not Path(p).is_absolute() else p for p in listed]


def build_config(raw: dict[str, Any], source: str = "config", schema: type[PrepareConfig] = PrepareConfig):
    """Validate a job config. `prepare` reads only its sections, so it accepts (and ignores) the
    training ones: one YAML file describes the whole job."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        training_only = set(TrainJobConfig.model_fields) - set(PrepareConfig.model_fields)
        if schema is PrepareConfig and all(e["type"] == "extra_forbidden" and len(e["loc"]) == 1
                                           and e["loc"][0] in training_only for e in err.errors()):
            return PrepareConfig.model_validate({k: v for k, v in raw.items() if k in PrepareConfig.model_fields})
        raise ConfigError(describe_errors(err, schema, source)) from None


class EmbedderTrainConfig(Strict):
    """`dialogtune train-embedder`: fine-tune a sentence embedder for retrieval. `train:` goes to
    sentence-transformers' SentenceTransformerTrainingArguments unchanged (max_steps,
    num_train_epochs, per_device_train_batch_size, learning_rate, seed, ...)."""

    embedder: str = "minilm-l6-v2"  # the base model: embedded name, sentence-transformers name or directory
    schemas: list[str]  # SGD split directories, schema.json or tools JSON files
    exemplars: list[str]  # SGD split directories or dialogues files, or hand-written exemplar JSON/YAML
    pairs: list[Literal["template", "description"]] = Field(default=["template", "description"], min_length=1)
    validation: float = Field(default=0.1, ge=0.0, lt=1.0)  # share of dialogues held out
    seed: int = 0  # the validation split (and train.seed unless given)
    train: dict[str, Any] = Field(default_factory=dict)
    output: str = "embedder"  # the sentence-transformers model directory to write

    @field_validator("schemas", "exemplars", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("schemas", "exemplars")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("expected at least one path")
        return value

    @field_validator("pairs")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each kind of pair at most once, got {value!r}")
        return value


def check_passed_through(given: dict[str, Any], arguments_class: type, protected: dict[str, str],
                         command: str) -> None:
    """`train:` keys go to a transformers/sentence-transformers arguments dataclass as they are:
    refuse those the command sets itself (`protected`: key -> what to do instead) and those the
    class does not know (with "did you mean")."""
    for key in given:
        if key in protected:
            raise ConfigError(f"train.{key} is managed by {command}{protected[key]}")
    fields = {f.name for f in dataclasses.fields(arguments_class)}
    unknown = [k for k in given if k not in fields]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, fields, n=1)) else k
                 for k in unknown]
        raise ConfigError(f"train: unknown {arguments_class.__name__} key(s): {', '.join(hints)}")
