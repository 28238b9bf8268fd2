"""A fixed-size memory for any decoder-only model (recurrent-memory-transformer style).

Each step (one turn of a dialogue) runs the causal LM on

    [ memory (S slots, read) ; the turn's tokens ; memory + write positions (S slots) ] ; padding

as input embeddings. The tokens see the memory they start from; the S write slots at the end see
everything before them, and their last hidden states become the new memory through a gated
write: `candidate = W(rms_normalise(h))`, `a = sigmoid(G[candidate; old])`,
`memory = a * candidate + (1 - a) * old`. The memory is carried to the next turn, across
sessions, and reset to the learned initial memory when a new dialogue starts.

What keeps a pretrained model sensible from the first step: the initial memory is S rows of the
model's own token embeddings, the write projection starts as the identity scaled to the size of
those embeddings (so a written slot looks like an input embedding), and the gate starts half open.
The base model may be PEFT-wrapped (LoRA); the memory parameters are always trained in full.

Padding is on the right and the write slots sit right after each row's own tokens, so a row's
outputs do not depend on what else is in the batch. `slots: 0` is the same model without memory:
the baseline the memory is measured against, trained and evaluated by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dialogtune.loss import LinearCrossEntropy, _fusable_head, core_model
from dialogtune.memory.step import MemoryStep
from dialogtune.tokenize import IGNORE_INDEX

MEMORY_WEIGHTS = "memory.safetensors"
MEMORY_CONFIG = "memory.json"
KIND = "causal"


# What the initial memory reads as, given a tokenizer: words a pretrained model reads as a
# harmless preamble, where S random token embeddings are noise. Measured on SmolLM2, 3 MSC
# validation episodes, untrained: first-session perplexity 65 with random rows, 34 with these
# words (the gate nearly closed); what the first writes do to it is training's to learn.
PRIMER = "The two people in this chat have talked before. Notes from earlier conversations follow.\n"


class CausalMemoryModel(torch.nn.Module):
    def __init__(self, base, slots: int, primer_ids: list[int] | None = None, seed: int = 0):
        """`primer_ids`: the tokens whose embeddings the initial memory starts as (cycled to fill
        the slots; the tokens of PRIMER in training); None draws random rows of the vocabulary."""
        super().__init__()
        self.base = base
        core = core_model(base)
        width = core.config.hidden_size
        embeddings = core.get_input_embeddings().weight.detach().float()
        scale = embeddings.pow(2).mean().sqrt()
        if primer_ids:
            rows = torch.tensor([primer_ids[i % len(primer_ids)] for i in range(slots)], dtype=torch.long)
        else:
            rows = torch.randint(len(embeddings), (slots,), generator=torch.Generator().manual_seed(seed))
        self.memory_init = torch.nn.Parameter(embeddings[rows].clone())
        self.write_position = torch.nn.Parameter(torch.zeros(slots, width))
        self.write_proj = torch.nn.Linear(width, width)
        self.write_gate = torch.nn.Linear(2 * width, width)
        with torch.no_grad():
            self.write_proj.weight.copy_(torch.eye(width) * scale)
            self.write_proj.bias.zero_()
            torch.nn.init.normal_(self.write_gate.weight, std=0.02)
            self.write_gate.bias.zero_()
        self.slots = slots
        dtype = core.get_input_embeddings().weight.dtype
        for name, module in self.named_children():
            if name != "base":
                module.to(device=core.device, dtype=dtype)
        for parameter in (self.memory_init, self.write_position):
            parameter.data = parameter.data.to(device=core.device, dtype=dtype)

    # The contract every memory model keeps (the trainer, chat and serve use only these).
    @property
    def memory_slots(self) -> int:
        return self.slots

    @property
    def hidden_size(self) -> int:
        return core_model(self.base).config.hidden_size

    @property
    def config(self):
        return core_model(self.base).config

    def memory_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("base.")}

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        return self.memory_init.unsqueeze(0).expand(batch_size, -1, -1)

    def _start(self, memory: torch.Tensor | None, reset: torch.Tensor | None, batch: int) -> torch.Tensor:
        if memory is None:
            return self.initial_memory(batch)
        if reset is not None and bool(reset.any()):
            return torch.where(reset.to(memory.device)[:, None, None], self.initial_memory(batch), memory)
        return memory

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
             memory: torch.Tensor | None, reset: torch.Tensor | None = None,
             return_logits: bool = False, per_row: bool = False) -> MemoryStep:
        """One turn for every row: the loss over `labels` (-100 = not trained; aligned with
        `input_ids`, the first token predicted from the memory), and the memory after it.
        `logits[:, t]` (with `return_logits`) is the prediction after token t, as in transformers.
        With `per_row`, loss_sum and count are per row ([batch]) instead of totals."""
        memory = self._start(memory, reset, input_ids.shape[0])
        hidden, written = self._run(input_ids, attention_mask, memory)
        new_memory = self._write(written, memory) if self.slots else memory
        core = core_model(self.base)
        loss_sum = torch.zeros((), device=hidden.device)
        count = torch.zeros((), dtype=torch.long, device=hidden.device)
        if labels is not None:
            labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
            # Hidden state i predicts token i + 1; the last read slot predicts the first token.
            predicting = hidden[:, self.slots - 1 : self.slots - 1 + labels.shape[1]] if self.slots else hidden[:, :-1]
            targets = labels if self.slots else labels[:, 1:]
            keep = targets != IGNORE_INDEX
            count = keep.sum()
            if per_row:  # each row's sum: the head only where a token is trained, summed back per row
                logits = core.get_output_embeddings()(predicting[keep]).float()
                losses = F.cross_entropy(logits, targets[keep], reduction="none")
                rows = keep.nonzero()[:, 0]
                loss_sum = torch.zeros(keep.shape[0], device=losses.device).index_add(0, rows, losses)
                count = keep.sum(1)
            elif bool(keep.any()):
                weight = _fusable_head(core)
                if weight is None:
                    logits = core.get_output_embeddings()(predicting[keep]).float()
                    loss_sum = F.cross_entropy(logits, targets[keep], reduction="sum")
                else:
                    loss_sum = LinearCrossEntropy.apply(predicting[keep], weight, targets[keep])
        logits = None
        if return_logits:
            tokens = hidden[:, self.slots : self.slots + input_ids.shape[1]]
            logits = core.get_output_embeddings()(tokens).float()
        return MemoryStep(loss_sum=loss_sum, count=count, logits=logits, memory=new_memory)

    def write_memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor | None,
                     reset: torch.Tensor | None = None) -> torch.Tensor:
        """The memory after reading a turn, without the loss (chat's turns by the user)."""
        return self.step(input_ids, attention_mask, None, memory, reset).memory

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor):
        """The backbone's last hidden states over [memory; tokens; write slots], and those of
        the write slots."""
        core = core_model(self.base)
        backbone = getattr(core, core.base_model_prefix)
        batch, length = input_ids.shape
        tokens = core.get_input_embeddings()(input_ids)
        lengths = attention_mask.sum(1)
        if not self.slots:
            hidden = backbone(inputs_embeds=tokens, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return hidden, None
        memory = memory.to(tokens.dtype)
        sequence = torch.cat([memory, tokens, tokens.new_zeros(batch, self.slots, tokens.shape[-1])], 1)
        # Each row's write slots go right after its own tokens (over its padding).
        at = (self.slots + lengths)[:, None] + torch.arange(self.slots, device=input_ids.device)[None]
        index = at[:, :, None].expand(-1, -1, tokens.shape[-1])
        sequence = sequence.scatter(1, index, memory + self.write_position.to(tokens.dtype))
        total = length + 2 * self.slots
        mask = (torch.arange(total, device=input_ids.device)[None] < (2 * self.slots + lengths)[:, None]).long()
        positions = torch.arange(total, device=input_ids.device)[None].expand(batch, -1)
        hidden = backbone(inputs_embeds=sequence, attention_mask=mask, position_ids=positions,
                          use_cache=False).last_hidden_state
        return hidden, hidden.gather(1, index)

    def _write(self, written: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """The gated write, its result in float32: under bf16 autocast a memory rounded at every
        turn would drift over a dialogue's 50 turns, and chat and serve carry it in float32."""
        normalised = written.float() * torch.rsqrt(written.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        candidate = self.write_proj(normalised.to(self.write_proj.weight.dtype)).float()
        old = old.float()
        gate = torch.sigmoid(self.write_gate(torch.cat([candidate, old], -1).to(self.write_gate.weight.dtype)).float())
        return gate * candidate + (1 - gate) * old

    @torch.no_grad()
    def generate_reply(self, input_ids: torch.Tensor, memory: torch.Tensor | None, reset: torch.Tensor | None = None,
                       **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue `input_ids` (one row, the turn so far: window and speaker prefix) from the
        memory; return the new tokens and the memory after reading the turn with its reply."""
        if input_ids.shape[0] != 1:
            raise ValueError("generate_reply takes one conversation at a time")
        memory = self._start(memory, reset, 1)
        core = core_model(self.base)
        tokens = core.get_input_embeddings()(input_ids)
        prompt = torch.cat([memory.to(tokens.dtype), tokens], 1) if self.slots else tokens
        mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=input_ids.device)
        # Given inputs_embeds, a decoder-only model's generate returns the new tokens alone.
        reply = self.base.generate(inputs_embeds=prompt, attention_mask=mask, **generate_kwargs)
        whole = torch.cat([input_ids, reply], 1)
        new_memory = self.write_memory(whole, torch.ones_like(whole), memory) if self.slots else memory
        return reply, new_memory

    # -- files ------------------------------------------------------------------------
    def save_pretrained(self, directory: Path) -> None:
        """The base (a LoRA adapter, or the full model) as transformers/PEFT save it, plus the
        memory parameters and memory.json."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.base.save_pretrained(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.memory_parameters().items()},
                  str(directory / MEMORY_WEIGHTS))
        (directory / MEMORY_CONFIG).write_text(json.dumps({"kind": KIND, "slots": self.slots}) + "\n")

    def load_memory_parameters(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(directory) / MEMORY_WEIGHTS))
        missing = set(self.memory_parameters()) - set(state)
        if missing:
            raise ValueError(f"{directory / MEMORY_WEIGHTS}: lacks {', '.join(sorted(missing))}")
        with torch.no_grad():
            for name, parameter in self.memory_parameters().items():
                parameter.copy_(state[name])
