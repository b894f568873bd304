"""Fast decoding: the static cache, greedy loops on it and when generate() takes them, transition scores,
the label-set rules and the constrained greedy decoder."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationMixin

from modeling import LabelformerForConditionalGeneration, LabelformerForMultiLabelGeneration
from modeling.decoding_labelformer import (
    GreedyLabelDecoder,
    LabelSetLogitsProcessor,
    StaticDecodingCache,
    allowed_label_tokens,
    greedy_decode,
    greedy_label_decoder,
    plain_greedy_request,
)

from .conftest import random_batch, tiny_config
from .synthetic import synthetic_batch, synthetic_config


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_static_decoding_cache_steps_match_the_full_decoder(backend):
    torch.manual_seed(0)
    model = LabelformerForConditionalGeneration(tiny_config(decoder_vocab_size=12, init_std=0.2)).eval()
    model.config._attn_implementation = backend
    ids = torch.randint(4, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    targets = torch.randint(3, 12, (3, 6))
    with torch.no_grad():
        encoder_states = model.model.encoder(ids, mask).last_hidden_state
        full = model(encoder_outputs=(encoder_states,), attention_mask=mask, decoder_input_ids=targets).logits
        cache = StaticDecodingCache(model.model.decoder, 3, 9, 6, ids.device, encoder_states.dtype)
        for _ in range(2):  # the cache is reusable: a second pass over the same buffers gives the same
            cache.set_encoder_states(encoder_states, mask)
            for t in range(6):
                step = model.lm_head(model.model.decoder.decode_step(targets[:, t : t + 1], cache, t))
                torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="eager' and 'sdpa"):
        model.model.decoder.decode_step(targets[:, :1], cache, 0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("lengths", [{"max_new_tokens": 10}, {"max_new_tokens": 12, "min_new_tokens": 4}])
def test_greedy_decode_on_the_static_cache_equals_the_generic_loop(attn, lengths):
    # a small decoder vocabulary and large weights: EOS comes early in some rows, not in others
    torch.manual_seed(3)
    config = tiny_config(decoder_vocab_size=6, init_std=0.5)
    config._attn_implementation = attn
    model = LabelformerForConditionalGeneration(config).eval()
    model.fast_greedy_generate = False  # generate() below is the generic loop on a DynamicCache
    input_ids, attention_mask, _ = random_batch(config, batch=8)
    generic = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1, do_sample=False,
                             **lengths)  # fmt: skip
    with torch.no_grad():
        states = model.model.encoder(input_ids, attention_mask).last_hidden_state
    eos_ids = torch.tensor([config.eos_token_id])
    fast = greedy_decode(
        model, states, attention_mask, start=config.decoder_start_token_id, eos_ids=eos_ids, pad=config.pad_token_id,
        max_new_tokens=lengths["max_new_tokens"], min_new_tokens=lengths.get("min_new_tokens", 0),
    )  # fmt: skip
    assert torch.equal(fast, generic)
    finished_early = (fast[:, 1:-1] == config.eos_token_id).any(dim=1)
    assert finished_early.any() and not finished_early.all()  # both cases are exercised
    assert not (fast[:, 1 : 1 + lengths.get("min_new_tokens", 0)] == config.eos_token_id).any()


def test_generate_takes_the_fast_greedy_path_only_for_plain_greedy_requests(monkeypatch):
    torch.manual_seed(3)
    model = LabelformerForConditionalGeneration(tiny_config(decoder_vocab_size=6, init_std=0.5)).eval()
    input_ids, attention_mask, _ = random_batch(model.config, batch=8)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, num_beams=1, do_sample=False,
                  max_new_tokens=12, min_new_tokens=4)  # fmt: skip
    calls = []
    greedy_generate = model.greedy_generate
    monkeypatch.setattr(model, "greedy_generate", lambda **fast: calls.append(fast) or greedy_generate(**fast))
    fast = model.generate(**kwargs)
    assert calls == [{"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 12,
                      "min_new_tokens": 4}]  # fmt: skip
    model.fast_greedy_generate = False
    assert torch.equal(model.generate(**kwargs), fast)  # the generic loop gives the same tokens
    assert len(calls) == 1
    model.fast_greedy_generate = True
    assert plain_greedy_request(model, (), kwargs) is not None
    # anything the fast loop does not implement goes to the generic loop
    assert plain_greedy_request(model, (input_ids,), {}) is None
    assert plain_greedy_request(model, (), {**kwargs, "repetition_penalty": 1.3}) is None
    assert plain_greedy_request(model, (), {**kwargs, "num_beams": 2}) is None
    assert plain_greedy_request(model, (), {**kwargs, "use_cache": False}) is None
    no_mask = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    assert plain_greedy_request(model, (), no_mask) is None
    no_length = {k: v for k, v in kwargs.items() if k != "max_new_tokens"}
    assert plain_greedy_request(model, (), no_length) is None  # length defaults are generate()'s business
    model.generation_config.no_repeat_ngram_size = 2
    assert plain_greedy_request(model, (), kwargs) is None
    model.generation_config.no_repeat_ngram_size = 0
    model.config._attn_implementation = "flex_attention"
    assert plain_greedy_request(model, (), kwargs) is None


@pytest.mark.parametrize("decoder_vocab_size", [None, 17])
@pytest.mark.parametrize("normalize_logits", [False, True])
def test_transition_scores_are_sized_by_the_scores(decoder_vocab_size, normalize_logits):
    """Greedy and beam transition scores: GenerationMixin's where the vocabularies agree, and with a decoder
    vocabulary of its own the beam scores still add up to each sequence's score (length_penalty 0)."""
    torch.manual_seed(2)
    model = LabelformerForConditionalGeneration(tiny_config(decoder_vocab_size=decoder_vocab_size, init_std=0.3)).eval()
    input_ids, attention_mask, _ = random_batch(model.config)
    common = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        greedy = model.generate(**common)
        beams = model.generate(**common, num_beams=3, num_return_sequences=2, length_penalty=0.0)
    for out in (greedy, beams):
        beam_indices = getattr(out, "beam_indices", None)
        scores = model.compute_transition_scores(out.sequences, out.scores, beam_indices, normalize_logits)
        assert scores.shape == (out.sequences.shape[0], len(out.scores))
        if decoder_vocab_size is None:
            reference = GenerationMixin.compute_transition_scores(
                model, out.sequences, out.scores, beam_indices, normalize_logits
            )
            torch.testing.assert_close(scores, reference)
    assert model.config.vocab_size == 40  # never rewritten
    scores = model.compute_transition_scores(beams.sequences, beams.scores, beams.beam_indices)
    torch.testing.assert_close(scores.sum(-1), beams.sequences_scores, atol=1e-4, rtol=1e-4)
    greedy_scores = model.compute_transition_scores(greedy.sequences, greedy.scores, normalize_logits=True)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=greedy.sequences[:, :-1]).logits  # fmt: skip
    chosen = logits.log_softmax(-1).gather(-1, greedy.sequences[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(greedy_scores, chosen, atol=1e-5, rtol=1e-4)


def test_allowed_tokens_worked_example():
    # vocab: pad bos eos + labels 3..6; prefix [bos, 4, 6]
    allowed = allowed_label_tokens(torch.tensor([[1, 4, 6]]), 7, min_labels=2, max_labels=3)[0]
    assert allowed[0].tolist() == [False, False, False, True, True, True, True]  # after bos: any label, no EOS
    assert allowed[1].tolist() == [False, False, False, True, False, True, True]  # 1 label: EOS still banned
    assert allowed[2].tolist() == [False, False, True, True, False, True, False]  # 2 labels: EOS ok
    at_max = allowed_label_tokens(torch.tensor([[1, 3, 4, 5]]), 7, min_labels=1, max_labels=3)[0, -1]
    assert at_max.tolist() == [False, False, True, False, False, False, False]  # max reached: only EOS
    all_used = allowed_label_tokens(torch.tensor([[1, 3, 4]]), 5, min_labels=0, max_labels=5)[0]
    assert all_used[0].tolist() == [False, False, True, True, True]  # min_labels 0: EOS at once
    assert all_used[-1].tolist() == [False, False, True, False, False]  # no label left: only EOS


def test_label_set_processor_renormalises_over_the_allowed_tokens():
    processor = LabelSetLogitsProcessor(min_labels=1, max_labels=3)
    prefixes = torch.tensor([[1, 4], [1, 3]])
    scores = torch.randn(2, 7)
    out = processor(prefixes, scores)
    allowed = allowed_label_tokens(prefixes, 7, 1, 3)[:, -1]
    assert torch.equal(torch.isfinite(out), allowed)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))
    torch.testing.assert_close(out[allowed], scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)[allowed])


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("limits", [{}, {"min_labels": 2, "max_labels": 3}, {"min_labels": 0}])
def test_greedy_label_decoder_equals_the_generic_loop_and_its_rescoring(seed, limits):
    """`greedy_labels` (rules as running state) == generate()'s generic loop under the rules, rescored."""
    torch.manual_seed(seed)
    model = LabelformerForMultiLabelGeneration(synthetic_config(init_std=0.3, **limits)).eval()
    ids, _ = synthetic_batch(6, 12, torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, -4:] = 0
    with torch.no_grad():
        tokens, scores = model.greedy_labels(ids, mask)
        model.fast_greedy_generate = False
        sequences = model.generate(input_ids=ids, attention_mask=mask)
        reference = model.label_scores(sequences, model.encode(ids, mask), mask)
    assert tokens.shape[1] <= model.config.effective_max_labels + 1  # eagerly it stops once every row is done
    assert torch.equal(tokens, sequences[:, 1:])
    done = (tokens < 3).cumsum(1) > 1  # after EOS: padding, score 0
    assert not scores[done].any()
    torch.testing.assert_close(scores[~done], reference[~done], atol=1e-5, rtol=1e-4)


def test_a_reused_greedy_label_decoder_keeps_no_state_between_calls():
    torch.manual_seed(1)
    model = LabelformerForMultiLabelGeneration(synthetic_config(init_std=0.3)).eval()
    ids, _ = synthetic_batch(8, 12, torch.Generator().manual_seed(1))
    first, second = ids[:4], ids[4:]
    mask = torch.ones_like(first)
    bias = torch.zeros(4, model.config.decoder_vocab_size)
    bias[:, 5] = 50.0  # a row bias that forces label 2 first
    no_bias = torch.zeros_like(bias)

    def states(batch):
        return model.model.encoder(batch, mask).last_hidden_state

    def fresh(batch, row_bias):
        decoder = greedy_label_decoder(model, states(batch), use_cuda_graphs=True)  # CPU: a fresh eager one
        return decoder([states(batch)], mask, [no_bias if row_bias is None else row_bias])

    with torch.no_grad():
        decoder = GreedyLabelDecoder(model, 4, 12, model.config.effective_max_labels + 1, ids.device, torch.float32,
                                     cuda_graph=False)  # fmt: skip
        biased = decoder([states(first)], mask, [bias])
        assert (biased[0][:, 0] == 5).all()
        for batch, row_bias in ((second, None), (first, bias), (first, None)):
            got, want = (
                decoder([states(batch)], mask, [no_bias if row_bias is None else row_bias]),
                fresh(batch, row_bias),
            )
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])
        assert not torch.equal(decoder([states(first)], mask, [no_bias])[0], biased[0])
