"""Rollout decoding at the machine's pace: a static KV cache, one compiled step, CUDA graphs on the GPU.

:func:`medgrpo.train.rollout.generate` with ``RolloutConfig(decode="static")`` decodes here. The
prompt is prefilled once into a :class:`~medgrpo.train.static_cache.StaticKVCache` (its keys and
values stored once per group, :class:`~medgrpo.train.static_cache.PrefillLayout`); then every step
is one call of :func:`decode_step`:

    embed the last token -> the decoder layers on the static cache (DecodeLayout, cache=None)
    -> the last position's logits -> sample (temperature, top-k, top-p, one pre-drawn uniform per
    row) -> pad finished rows, mark rows that hit EOS -> write the token, advance the step counter

with every input and output a device tensor: no host sync inside. The host loop reads the
all-finished flag every ``check_every`` steps only; the steps run past the last EOS hold padding
and are trimmed, so the output is the reference loop's.

**Compile and graphs.** With ``compile=True`` the step is ``torch.compile``\\ d (``fullgraph=True``)
on CPU and CUDA; on CUDA the compiled step is then captured once per shape as a
``torch.cuda.CUDAGraph`` and each step is one ``replay()``. A model sharded with FSDP2 decodes
eagerly (its layers gather their weights in forward hooks, which neither a graph nor a capture can hold).

**Shapes, and how many compiles.** A rollout's shape is bucketed (:func:`bucket`: 1, 2, 3, 4, 6, 8,
12, ..., each at most 1.5x the one before): prompts B, prompt length P (at least 16), new tokens T
(at least 16); the rows are B x G. B, B x G, P and T are dynamic sizes of the compiled step
(``maybe_mark_dynamic``), so new prompt lengths, group sizes and token budgets reuse the compiled
code. What compiles again: a new model object, new sampling settings (temperature, top-k, top-p and
the pad id are constants of the graph), and B = 1 (dynamo specializes sizes of 1). A training run
compiles once (tested with dynamo's counters). On CUDA each bucketed shape is captured once (a
capture replays the compiled code: no compile) and its buffers and graph are kept for the next
rollout of that shape, up to :data:`MAX_SHAPES` shapes per model (least recently used dropped first).
On the CPU nothing needs fixed addresses: buffers are allocated per rollout.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from medgrpo.train import qwen
from medgrpo.train.attention import layout_attention, layout_mask
from medgrpo.train.distributed import all_finished, is_sharded
from medgrpo.train.static_cache import DecodeLayout, PrefillLayout, StaticKVCache
from medgrpo.train.token_sampling import sample_tokens

if TYPE_CHECKING:
    from medgrpo.train.rollout import RolloutConfig

MIN_LENGTH = 16  # the smallest prompt-length and new-token bucket
MAX_SHAPES = 8  # captured shapes (buffers + CUDA graph) kept per model on CUDA


def bucket(size: int, *, minimum: int = 1) -> int:
    """``size`` rounded up to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them).

    Two buckets per doubling; at most a third of a bucket is padding. The result is at least
    ``minimum`` (itself one of the buckets).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    value = max(minimum, 1)
    while value < size:
        value = 2 if value == 1 else (value * 3 // 2 if value & (value - 1) == 0 else 1 << value.bit_length())
    return value


@dataclass(frozen=True)
class StepSettings:
    """The Python constants of a compiled step (a new value compiles a new graph)."""

    temperature: float
    top_k: int
    top_p: float
    pad_token_id: int


@dataclass
class DecodeState:
    """What a step reads and writes besides the KV cache, all on the device.

    Attributes:
        tokens: ``(R, T)`` int64, column ``t`` the token sampled at step ``t`` (padding after EOS).
        finished: ``(R,)`` bool, the row has produced an EOS (padding rows of a bucket: from the start).
        step: ``()`` int64, the column of the last sampled token (the one the next step feeds in).
        position: ``(R,)`` int64, the mrope position of completion token 0 (all three axes).
        uniforms: ``(T, R)`` float32, row ``t`` the numbers that sample column ``t``.
        eos_ids: ``(E,)`` int64 stop tokens. banned: ``(K,)`` int64 tokens never sampled.
    """

    tokens: torch.Tensor
    finished: torch.Tensor
    step: torch.Tensor
    position: torch.Tensor
    uniforms: torch.Tensor
    eos_ids: torch.Tensor
    banned: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, new_tokens: int, eos_ids: torch.Tensor, banned: torch.Tensor) -> DecodeState:
        device = eos_ids.device
        return cls(
            tokens=torch.zeros(rows, new_tokens, dtype=torch.long, device=device),
            finished=torch.ones(rows, dtype=torch.bool, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
            position=torch.zeros(rows, dtype=torch.long, device=device),
            uniforms=torch.zeros(new_tokens, rows, dtype=torch.float32, device=device),
            eos_ids=eos_ids.clone(),
            banned=banned.clone(),
        )


def decode_step(model: nn.Module, cache: StaticKVCache, state: DecodeState, settings: StepSettings) -> None:
    """One decoding step of every row, in place: feed column ``step``, sample column ``step + 1``.

    Run inside ``layout_attention(model)``. Only device tensors are read and written (no host sync),
    so the step compiles to one graph and captures as one CUDA graph.
    """
    rows = state.tokens.shape[0]
    step = state.step
    token = state.tokens.index_select(1, step.reshape(1))
    embeds = model.get_input_embeddings()(token)
    positions = qwen.text_positions(state.position + step, 1)
    hidden = qwen.hidden_states(model, embeds, positions, layout_mask(DecodeLayout(cache, step)))
    logits = qwen.logits(model, hidden[:, -1])
    following = (step + 1).reshape(1)
    uniforms = state.uniforms.index_select(0, following).reshape(rows)
    token = sample_tokens(logits, settings, uniforms, banned_token_ids=state.banned)
    token = token.masked_fill(state.finished, settings.pad_token_id)
    state.finished |= torch.isin(token, state.eos_ids)
    state.tokens.index_copy_(1, following, token[:, None])
    state.step += 1


@dataclass
class _Shape:
    """One bucketed rollout shape: its buffers and, on CUDA, its captured step."""

    cache: StaticKVCache
    state: DecodeState
    graph: torch.cuda.CUDAGraph | None = None


class StaticDecoder:
    """Static-cache decoding for one model: the (compiled) step, and on CUDA the captured shapes.

    Get it with :func:`static_decoder` (one per model and ``compile`` flag, kept while the model lives).
    """

    def __init__(self, *, compile: bool, sharded: bool = False):
        self.compiled = compile and not sharded
        self.step = torch.compile(decode_step, fullgraph=True) if self.compiled else decode_step
        self.shapes: OrderedDict[tuple, _Shape] = OrderedDict()

    def prepare(
        self,
        model: nn.Module,
        attention_mask: torch.Tensor,
        config: RolloutConfig,
        *,
        eos_ids: torch.Tensor,
        banned: torch.Tensor,
        pad_token_id: int,
    ) -> StaticRun:
        """Buffers for a rollout of the left-padded prompts ``attention_mask`` ``(B, L)``, bucketed (reused on CUDA)."""
        text = model.config.get_text_config()
        prompts, length = attention_mask.shape
        dims = (bucket(prompts), bucket(length, minimum=MIN_LENGTH), bucket(config.max_new_tokens, minimum=MIN_LENGTH))
        settings = StepSettings(config.temperature, config.top_k, config.top_p, pad_token_id)
        dtype, device = model.get_input_embeddings().weight.dtype, attention_mask.device
        graphs = self.compiled and device.type == "cuda"
        key = (*dims, config.group_size, settings, tuple(eos_ids.shape), tuple(banned.shape), dtype, device)
        shape = self.shapes.pop(key, None) if graphs else None
        if shape is None:
            cache = StaticKVCache.allocate(
                text,
                prompts=dims[0],
                group_size=config.group_size,
                prompt_length=dims[1],
                new_tokens=dims[2],
                dtype=dtype,
                device=device,
            )
            state = DecodeState.allocate(dims[0] * config.group_size, dims[2], eos_ids, banned)
            _mark_dynamic(cache, state)
            shape = _Shape(cache, state)
        if graphs:  # most recently used last; the least recently used beyond MAX_SHAPES are dropped
            self.shapes[key] = shape
            while len(self.shapes) > MAX_SHAPES:
                self.shapes.popitem(last=False)
        shape.state.eos_ids.copy_(eos_ids)
        shape.state.banned.copy_(banned)
        return StaticRun(self, model, shape, settings, config, graphs)


def _mark_dynamic(cache: StaticKVCache, state: DecodeState) -> None:
    """Let the compiled step take any prompts B, rows B*G, prompt length P and new tokens T (one compile)."""
    for tensor in (*cache.prompt_keys, *cache.prompt_values, *cache.completion_keys, *cache.completion_values):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(tensor, 2)
    for tensor, dims in ((cache.prompt_valid, (0, 1)), (state.tokens, (0, 1)), (state.uniforms, (0, 1))):
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
    torch._dynamo.maybe_mark_dynamic(state.finished, 0)
    torch._dynamo.maybe_mark_dynamic(state.position, 0)


class StaticRun:
    """One rollout on a :class:`StaticDecoder`'s buffers: :meth:`prefill_layout`, then :meth:`decode`."""

    def __init__(self, decoder: StaticDecoder, model: nn.Module, shape: _Shape, settings, config, graphs: bool):
        self.decoder, self.model, self.shape = decoder, model, shape
        self.settings, self.config, self.graphs = settings, config, graphs

    def prefill_layout(self, attention_mask: torch.Tensor) -> PrefillLayout:
        """The layout that prefills the prompts into the cache (pass ``layout_mask`` of it to the decoder)."""
        return PrefillLayout(self.shape.cache, attention_mask)

    def _call_step(self) -> None:
        self.decoder.step(self.model, self.shape.cache, self.shape.state, self.settings)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm the compiled step up on a side stream (compiles, autotunes), then capture one step."""
        state = self.shape.state
        state.step.zero_()
        state.tokens.fill_(self.settings.pad_token_id)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._call_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._call_step()
        return graph

    def decode(self, logits: torch.Tensor, position: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        """Sample up to ``max_new_tokens`` per row after the prefill; ``(B*G, steps)`` tokens, the reference's.

        Args:
            logits: ``(B, V)`` fp32 last-position logits of the prompts (the prefill's).
            position: ``(B,)`` mrope position of each prompt's first completion token.
            uniforms: ``(max_new_tokens, B*G)`` (:func:`~medgrpo.train.token_sampling.draw_uniforms`); None: greedy.
        """
        if self.graphs and self.shape.graph is None:
            with layout_attention(self.model):
                self.shape.graph = self._capture()
        group, steps = self.config.group_size, self.config.max_new_tokens
        rows = logits.shape[0] * group
        state = self.shape.state
        first = sample_tokens(
            logits.repeat_interleave(group, dim=0),
            self.settings,
            None if uniforms is None else uniforms[0],
            banned_token_ids=state.banned,
        )
        state.tokens.fill_(self.settings.pad_token_id)
        state.tokens[:rows, 0] = first
        state.finished.fill_(True)
        state.finished[:rows] = torch.isin(first, state.eos_ids)
        state.position.zero_()
        state.position[:rows] = position.repeat_interleave(group)
        state.uniforms.zero_()
        if uniforms is not None:
            state.uniforms[:steps, :rows] = uniforms
        state.step.zero_()
        done = self._run(steps - 1)
        return trim_ended(state.tokens[:rows, : done + 1], state.eos_ids)

    def _run(self, steps: int) -> int:
        """Up to ``steps`` steps, checking for all-finished (on every rank) every ``check_every``; the steps run."""
        every = self.config.check_every
        finished = self.shape.state.finished
        with layout_attention(self.model):
            for done in range(steps):
                if done % every == 0 and all_finished(finished, self.model):  # the one host sync, every k steps
                    return done
                if self.shape.graph is not None:
                    self.shape.graph.replay()
                else:
                    self._call_step()
        return steps


def trim_ended(tokens: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """The columns up to the one where every row has ended (where a one-process loop stops), copied.

    Steps run past it (the all-finished check every k steps; the ranks of a sharded model stepping
    together) hold padding only.
    """
    ended = torch.isin(tokens, eos_ids).long().cumsum(dim=1).gt(0).all(dim=0)
    stop = int(torch.where(ended.any(), ended.long().argmax() + 1, ended.shape[0]))
    return tokens[:, :stop].clone()


_DECODERS: weakref.WeakKeyDictionary[nn.Module, dict[bool, StaticDecoder]] = weakref.WeakKeyDictionary()


def static_decoder(model: nn.Module, *, compile: bool) -> StaticDecoder:
    """The model's :class:`StaticDecoder` (created on first use; it holds no reference to the model)."""
    decoders = _DECODERS.setdefault(model, {})
    if compile not in decoders:
        decoders[compile] = StaticDecoder(compile=compile, sharded=is_sharded(model))
    return decoders[compile]


__all__ = [
    "MAX_SHAPES",
    "DecodeState",
    "StaticDecoder",
    "StaticRun",
    "StepSettings",
    "bucket",
    "decode_step",
    "static_decoder",
    "trim_ended",
]
