"""MemBart: a BART whose encoder carries a fixed-size learned memory across turns and sessions.

After MemBart (qywu/memformers). The memory is `memory_len` slots of width `d_model`:

    start    m0 = LayerNorm(memory_bias)                  what a new dialogue starts from
    step     m  = LayerNorm(keep * memory + memory_bias)   keep = 0 for rows that reset, else 1
    encode   every encoder layer runs one joint attention over [memory; tokens], then each stream
             its own residual, layer norms and feed-forward
    write    a  = sigmoid(W2 gelu(W1 m_new))               one gate per slot, from the new slot alone
             memory' = a * m_new + (1 - a) * m             (m: the normalised memory the step began from)
    decode   the decoder cross-attends to [memory'; encoder token states]

The joint attention's layout (keys and queries are both [S memory slots; L tokens]):

                     memory keys (S)           token keys (L)
    memory queries   own slot only (diagonal)  every non-padded token
    token queries    every slot                every non-padded token

Memory slots do not read each other: each slot gathers from the turn's tokens on its own. The
memory stream has its own Q/K/V/out projections, layer norms and feed-forward; the token stream
keeps BART's (same parameter names, so a BART state dict loads as is). `from_bart` copies each
layer's token-stream weights into its memory stream, so a pretrained BART starts sensible.

The memory written by a step depends on the encoder pass alone (not on the labels), so `step` and
`generate_reply` on the same encoder input write the same memory. It stays differentiable with
respect to the memory passed in: truncated backpropagation through time is the caller's, who
detaches at window edges.

Nothing is registered with transformers' Auto classes: load with
`MemBartForConditionalGeneration.from_pretrained(directory)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration
from transformers import initialization as init
from transformers.configuration_utils import strict
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.models.bart.modeling_bart import (
    BartAttention,
    BartDecoder,
    BartEncoderLayer,
    BartLearnedPositionalEmbedding,
    BartPreTrainedModel,
    BartScaledWordEmbedding,
    eager_attention_forward,
    shift_tokens_right,
)

from dialogtune.memory.step import MemoryStep
from dialogtune.tokenize import IGNORE_INDEX

__all__ = ["MemBartConfig", "MemBartForConditionalGeneration", "MemBartModel", "MemoryStep", "joint_attention_bias"]


@strict
class MemBartConfig(BartConfig):
    r"""A BART configuration plus `memory_len`, the number of memory slots (each `d_model` wide)."""

    model_type = "membart"
    memory_len: int = 32


@dataclass
class MemBartEncoderOutput(BaseModelOutput):
    """`last_hidden_state` is [memory'; token states], [batch, memory_len + length, d_model];
    `memory` is memory' alone, the memory after this turn."""

    memory: torch.Tensor | None = None


@dataclass
class MemBartModelOutput(Seq2SeqModelOutput):
    memory: torch.Tensor | None = None


@dataclass
class MemBartSeq2SeqLMOutput(Seq2SeqLMOutput):
    memory: torch.Tensor | None = None


def joint_attention_bias(attention_mask: torch.Tensor, memory_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [batch, 1, S + L, S + L] of the joint attention over [memory; tokens]
    (0 where a query may look, the dtype's minimum where not): tokens see every slot, a slot
    sees itself only, and nobody sees padding (attention_mask 0)."""
    batch, length = attention_mask.shape
    total = memory_len + length
    sees_token = attention_mask.bool()[:, None, :].expand(batch, total, length)
    sees_slot = torch.ones(total, memory_len, dtype=torch.bool, device=attention_mask.device)
    sees_slot[:memory_len] = torch.eye(memory_len, dtype=torch.bool, device=attention_mask.device)
    allowed = torch.cat([sees_slot.expand(batch, -1, -1), sees_token], dim=-1)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def with_memory_visible(attention_mask: torch.Tensor | None, memory_len: int, encoded_length: int):
    """The decoder's mask over [memory; encoder tokens]: the slots are always visible. A mask that
    already covers the slots (as `generate_reply` passes it) is returned as it is."""
    if attention_mask is None or attention_mask.shape[1] == encoded_length:
        return attention_mask
    if attention_mask.shape[1] + memory_len != encoded_length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions; the encoder output has "
                         f"{encoded_length} ({memory_len} memory slots and the tokens)")
    slots = attention_mask.new_ones(attention_mask.shape[0], memory_len)
    return torch.cat([slots, attention_mask], dim=1)


def _split_heads(projection: nn.Linear, states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, n, d] -> [batch, heads, n, head_dim]"""
    return projection(states).view(*states.shape[:2], -1, head_dim).transpose(1, 2)


class MemoryWriteGate(nn.Module):
    """How much of each slot's new value to write: sigmoid(W2 gelu(W1 m_new)), one number per
    slot (as MemBart's UpdateGate), [batch, slots, 1]."""

    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.score = nn.Linear(width, 1)

    def forward(self, new_memory: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.score(F.gelu(self.dense(new_memory))))


class MemBartEncoderLayer(BartEncoderLayer):
    """A BART encoder layer (its token-stream modules keep their names) plus a memory stream:
    `memory_attn` (its Q/K/V/out projections), `memory_attn_layer_norm`, `memory_fc1`,
    `memory_fc2` and `memory_final_layer_norm`. One attention runs over both streams."""

    def __init__(self, config: MemBartConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.memory_attn = BartAttention(self.embed_dim, config.encoder_attention_heads,
                                         dropout=config.attention_dropout, config=config, layer_idx=layer_idx)
        self.memory_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.memory_fc1 = nn.Linear(self.embed_dim, config.encoder_ffn_dim)
        self.memory_fc2 = nn.Linear(config.encoder_ffn_dim, self.embed_dim)
        self.memory_final_layer_norm = nn.LayerNorm(self.embed_dim)

    def copy_token_weights_to_memory(self) -> None:
        """Start the memory stream as a copy of this layer's token stream."""
        pairs = [(self.self_attn, self.memory_attn), (self.self_attn_layer_norm, self.memory_attn_layer_norm),
                 (self.fc1, self.memory_fc1), (self.fc2, self.memory_fc2),
                 (self.final_layer_norm, self.memory_final_layer_norm)]
        for token_module, memory_module in pairs:
            memory_module.load_state_dict(token_module.state_dict())

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor,
                attention_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory_attended, token_attended = self._joint_attention(memory, hidden_states, attention_bias)
        hidden_states = self._residual_blocks(hidden_states, token_attended, self.self_attn_layer_norm,
                                              self.fc1, self.fc2, self.final_layer_norm)
        memory = self._residual_blocks(memory, memory_attended, self.memory_attn_layer_norm,
                                       self.memory_fc1, self.memory_fc2, self.memory_final_layer_norm)
        return hidden_states, memory

    def _joint_attention(self, memory: torch.Tensor, hidden_states: torch.Tensor,
                         attention_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each stream's queries, keys and values by its own projections, one softmax over the
        concatenated keys, each stream's output by its own out projection."""
        head_dim = self.self_attn.head_dim
        streams = [(self.memory_attn, memory), (self.self_attn, hidden_states)]
        query, key, value = (
            torch.cat([_split_heads(getattr(attn, name), states, head_dim) for attn, states in streams], dim=2)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        attended, _ = eager_attention_forward(
            self.self_attn, query, key, value, attention_bias, scaling=self.self_attn.scaling,
            dropout=self.self_attn.dropout if self.training else 0.0)
        attended = attended.reshape(*attended.shape[:2], -1)  # [batch, S + L, d]
        slots = memory.shape[1]
        return self.memory_attn.out_proj(attended[:, :slots]), self.self_attn.out_proj(attended[:, slots:])

    def _residual_blocks(self, states, attended, attn_layer_norm, fc1, fc2, final_layer_norm) -> torch.Tensor:
        """BART's post-norm residual around the attention, then around the feed-forward."""
        states = attn_layer_norm(states + F.dropout(attended, p=self.dropout, training=self.training))
        inner = F.dropout(self.activation_fn(fc1(states)), p=self.activation_dropout, training=self.training)
        states = final_layer_norm(states + F.dropout(fc2(inner), p=self.dropout, training=self.training))
        if states.dtype == torch.float16 and not torch.isfinite(states).all():
            clamp_value = torch.finfo(states.dtype).max - 1000
            states = torch.clamp(states, min=-clamp_value, max=clamp_value)
        return states


class MemBartPreTrainedModel(BartPreTrainedModel):
    config_class = MemBartConfig  # explicit: with postponed annotations `config: MemBartConfig` is a string
    _no_split_modules: ClassVar[list[str]] = [r"MemBartEncoderLayer", r"BartDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MemBartEncoder):
            init.normal_(module.memory_bias, mean=0.0, std=self.config.init_std)
        elif isinstance(module, MemBartForConditionalGeneration):
            init.zeros_(module.final_logits_bias)


class MemBartEncoder(MemBartPreTrainedModel):
    """BART's encoder (embeddings and layers) with the memory carried through every layer, and the
    memory's start (`memory_bias`, `memory_layer_norm`) and write (`memory_gate`)."""

    def __init__(self, config: MemBartConfig):
        super().__init__(config)
        self.dropout = config.dropout
        self.layerdrop = config.encoder_layerdrop
        embed_scale = config.d_model**0.5 if config.scale_embedding else 1.0
        self.embed_tokens = BartScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id,
                                                    embed_scale=embed_scale)
        self.embed_positions = BartLearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([MemBartEncoderLayer(config, layer_idx=i) for i in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.memory_bias = nn.Parameter(torch.empty(config.memory_len, config.d_model))
        self.memory_layer_norm = nn.LayerNorm(config.d_model)
        self.memory_gate = MemoryWriteGate(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """LayerNorm(memory_bias) for every row: the memory a reset row starts its step from."""
        return self.memory_layer_norm(self.memory_bias).expand(batch_size, -1, -1).contiguous()

    def start_memory(self, memory: torch.Tensor | None, reset: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The memory a step begins from: LayerNorm(keep * memory + memory_bias), keep 0 for rows
        that reset (all of them when `memory` is None). A reset row's old memory is replaced by
        zeros, not multiplied by them, so even a non-finite memory cannot leak into it."""
        if memory is None:
            kept = self.memory_bias.new_zeros(batch_size, *self.memory_bias.shape)
        elif reset is None:
            kept = memory
        else:
            kept = memory.masked_fill(reset.to(device=memory.device, dtype=torch.bool)[:, None, None], 0.0)
        return self.memory_layer_norm(kept + self.memory_bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, reset: torch.Tensor | None = None, **kwargs) -> MemBartEncoderOutput:
        """Encode one turn from `memory` (None: every row starts fresh). Attentions and hidden
        states per layer are not recorded (`kwargs` such as output_attentions are ignored)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = self.embed_tokens(input_ids)
        hidden_states = self.layernorm_embedding(tokens + self.embed_positions(input_ids).to(tokens.device))
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        old_memory = self.start_memory(memory, reset, input_ids.shape[0])
        attention_bias = joint_attention_bias(attention_mask, self.config.memory_len, hidden_states.dtype)
        new_memory = old_memory
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue  # LayerDrop skips the whole layer, both streams
            hidden_states, new_memory = layer(hidden_states, new_memory, attention_bias)
        gate = self.memory_gate(new_memory)
        memory = gate * new_memory + (1 - gate) * old_memory
        return MemBartEncoderOutput(last_hidden_state=torch.cat([memory, hidden_states], dim=1), memory=memory)


class MemBartModel(MemBartPreTrainedModel):
    """BartModel with the memory encoder: the decoder cross-attends to [memory'; token states]."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {
        "decoder.embed_tokens.weight": "shared.weight",
        "encoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: MemBartConfig):
        super().__init__(config)
        embed_scale = config.d_model**0.5 if config.scale_embedding else 1.0
        self.shared = BartScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id,
                                              embed_scale=embed_scale)
        self.encoder = MemBartEncoder(config)
        self.decoder = BartDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value
        self.encoder.embed_tokens = self.shared
        self.decoder.embed_tokens = self.shared

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, use_cache=None, memory=None, reset=None,
                **kwargs) -> MemBartModelOutput:
        """BartModel's forward from `memory`/`reset` (see `MemBartEncoder.start_memory`).
        `attention_mask` covers the tokens, or [memory; tokens] when `encoder_outputs` are given."""
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask, memory=memory, reset=reset)
        encoded = encoder_outputs[0]
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoded,
            encoder_attention_mask=with_memory_visible(attention_mask, self.config.memory_len, encoded.shape[1]),
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return MemBartModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoded,
            memory=getattr(encoder_outputs, "memory", None),
        )


class MemBartForConditionalGeneration(MemBartPreTrainedModel, GenerationMixin):
    """MemBart with BART's LM head, and the memory-model contract the recurrent trainer, chat and
    serve use: `memory_slots`, `hidden_size`, `initial_memory`, `step`, `write_memory`,
    `generate_reply`. Plain `generate(input_ids, memory=..., reset=...)` works too."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.shared.weight"}
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = ["final_logits_bias"]

    def __init__(self, config: MemBartConfig):
        super().__init__(config)
        self.model = MemBartModel(config)
        self.final_logits_bias = nn.Buffer(torch.zeros((1, self.model.shared.num_embeddings)))
        self.lm_head = nn.Linear(config.d_model, self.model.shared.num_embeddings, bias=False)
        self.post_init()

    @classmethod
    def from_bart(cls, bart: BartForConditionalGeneration, memory_len: int) -> MemBartForConditionalGeneration:
        """A MemBart holding `bart`'s weights (same names), each encoder layer's memory stream a
        copy of its token stream; the memory's start and gate are freshly initialised."""
        settings = {k: v for k, v in bart.config.to_dict().items() if k not in ("model_type", "architectures")}
        config = MemBartConfig.from_dict({**settings, "memory_len": memory_len})
        config._attn_implementation = bart.config._attn_implementation
        model = cls(config)
        missing, unexpected = model.load_state_dict(bart.state_dict(), strict=False)
        new_names = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(bart.state_dict())
        if unexpected or set(missing) != new_names:
            raise ValueError(f"not a BART state dict: unexpected {unexpected}, missing {sorted(set(missing) - new_names)}")
        for layer in model.model.encoder.layers:
            layer.copy_token_weights_to_memory()
        model.generation_config = copy.deepcopy(bart.generation_config)
        return model.to(device=bart.device, dtype=bart.dtype)

    # -- the memory-model contract ---------------------------------------------------
    @property
    def memory_slots(self) -> int:
        return self.config.memory_len

    @property
    def hidden_size(self) -> int:
        return self.config.d_model

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """[batch, slots, d_model]: what a reset row starts from, LayerNorm(memory_bias). To start
        a dialogue pass `memory=None` or `reset=True`: this is the memory the encoder then reads,
        not a value to pass back as `memory` (each step normalises `memory + memory_bias` again)."""
        return self.model.encoder.initial_memory(batch_size)

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
             memory: torch.Tensor | None, reset: torch.Tensor | None = None,
             return_logits: bool = True, per_row: bool = False) -> MemoryStep:
        """One turn for every row. `input_ids`/`attention_mask` [batch, length] are the encoder's
        input (right-padded); `labels` [batch, target] the decoder's targets (-100: not trained),
        whose shift right (-100 read as padding) is the decoder's input. Returns the summed
        float32 cross-entropy and the count of trained tokens (per row, [batch], with `per_row`),
        the logits [batch, target, vocab] (unless `return_logits` is False) and the memory after
        the turn, which depends on the encoder's input alone."""
        if labels is None:
            labels = input_ids.new_full((input_ids.shape[0], 1), IGNORE_INDEX)
        decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        outputs = self(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       memory=memory, reset=reset, use_cache=False)
        keep = labels != IGNORE_INDEX
        # float32 at least (half-precision logits are summed in float32), float64 for a float64 model
        loss_dtype = torch.promote_types(outputs.logits.dtype, torch.float32)
        if per_row:
            losses = F.cross_entropy(outputs.logits.to(loss_dtype).transpose(1, 2), labels, reduction="none")
            loss_sum, count = (losses * keep).sum(1), keep.sum(1)
        else:
            loss_sum = F.cross_entropy(outputs.logits[keep].to(loss_dtype), labels[keep], reduction="sum")
            count = keep.sum()
        return MemoryStep(loss_sum=loss_sum, count=count, logits=outputs.logits if return_logits else None,
                          memory=outputs.memory)

    def write_memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor | None,
                     reset: torch.Tensor | None = None) -> torch.Tensor:
        """The memory after reading a turn: the encoder alone, no decoder."""
        return self.model.encoder(input_ids, attention_mask, memory=memory, reset=reset).memory

    @torch.no_grad()
    def generate_reply(self, input_ids: torch.Tensor, memory: torch.Tensor | None, reset: torch.Tensor | None = None,
                       **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode `input_ids` ([batch, length], with an `attention_mask` keyword when padded) from
        `memory` once, then decode with `generate`. Returns the generated ids without the decoder
        start token, [batch, new], and the memory after the turn (as `step` writes it)."""
        attention_mask = generate_kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder_outputs = self.model.encoder(input_ids, attention_mask, memory=memory, reset=reset)
        new_memory = encoder_outputs.memory  # generate may expand encoder_outputs in place (beams)
        decoder_mask = with_memory_visible(attention_mask, self.config.memory_len, encoder_outputs[0].shape[1])
        generated = self.generate(encoder_outputs=encoder_outputs, attention_mask=decoder_mask, **generate_kwargs)
        sequences = generated if isinstance(generated, torch.Tensor) else generated.sequences
        return sequences[:, 1:], new_memory

    # -- transformers' model interface -----------------------------------------------
    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, labels=None, use_cache=None, memory=None, reset=None,
                **kwargs) -> MemBartSeq2SeqLMOutput:
        """BartForConditionalGeneration's forward, from `memory`/`reset`; `loss` is the mean
        cross-entropy over the labels, `memory` the memory after the turn."""
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                       self.config.decoder_start_token_id)
        outputs = self.model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                             decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                             cache=cache, use_cache=use_cache, memory=memory, reset=reset, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state) + self.final_logits_bias.to(outputs.last_hidden_state.device)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1).to(logits.device),
                                   ignore_index=IGNORE_INDEX)
        return MemBartSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            memory=outputs.memory,
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
