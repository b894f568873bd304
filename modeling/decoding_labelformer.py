"""Fast decoding for Labelformer: a static key/value cache, greedy loops, CUDA-graph replay, label rules.

- `StaticDecodingCache`: preallocated decoder keys/values written in place, for fixed-shape steps.
- `greedy_decode`: plain greedy decoding on that cache (the fast path of ``generate()``).
- `label_rules` / `allowed_label_tokens` / `LabelSetLogitsProcessor`: the label-set constraints
  (label tokens only, no label twice, EOS only after ``min_labels``, at most ``max_labels``).
- `GreedyLabelDecoder`: constrained greedy label decoding that keeps the rules as running state;
  on CUDA the whole loop is captured once per batch shape as one CUDA graph and replayed.

Nothing here holds model state between calls except the CUDA-graph decoders, which are cached
per model and batch shape and used under a lock, so one model can serve several threads.
This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor
from transformers.cache_utils import Cache
from transformers.modeling_outputs import Seq2SeqLMOutput

from .configuration_labelformer import EOS_TOKEN_ID, NUM_SPECIAL_DECODER_TOKENS


class _KeysValues:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values


class StaticDecodingCache:
    """Preallocated decoder keys/values for step-by-step decoding with fixed shapes.

    A drop-in for `EncoderDecoderCache` in the decoder layers (same ``update``/``layers``/``is_updated``
    surface), used by `LabelformerDecoder.decode_step`: self-attention keys and values of step ``t``
    are written in place into ``[b, h, max_steps, d_k]`` buffers and attention reads the first
    ``t + 1`` slots (a view, so no mask is needed); cross-attention keys and values are projected
    from the encoder once, in `set_encoder_states`. Buffer addresses never change, which is what
    CUDA graph replay needs.
    """

    def __init__(self, decoder: nn.Module, batch: int, source_len: int, max_steps: int,
                 device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
        config = decoder.config
        heads = config.decoder_attention_heads
        shape = (batch, heads, max_steps, config.d_model // heads)
        cross_shape = (batch, heads, source_len, config.d_model // heads)
        self.decoder = decoder
        self.step = 0  # the slot the next `update` writes (set by `LabelformerDecoder.decode_step`)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in decoder.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in decoder.layers]
        self.cross_keys = [torch.zeros(cross_shape, device=device, dtype=dtype) for _ in decoder.layers]
        self.cross_values = [torch.zeros(cross_shape, device=device, dtype=dtype) for _ in decoder.layers]
        self.cross_mask = torch.ones(batch, 1, 1, source_len, device=device, dtype=torch.bool)
        self.encoder_states = torch.zeros(batch, source_len, config.d_model, device=device, dtype=dtype)
        # the `EncoderDecoderCache` surface read by `LabelformerAttention._keys_values`
        self.self_attention_cache = self
        self.cross_attention_cache = self
        # by the layers' cache indices (an ensemble member's decoder layers start after the other members')
        indices = [layer.self_attn.layer_idx for layer in decoder.layers]
        self.slot = {index: i for i, index in enumerate(indices)}
        self.is_updated = dict.fromkeys(indices, True)
        self.layers = {index: _KeysValues(k, v) for index, k, v in zip(indices, self.cross_keys, self.cross_values)}

    @torch.no_grad()
    def set_encoder_states(self, encoder_states: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Copy in ``[b, s, d]`` encoder states and ``[b, s]`` mask; project cross keys/values; reset the step."""
        self.encoder_states.copy_(encoder_states)
        mask = attention_mask if attention_mask is not None else torch.ones_like(encoder_states[..., 0])
        self.cross_mask.copy_(mask.bool()[:, None, None, :])
        for i, layer in enumerate(self.decoder.layers):
            attention = layer.cross_attn
            self.cross_keys[i].copy_(attention._split_heads(attention.k_proj(encoder_states)))
            self.cross_values[i].copy_(attention._split_heads(attention.v_proj(encoder_states)))
        self.step = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[b, h, 1, d_k]`` at the current step; return the keys/values so far ``[b, h, t + 1, d_k]``."""
        t, i = self.step, self.slot[layer_idx]
        self.keys[i][:, :, t : t + 1].copy_(key)
        self.values[i][:, :, t : t + 1].copy_(value)
        return self.keys[i][:, :, : t + 1], self.values[i][:, :, : t + 1]


@torch.no_grad()
def greedy_decode(
    model: Any,
    encoder_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    start: int,
    eos_ids: torch.Tensor,
    pad: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Greedy decoding of a `LabelformerForConditionalGeneration` on a `StaticDecodingCache`.

    ``[b, s, d]`` encoder states -> ``[b, 1 + t]`` tokens (start token first). EOS is forbidden for
    the first ``min_new_tokens`` steps, finished rows continue with ``pad``, and decoding stops once
    every row has produced EOS or after ``max_new_tokens`` steps: the same tokens as the generic loop.
    """
    batch, source_len = encoder_states.shape[:2]
    decoder = model.get_decoder()
    cache = StaticDecodingCache(decoder, batch, source_len, max(max_new_tokens, 1),
                                encoder_states.device, encoder_states.dtype)  # fmt: skip
    cache.set_encoder_states(encoder_states, attention_mask)
    current = torch.full((batch, 1), start, dtype=torch.long, device=encoder_states.device)
    output = [current]
    finished = torch.zeros(batch, dtype=torch.bool, device=encoder_states.device)
    for step in range(max_new_tokens):
        logits = model.lm_head(decoder.decode_step(current, cache, step)).float()  # [b, v]
        if step < min_new_tokens:
            logits[:, eos_ids] = float("-inf")
        chosen = logits.argmax(-1).masked_fill(finished, pad)
        output.append(chosen[:, None])
        finished |= torch.isin(chosen, eos_ids)
        if bool(finished.all()):
            break
        current = chosen[:, None]
    return torch.cat(output, dim=1)


#: Generation-config fields the fast greedy loop implements (every other field must be unset or off).
GREEDY_FIELDS = frozenset({
    "max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "decoder_start_token_id", "num_return_sequences", "transformers_version",
    "_from_model_config", "early_stopping", "length_penalty",
})  # fmt: skip
_GREEDY_KWARGS = frozenset(
    {"input_ids", "attention_mask", "max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "use_cache"}
)


def plain_greedy_request(model: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments of ``model.greedy_generate`` if a ``generate(*args, **kwargs)`` call is plain greedy
    decoding (ids, mask, lengths; no penalties, forced tokens or extra outputs), else ``None``."""
    if args or not getattr(model, "fast_greedy_generate", True):
        return None
    if not {"input_ids", "attention_mask"} <= kwargs.keys() or kwargs.keys() - _GREEDY_KWARGS:
        return None
    config = model.generation_config
    if any(value for key, value in config.to_dict().items() if key not in GREEDY_FIELDS):
        return None
    if kwargs.get("num_beams", config.num_beams or 1) != 1 or kwargs.get("do_sample", config.do_sample):
        return None
    if not kwargs.get("use_cache", config.use_cache if config.use_cache is not None else True):
        return None
    if (config.num_return_sequences or 1) != 1 or model.config._attn_implementation not in ("eager", "sdpa"):
        return None
    max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
    if max_new_tokens is None:  # length defaults differ between transformers releases: let generate() decide
        return None
    return {
        "input_ids": kwargs["input_ids"],
        "attention_mask": kwargs["attention_mask"],
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": kwargs.get("min_new_tokens", config.min_new_tokens) or 0,
    }


# transformers 5.24 renamed generation's cache from `past_key_values` to `cache`, both as the
# keyword `generate()` passes to `forward` and as the output field it reads back. The public
# forwards take either keyword and return the cache under the field this version declares.
CACHE_OUTPUT_FIELD = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


def generation_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The one cache given as ``cache`` (transformers >= 5.24) or ``past_key_values`` (older)."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("Pass the generation cache once, as `cache` or as `past_key_values`, not both.")
    return past_key_values


def output_cache(outputs: Any) -> Cache | None:
    """The cache a model output carries, whichever field name this transformers version uses."""
    return getattr(outputs, CACHE_OUTPUT_FIELD, None)


class FastGenerationMixin:
    """`generate()` with a fast path for plain greedy decoding, and `compute_transition_scores` sized by the
    scores (the decoder vocabulary may differ from the encoder's). Mixed into `LabelformerForConditionalGeneration`
    (whose ``model.encoder``, ``lm_head`` and ``get_decoder()`` its `greedy_generate` uses) and, for
    `compute_transition_scores`, into the ensemble, before `GenerationMixin`; the label heads' own
    `LabelGenerationMixin` methods come first.
    """

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`GenerationMixin.generate`, plus a fast path for plain greedy decoding.

        A call that asks for nothing but greedy decoding (``input_ids``, ``attention_mask``,
        ``max_new_tokens``, ``min_new_tokens``, ``num_beams=1``, ``do_sample=False``, and a generation
        config without penalties, forced tokens or extra outputs) runs `greedy_generate`: the same
        tokens, decoded on a preallocated `StaticDecodingCache` without the generic loop's per-step
        overhead. ``model.fast_greedy_generate = False`` always takes the generic loop.
        """
        fast = self._plain_greedy_request(args, kwargs)
        if fast is not None:
            return self.greedy_generate(**fast)
        return super().generate(*args, **kwargs)

    def compute_transition_scores(
        self,
        sequences: torch.Tensor,
        scores: tuple[torch.Tensor, ...],
        beam_indices: torch.Tensor | None = None,
        normalize_logits: bool = False,
    ) -> torch.Tensor:
        """The score of each generated token: ``[n, t]`` from ``sequences`` ``[n, start + t]`` and the
        per-step ``scores`` (``t`` tensors ``[rows, v]``) of `generate()`; 0 after a beam finished.

        Same contract as `GenerationMixin.compute_transition_scores`, but sized by the scores
        themselves: the decoder vocabulary may differ from the encoder's (``config.vocab_size``).
        """
        stacked = torch.stack(scores, dim=1).float()  # [rows, steps, v]
        if normalize_logits:
            stacked = stacked.log_softmax(-1)
        if beam_indices is None:
            beam_indices = torch.arange(sequences.shape[0], device=sequences.device)[:, None]
            beam_indices = beam_indices.expand(-1, len(scores))
        length = int((beam_indices >= 0).sum(-1).max())
        rows = beam_indices[:, :length]
        finished = rows < 0
        tokens = sequences[:, sequences.shape[1] - length :]
        steps = torch.arange(length, device=sequences.device)[None, :]
        picked = stacked.to(sequences.device)[rows.clamp(min=0), steps, tokens]  # [n, length]
        return picked.masked_fill(finished, 0.0)

    def _plain_greedy_request(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The arguments of `greedy_generate` if this `generate()` call is plain greedy decoding, else None."""
        return plain_greedy_request(self, args, kwargs)

    @torch.no_grad()
    def greedy_generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 20, min_new_tokens: int = 0
    ) -> torch.Tensor:
        """Greedy decoding on a `StaticDecodingCache`: ``[b, s]`` -> ``[b, 1 + t]`` (start token first).

        Same result as ``generate(num_beams=1, do_sample=False)``: EOS is forbidden for the first
        ``min_new_tokens`` steps, finished rows continue with padding, and decoding stops once every
        row has produced EOS or after ``max_new_tokens`` steps.
        """
        config = self.generation_config
        start = (
            config.decoder_start_token_id
            if config.decoder_start_token_id is not None
            else self.config.decoder_start_token_id
        )
        eos = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        pad = config.pad_token_id if config.pad_token_id is not None else eos_ids[0].item()
        encoder_states = self.model.encoder(input_ids, attention_mask).last_hidden_state
        return greedy_decode(self, encoder_states, attention_mask, start=start, eos_ids=eos_ids, pad=pad,
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Label-set rules
# ---------------------------------------------------------------------------------------------


def label_rules(used: torch.Tensor, num_labels: torch.Tensor, min_labels: int, max_labels: int) -> torch.Tensor:
    """The label-set rules for the next token, given what has been emitted.

    Only label tokens or EOS; never a label already used; EOS only once ``min_labels`` labels are
    out (or no label is left); no label once ``max_labels`` are out.

    Args:
        used: ``[..., v]`` boolean, True for tokens already in the sequence.
        num_labels: ``[...]`` labels emitted so far.

    Returns:
        ``[..., v]`` boolean: the tokens that may come next.
    """
    allowed = ~used
    allowed[..., :NUM_SPECIAL_DECODER_TOKENS] = False
    allowed[..., NUM_SPECIAL_DECODER_TOKENS:] &= (num_labels < max_labels)[..., None]
    nothing_left = ~allowed[..., NUM_SPECIAL_DECODER_TOKENS:].any(dim=-1)
    allowed[..., EOS_TOKEN_ID] = (num_labels >= min_labels) | nothing_left
    return allowed


def allowed_label_tokens(prefixes: torch.Tensor, vocab_size: int, min_labels: int, max_labels: int) -> torch.Tensor:
    """`label_rules` after every prefix of every sequence.

    Args:
        prefixes: ``[n, t]`` decoder inputs (start token first; padding after EOS is ignored).

    Returns:
        ``[n, t, vocab_size]`` boolean: entry ``[i, j, v]`` says token ``v`` may follow ``prefixes[i, :j+1]``.
    """
    used = nn.functional.one_hot(prefixes, vocab_size).cumsum(dim=1) > 0  # [n, t, v]
    num_labels = (prefixes >= NUM_SPECIAL_DECODER_TOKENS).long().cumsum(dim=1)  # [n, t]
    return label_rules(used, num_labels, min_labels, max_labels)


class LabelSetLogitsProcessor(LogitsProcessor):
    """Constrain `generate()` to valid label sets; works per beam, with greedy, beam search and sampling.

    The result is renormalised over the allowed tokens (log-softmax), so the scores `generate()`
    returns are the log-probabilities of the constrained distribution: ``exp`` of
    `compute_transition_scores` is the probability `predict_labels` reports, and beam search ranks
    hypotheses by that same distribution.
    """

    def __init__(self, min_labels: int, max_labels: int) -> None:
        self.min_labels = min_labels
        self.max_labels = max_labels

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` ``[n, t]`` so far, ``scores`` ``[n, v]`` -> log-probabilities with forbidden tokens at -inf."""
        allowed = allowed_label_tokens(input_ids, scores.shape[-1], self.min_labels, self.max_labels)[:, -1]
        return scores.float().masked_fill(~allowed, float("-inf")).log_softmax(-1).to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# Constrained greedy label decoding
# ---------------------------------------------------------------------------------------------


def ensemble_log_probs(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """Members' label logits, each ``[..., v]`` -> the log of the mean of their softmaxes ``[..., v]`` (float).

    One member: its logits unchanged (the same distribution up to a constant per row, which a softmax
    drops). This is how an ensemble's `forward()` and its greedy loop combine members: the labels are
    decided on the members' averaged probabilities.
    """
    if len(member_logits) == 1:
        return member_logits[0]
    stacked = torch.stack([logits.float().log_softmax(-1) for logits in member_logits])  # [K, ..., v]
    return stacked.logsumexp(0) - math.log(len(member_logits))


class GreedyLabelDecoder:
    """Constrained greedy label decoding on static decoding caches, for one model and batch shape.

    The model is one encoder-decoder or an ensemble of them (``model.label_decoders()``: one
    ``(decoder, lm_head)`` pair per member). Each step runs every member's `LabelformerDecoder.decode_step`
    and ``lm_head``, adds the member's row bias (its document label logits), combines the members with
    `ensemble_log_probs`, adds the shared bias (an ensemble's lexical part), and applies `label_rules` as
    running state (``used`` labels, label ``count``, rows ``done``); the chosen token's probability
    under the constrained softmax is its score. Eagerly it stops once every row has emitted EOS. With
    ``cuda_graph`` the whole loop (all ``steps`` steps and the rules) is captured once as one CUDA graph
    and later calls replay it.
    """

    def __init__(self, model: Any, batch: int, source_len: int, steps: int, device: torch.device,
                 dtype: torch.dtype, cuda_graph: bool) -> None:  # fmt: skip
        self.model = weakref.proxy(model)  # the registry holds decoders per model: no reference cycle
        self.members = [
            (decoder, lm_head, StaticDecodingCache(decoder, batch, source_len, steps, device, dtype))
            for decoder, lm_head in model.label_decoders()
        ]
        vocab = model.config.decoder_vocab_size
        self.member_bias = [torch.zeros(batch, vocab, device=device) for _ in self.members]
        self.shared_bias = torch.zeros(batch, vocab, device=device)
        self.batch, self.steps, self.device = batch, steps, device
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lock = threading.Lock()

    def _decode(self, early_exit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.model.config
        batch, device = self.batch, self.device
        current = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long, device=device)
        used = torch.zeros(batch, config.decoder_vocab_size, dtype=torch.bool, device=device)
        count = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, scores = [], []
        for step in range(self.steps):
            allowed = label_rules(used, count, config.min_labels, config.effective_max_labels)
            member_logits = [
                lm_head(decoder.decode_step(current, cache, step)).float() + bias
                for (decoder, lm_head, cache), bias in zip(self.members, self.member_bias)
            ]
            logits = ensemble_log_probs(member_logits) + self.shared_bias
            probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)  # [b, v]
            best = probs.argmax(-1)
            score = probs.gather(-1, best[:, None]).squeeze(-1)
            best = best.masked_fill(done, config.pad_token_id)
            tokens.append(best)
            scores.append(score.masked_fill(done, 0.0))
            used.scatter_(1, best[:, None], True)
            is_label = best >= NUM_SPECIAL_DECODER_TOKENS
            count += is_label.long()
            done |= ~is_label
            if early_exit and bool(done.all()):
                break
            current = best[:, None]
        return torch.stack(tokens, 1), torch.stack(scores, 1)

    @torch.no_grad()
    def __call__(
        self,
        member_states: list[torch.Tensor],
        attention_mask: torch.Tensor | None,
        member_bias: list[torch.Tensor],
        shared_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per member ``[b, s, d]`` encoder states and ``[b, v]`` row bias, the ``[b, s]`` mask and an optional
        ``[b, v]`` shared bias -> ``[b, t]`` tokens (labels, EOS, then padding) and ``[b, t]`` their probabilities."""
        if len(member_states) != len(self.members) or len(member_bias) != len(self.members):
            raise ValueError(f"Expected states and row biases for {len(self.members)} members.")
        with self.lock:
            for (_, _, cache), states, buffer, bias in zip(self.members, member_states, self.member_bias, member_bias):
                cache.set_encoder_states(states, attention_mask)
                buffer.copy_(bias)
            if shared_bias is None:
                self.shared_bias.zero_()
            else:
                self.shared_bias.copy_(shared_bias)
            if not self.cuda_graph:
                return self._decode(early_exit=True)
            if self.graph is None:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up outside the graph (same inputs: idempotent)
                    self._decode(early_exit=False)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # other threads may run
                    self.outputs = self._decode(early_exit=False)
            self.graph.replay()
            return self.outputs[0].clone(), self.outputs[1].clone()


#: Per model: CUDA-graph decoders by batch shape (outside the module, so copies and pickles never see them).
_GRAPH_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def greedy_label_decoder(model: Any, encoder_states: torch.Tensor, use_cuda_graphs: bool) -> GreedyLabelDecoder:
    """A `GreedyLabelDecoder` for this model and batch shape (``[b, s, d]`` states of one member): a fresh one
    on CPU, a cached CUDA-graph one on GPUs."""
    steps = model.config.effective_max_labels + 1
    batch, source_len = encoder_states.shape[:2]
    use_graphs = (
        use_cuda_graphs
        and encoder_states.is_cuda
        and model.config._attn_implementation in ("eager", "sdpa")
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(encoder_states.device.type)  # a graph would freeze one precision
    )
    if not use_graphs:
        return GreedyLabelDecoder(model, batch, source_len, steps, encoder_states.device, encoder_states.dtype, False)
    weights = tuple(
        (lm_head.weight.data_ptr(), decoder.layers[0].self_attn.q_proj.weight.data_ptr())
        for decoder, lm_head in model.label_decoders()
    )
    key = (batch, source_len, steps, model.config.min_labels, encoder_states.device, encoder_states.dtype,
           model.config._attn_implementation, weights)  # fmt: skip
    with _REGISTRY_LOCK:
        decoders = _GRAPH_DECODERS.setdefault(model, {})
        if key not in decoders:
            if len(decoders) >= 8:  # a few shapes at most; graphs hold their own memory pools
                decoders.pop(next(iter(decoders)))
            decoders[key] = GreedyLabelDecoder(model, batch, source_len, steps, encoder_states.device,
                                               encoder_states.dtype, True)  # fmt: skip
        return decoders[key]


__all__ = [
    "CACHE_OUTPUT_FIELD",
    "FastGenerationMixin",
    "generation_cache",
    "output_cache",
    "GreedyLabelDecoder",
    "LabelSetLogitsProcessor",
    "StaticDecodingCache",
    "allowed_label_tokens",
    "ensemble_log_probs",
    "greedy_decode",
    "greedy_label_decoder",
    "plain_greedy_request",
    "label_rules",
]
