"""Talking to a memory run: one conversation's memory and recent turns, saved between sessions.

Each turn is one step of the model, built exactly as training built it (`TurnInputs`): the last
`window` tokens of the conversation, the turn's prefix (a session line where a session starts,
then "Name:"), and its text. A user's turn is read (the memory is written from it); the model's
turn is generated from the memory and then read the same way, so the cost of a turn does not
grow with the conversation.

`save(path)` writes the memory and the turns the window still needs to one safetensors file
(memory as a tensor; turns, session and the run it belongs to as metadata), and `load` takes it
back, refusing a file written by another run: a memory only means something to the model that
wrote it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dialogtune.errors import RunError
from dialogtune.files import staged_file
from dialogtune.infer import decode_by_sampling_only
from dialogtune.memory.inputs import TurnInputs
from dialogtune.records import RunInfo, find_run_info
from dialogtune.tasks.memory import TURN_END, one_line, session_line

STATE_FORMAT = "dialogtune-memory/1"


@dataclass
class MemoryRun:
    """A loaded memory run: model, tokenizer, how turns are built, and who the speakers were."""

    model: Any
    tokenizer: Any
    inputs: TurnInputs
    speakers: list[str]  # as in the training data, most frequent first
    identity: str  # a digest of the memory weights: states are only valid for this run
    location: str
    trained_as: list[str] = field(default_factory=list)  # task.as of training; empty: every speaker
    reset_each_session: bool = False  # memory.reset: session (the memory starts afresh with each session)

    @property
    def person_and_model(self) -> tuple[str, str]:
        """Who a person talking to the model speaks as and who the model speaks as: chat's and
        serve's defaults. The model is a speaker it was trained as (the first of task.as, else the
        data's second speaker); the person is the data's first other speaker."""
        model = self.trained_as[0] if self.trained_as else (self.speakers[1] if len(self.speakers) > 1 else "B")
        person = next((s for s in self.speakers if s != model), "A")
        return person, model


def is_memory_run(location: str | Path) -> bool:
    """Whether `location` is a run (or its final/) trained with `task: memory`."""
    final = find_run_info(Path(location)) if Path(location).exists() else None
    return final is not None and RunInfo.load(final).memory is not None


def load_memory_run(location: str | Path) -> MemoryRun:
    """A run directory (or its final/) trained with `task: memory`."""
    from dialogtune.models import load_tokenizer

    final = Path(location)
    if (final / "final").is_dir():
        final = final / "final"
    info = RunInfo.load(final)
    if not info.memory:
        raise RunError(f"{final}: not a memory run (task {info.task}); load it as a chat model (chat --memory FILE"
                       " keeps its conversation, summarised), or train a run with task: memory")
    settings = info.memory
    if settings["kind"] == "bart":
        from dialogtune.memory.bart import MemBartForConditionalGeneration

        model = MemBartForConditionalGeneration.from_pretrained(str(final))
        weights = final / "model.safetensors"
    else:
        model = _load_causal(final, info, settings["slots"])
        weights = final / "memory.safetensors"
    decode_by_sampling_only(model.base if settings["kind"] == "causal" else model)  # Sampling alone decides
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    tokenizer = load_tokenizer(str(final))
    encoder_decoder = settings["kind"] == "bart"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    inputs = TurnInputs(window=settings["window"], encoder_decoder=encoder_decoder, pad_token_id=pad,
                        bos_token_id=tokenizer.bos_token_id if encoder_decoder else None,
                        eos_token_id=tokenizer.eos_token_id if encoder_decoder else None)
    digest = "unknown"
    if weights.exists():  # streamed: a MemBart's weights are hundreds of MB
        with open(weights, "rb") as fh:
            digest = hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=12)).hexdigest()
    return MemoryRun(model, tokenizer, inputs, list(settings.get("speakers") or ["A", "B"]), digest, str(final),
                     trained_as=list(settings.get("as") or []),
                     reset_each_session=settings.get("reset") == "session")


def _load_causal(final: Path, info: RunInfo, slots: int):
    from transformers import AutoModelForCausalLM

    from dialogtune.memory.causal import CausalMemoryModel
    from dialogtune.models import quiet_peft

    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(info.base_model_path, dtype=torch.float32)
        with quiet_peft():
            base = PeftModel.from_pretrained(base, str(final))
    else:
        base = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    model = CausalMemoryModel(base, slots)
    model.load_memory_parameters(final)
    return model


@dataclass
class MemoryConversation:
    run: MemoryRun
    memory: torch.Tensor | None = None  # None: the learned initial memory (nothing read yet)
    turns: list[dict[str, list[int]]] = field(default_factory=list)  # recent {prefix_ids, text_ids}
    session: int = 1
    turns_read: int = 0
    notes: dict[str, Any] = field(default_factory=dict)  # what a caller keeps with the memory (JSON), saved with it
    _session_starts: bool = False  # the next turn opens a new session
    _gap: str | None = None

    def new_session(self, time_gap: str | None = None) -> None:
        """The next turn opens the next session (after `time_gap`, e.g. "2 days", if known)."""
        if not self.turns_read:
            return
        if not self._session_starts:  # asked twice before a turn: still one session, never an empty one
            self.session += 1
        self._session_starts, self._gap = True, time_gap

    def _prefix(self, speaker: str) -> tuple[list[int], bool]:
        """The next turn's prefix tokens (a session line where a session opens, then "Name:"), and
        whether it opens a session."""
        opens = self._session_starts
        text = (session_line(self.session, self._gap) if opens else "") + f"{speaker}:"
        self._session_starts, self._gap = False, None
        return self.run.tokenizer(text, add_special_tokens=False).input_ids, opens

    def _open(self, opens_session: bool) -> None:
        if opens_session and self.run.reset_each_session:
            self.memory = None  # trained so (memory.reset: session): each session starts from the initial memory

    def _dialogue(self, prefix: list[int], text: list[int]) -> dict[str, list]:
        turns = [*self.turns, {"prefix_ids": prefix, "text_ids": text}]
        return {"prefix_ids": [t["prefix_ids"] for t in turns], "text_ids": [t["text_ids"] for t in turns],
                "trained": [False] * len(turns)}

    def _keep(self, prefix: list[int], text: list[int]) -> None:
        """Remember the turn, and forget turns the window can no longer reach."""
        self.turns.append({"prefix_ids": prefix, "text_ids": text})
        self.turns_read += 1
        kept, tokens = [], 0
        for turn in reversed(self.turns):
            if tokens >= self.run.inputs.window:
                break
            kept.insert(0, turn)
            tokens += len(turn["prefix_ids"]) + len(turn["text_ids"])
        self.turns = kept

    def _device(self) -> torch.device:
        return next(self.run.model.parameters()).device

    def read(self, speaker: str, text: str) -> None:
        """Someone else's turn: written into the memory."""
        prefix, opens = self._prefix(speaker)
        ids = self.run.tokenizer(f" {one_line(text)}{TURN_END}", add_special_tokens=False).input_ids
        self.read_tokens(prefix, ids, opens_session=opens)

    @torch.no_grad()
    def read_tokens(self, prefix: list[int], ids: list[int], opens_session: bool = False) -> None:
        """A turn given as the token pieces training reads (a prepared row's prefix and text)."""
        self._open(opens_session)
        dialogue = self._dialogue(prefix, ids)
        row = self.run.inputs.batch([self.run.inputs.row(dialogue, len(dialogue["trained"]) - 1)], self._device())
        self.memory = self.run.model.write_memory(row["input_ids"], row["attention_mask"], self.memory)
        self._keep(prefix, ids)

    def reply(self, speaker: str, **generate_kwargs) -> str:
        """The model's turn as `speaker`: generated from the memory and the window, then read."""
        prefix, opens = self._prefix(speaker)
        return self.reply_after(prefix, opens_session=opens, **generate_kwargs)

    @torch.no_grad()
    def reply_after(self, prefix: list[int], opens_session: bool = False, **generate_kwargs) -> str:
        """The model's turn after a prefix given as tokens (who speaks; a session line)."""
        self._open(opens_session)
        inputs = self.run.inputs
        history = inputs.history(self._dialogue(prefix, []), len(self.turns))
        device = self._device()
        end = self.run.tokenizer(TURN_END, add_special_tokens=False).input_ids
        generate_kwargs.setdefault("max_new_tokens", 64)
        if inputs.encoder_decoder:
            source, _ = inputs.row(self._dialogue(prefix, []), len(self.turns))
            reply, memory = self.run.model.generate_reply(torch.tensor([source], device=device), self.memory,
                                                          **generate_kwargs)
            ids = [i for i in reply[0].tolist() if i not in (inputs.eos_token_id, inputs.pad_token_id)]
        else:
            generate_kwargs.setdefault("stop_strings", [TURN_END])
            generate_kwargs.setdefault("tokenizer", self.run.tokenizer)
            prompt = torch.tensor([history + prefix], device=device)
            reply, memory = self.run.model.generate_reply(prompt, self.memory, **generate_kwargs)
            ids = reply[0].tolist()
            eos = self.run.tokenizer.eos_token_id
            ids = ids[: ids.index(eos)] if eos in ids else ids
        text = self.run.tokenizer.decode(ids, skip_special_tokens=True).split(TURN_END)[0].strip()
        if inputs.encoder_decoder or ids[-len(end):] != end:
            # What the memory keeps of the turn is what training would have read: " text" + TURN_END.
            ids = self.run.tokenizer(f" {text}{TURN_END}", add_special_tokens=False).input_ids
            if not inputs.encoder_decoder:
                dialogue = self._dialogue(prefix, ids)
                row = inputs.batch([inputs.row(dialogue, len(dialogue["trained"]) - 1)], device)
                memory = self.run.model.write_memory(row["input_ids"], row["attention_mask"], self.memory)
        self.memory = memory
        self._keep(prefix, ids)
        return text

    # -- files ------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        # Nothing read yet is saved as such, not as the initial memory: MemBart normalises the
        # memory it is given, so its initial memory passed back in is not the same as a fresh start.
        fresh = self.memory is None
        memory = self.run.model.initial_memory(1) if fresh else self.memory
        metadata = {"format": STATE_FORMAT, "run": self.run.identity, "session": str(self.session),
                    "fresh": json.dumps(fresh),
                    "turns_read": str(self.turns_read), "turns": json.dumps(self.turns),
                    "session_starts": json.dumps([self._session_starts, self._gap]), "notes": json.dumps(self.notes)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as tmp:  # a kill mid-write leaves the previous state whole
            save_file({"memory": memory.detach().float().cpu().contiguous()}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, run: MemoryRun, path: Path) -> MemoryConversation:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                memory = fh.get_tensor("memory")
        except Exception as err:  # noqa: BLE001 - safetensors raises several kinds for a bad file
            raise RunError(f"{path}: not a dialogtune memory file ({err})") from None
        if metadata.get("format") != STATE_FORMAT:
            raise RunError(f"{path}: not a dialogtune memory file (format {metadata.get('format')!r})")
        if metadata.get("run") != run.identity:
            raise RunError(f"{path}: this memory was written by another model ({metadata.get('run')}), not"
                           f" {run.location} ({run.identity}); a memory only means something to the model that"
                           " wrote it. Start afresh with another file (chat: --memory FILE; serve: --memory-dir DIR)")
        model = run.model
        dtype = next(model.parameters()).dtype
        if json.loads(metadata.get("fresh", "false")):
            memory = None
        else:
            memory = memory.to(device=next(model.parameters()).device, dtype=dtype)
        conversation = cls(run, memory,
                           json.loads(metadata["turns"]), int(metadata["session"]), int(metadata["turns_read"]))
        conversation._session_starts, conversation._gap = json.loads(metadata["session_starts"])
        conversation.notes = json.loads(metadata.get("notes", "{}"))
        return conversation
