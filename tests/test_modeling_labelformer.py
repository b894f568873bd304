"""The core encoder-decoder: shapes, masks, backends, options, caching, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from modeling import LabelformerForConditionalGeneration, LabelformerModel
from modeling.modeling_labelformer import (
    CACHE_OUTPUT_FIELD,
    SinusoidalPositionalEncoding,
    output_cache,
    sinusoidal_table,
)

from .conftest import random_batch, tiny_config

OPTIONS = [
    {},
    {"norm_position": "pre"},
    {"position_embedding_type": "learned"},
    {"activation_function": "gelu", "share_embeddings": True},
    {"tie_word_embeddings": False, "decoder_vocab_size": 17},
]


def build(attn_implementation: str = "eager", **overrides) -> LabelformerForConditionalGeneration:
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    return LabelformerForConditionalGeneration(config).eval()


def test_output_shapes():
    model = build()
    config = model.config
    input_ids, attention_mask, labels = random_batch(config)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        output_attentions=True,
        output_hidden_states=True,
    )
    b, s, t = input_ids.shape[0], input_ids.shape[1], labels.shape[1]
    heads = config.encoder_attention_heads
    assert out.logits.shape == (b, t, config.decoder_vocab_size)
    assert out.encoder_last_hidden_state.shape == (b, s, config.d_model)
    assert len(out.encoder_hidden_states) == config.encoder_layers + 1
    assert len(out.decoder_hidden_states) == config.decoder_layers + 1
    assert all(a.shape == (b, heads, s, s) for a in out.encoder_attentions)
    assert all(a.shape == (b, heads, t, t) for a in out.decoder_attentions)
    assert all(a.shape == (b, heads, t, s) for a in out.cross_attentions)
    # attention rows are distributions; padded keys get no weight
    assert torch.allclose(out.cross_attentions[0].sum(-1), torch.ones(b, heads, t), atol=1e-5)
    assert out.cross_attentions[0][-1, :, :, -3:].abs().max() < 1e-6
    bare = LabelformerModel(config).eval()(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=labels)
    assert bare.last_hidden_state.shape == (b, t, config.d_model)


@pytest.mark.parametrize("overrides", OPTIONS)
def test_loss_is_finite_and_every_parameter_learns(overrides):
    model = build(**overrides).train()
    input_ids, attention_mask, labels = random_batch(model.config)
    labels[0, -2:] = -100
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(model.config.decoder_vocab_size), rel=0.25)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("overrides", OPTIONS[:3])
def test_padding_invariance(attn, overrides):
    """Extra pad tokens on the source change nothing at real positions."""
    model = build(attn, **overrides)
    input_ids, _, labels = random_batch(model.config, pad_tail=0)
    padded = torch.cat([input_ids, torch.zeros(input_ids.shape[0], 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([torch.ones_like(input_ids), torch.zeros(input_ids.shape[0], 5, dtype=torch.long)], 1)
    plain = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    with_pad = model(input_ids=padded, attention_mask=padded_mask, labels=labels)
    s = input_ids.shape[1]
    torch.testing.assert_close(with_pad.encoder_last_hidden_state[:, :s], plain.encoder_last_hidden_state)
    torch.testing.assert_close(with_pad.logits, plain.logits)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_invariance(attn):
    """Changing later decoder tokens leaves the logits of earlier positions unchanged."""
    model = build(attn)
    input_ids, attention_mask, labels = random_batch(model.config)
    changed = labels.clone()
    changed[:, 3:] = torch.randint(3, model.config.decoder_vocab_size, changed[:, 3:].shape)
    a = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=labels).logits
    b = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=changed).logits
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize("overrides", OPTIONS)
def test_eager_matches_sdpa(overrides):
    eager = build("eager", **overrides)
    sdpa = build("sdpa", **overrides)
    sdpa.load_state_dict(eager.state_dict())
    input_ids, attention_mask, labels = random_batch(eager.config)
    a = eager(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    b = sdpa(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)


def test_post_and_pre_norm_differ_in_structure():
    post, pre = build(norm_position="post"), build(norm_position="pre")
    post_names, pre_names = set(post.state_dict()), set(pre.state_dict())
    assert any("post_norm" in n for n in post_names) and not any("pre_norm" in n for n in post_names)
    assert any("pre_norm" in n for n in pre_names) and any("final_norm" in n for n in pre_names)


def test_sinusoidal_table_follows_the_paper():
    table = sinusoidal_table(torch.arange(50), 16)
    pos, i = 7, 3
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    # positions past the precomputed table come from the same formula
    encoding = SinusoidalPositionalEncoding(
        tiny_config(max_position_embeddings=10, d_model=16, encoder_attention_heads=2, decoder_attention_heads=2)
    )
    torch.testing.assert_close(encoding(20, offset=30), table[30:50])


def test_sinusoidal_extrapolates_and_learned_refuses():
    model = build(max_position_embeddings=16)
    long_ids = torch.randint(3, 40, (1, 40))
    out = model(input_ids=long_ids, decoder_input_ids=long_ids)
    assert torch.isfinite(out.logits).all() and out.logits.shape[1] == 40
    learned = build(max_position_embeddings=16, position_embedding_type="learned")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        learned(input_ids=long_ids, decoder_input_ids=long_ids[:, :4])


def test_weight_tying_options():
    tied = build()
    assert tied.lm_head.weight is tied.model.decoder.embeddings.embed_tokens.weight
    shared = build(share_embeddings=True)
    emb = shared.model.encoder.embeddings.embed_tokens.weight
    assert shared.model.decoder.embeddings.embed_tokens.weight is emb and shared.lm_head.weight is emb
    untied = build(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.decoder.embeddings.embed_tokens.weight


GENERATE_MODES = [
    {"num_beams": 1, "do_sample": False},
    {"num_beams": 3, "do_sample": False},
    {"num_beams": 1, "do_sample": True, "top_k": 5},
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_cached_equals_uncached_generation(attn, mode):
    model = build(attn, norm_position="pre")
    input_ids, attention_mask, _ = random_batch(model.config)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        runs.append(
            model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=8,
                min_new_tokens=8,
                use_cache=use_cache,
                **mode,
            )
        )
    assert runs[0].shape == (input_ids.shape[0], 9)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_cached_decoder_logits_match_full_forward(keyword):
    """Step-by-step decoding with the cache gives the same logits as one teacher-forced pass.

    The cache is accepted under both names: ``cache`` (what `generate()` passes from transformers
    5.24 on) and ``past_key_values`` (before), and comes back under the field this version declares.
    """
    model = build("eager")
    input_ids, attention_mask, labels = random_batch(model.config)
    full = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=labels).logits
    encoder_outputs = model.get_encoder()(input_ids, attention_mask)
    past, steps = None, []
    for i in range(labels.shape[1]):
        out = model(
            attention_mask=attention_mask,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=labels[:, i : i + 1],
            use_cache=True,
            **{keyword: past},
        )
        past = output_cache(out)
        assert past is not None and past.get_seq_length() == i + 1
        assert out[CACHE_OUTPUT_FIELD] is past  # where `generate()` reads it back
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="once"):
        other = EncoderDecoderCache(DynamicCache(), DynamicCache())
        model(encoder_outputs=encoder_outputs, decoder_input_ids=labels[:, :1], cache=past, past_key_values=other)


@pytest.mark.parametrize("overrides", OPTIONS)
def test_save_and_load_round_trip(tmp_path, overrides):
    model = build(**overrides)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded, info = LabelformerForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.eval()
    for module in loaded.modules():
        if isinstance(module, SinusoidalPositionalEncoding):
            torch.testing.assert_close(module.table, sinusoidal_table(torch.arange(module.table.shape[0]), module.dim))
    input_ids, attention_mask, labels = random_batch(model.config)
    torch.testing.assert_close(
        loaded(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits,
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits,
    )
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, num_beams=2)
    assert torch.equal(loaded.generate(**kwargs), model.generate(**kwargs))


def test_flex_attention_matches_eager_in_inference():
    """FlexAttention (forward only on CPU): same logits and the same cached generations as eager."""
    eager, flex = build("eager", norm_position="pre"), build("flex_attention", norm_position="pre")
    flex.load_state_dict(eager.state_dict())
    input_ids, attention_mask, labels = random_batch(eager.config)
    with torch.no_grad():
        try:
            flex_logits = flex(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        except (NotImplementedError, RuntimeError) as error:  # older torch builds without CPU flex
            pytest.skip(f"flex attention unavailable here: {error}")
        torch.testing.assert_close(
            flex_logits, eager(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        )
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6)
        assert torch.equal(flex.generate(**kwargs), eager.generate(**kwargs))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_static_decoding_cache_steps_match_the_full_decoder(backend):
    from modeling.modeling_labelformer import StaticDecodingCache

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
def test_fast_greedy_generate_equals_the_generic_loop(attn, lengths):
    # a small decoder vocabulary and large weights: EOS comes early in some rows, not in others
    torch.manual_seed(3)
    model = build(attn, decoder_vocab_size=6, init_std=0.5)
    input_ids, attention_mask, _ = random_batch(model.config, batch=8)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, num_beams=1, do_sample=False, **lengths)
    fast = model.generate(**kwargs)
    model.fast_greedy_generate = False
    generic = model.generate(**kwargs)
    assert torch.equal(fast, generic)
    finished_early = (fast[:, 1:-1] == model.config.eos_token_id).any(dim=1)
    assert finished_early.any() and not finished_early.all()  # both cases are exercised
    model.fast_greedy_generate = True
    assert model._plain_greedy_request((), kwargs) is not None
    # anything the fast loop does not implement goes to the generic loop
    assert model._plain_greedy_request((), {**kwargs, "repetition_penalty": 1.3}) is None
    assert model._plain_greedy_request((), {**kwargs, "num_beams": 2}) is None
    no_length = {k: v for k, v in kwargs.items() if k != "max_new_tokens"}
    assert model._plain_greedy_request((), no_length) is None  # length defaults are generate()'s business
    model.generation_config.no_repeat_ngram_size = 2
    assert model._plain_greedy_request((), kwargs) is None


def _ragged_batch(config, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of 11, 7, 3 and 11 real tokens, padded on the right (or the left)."""
    lengths = [11, 7, 3, 11]
    input_ids = torch.randint(3, config.vocab_size, (len(lengths), max(lengths)))
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        real = slice(max(lengths) - length, None) if left else slice(0, length)
        attention_mask[row, real] = 1
    return input_ids.masked_fill(attention_mask == 0, config.pad_token_id), attention_mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("overrides", OPTIONS[:3])
def test_unpadded_encoder_matches_the_padded_one(attn, left, overrides):
    """Packing real tokens (config.unpad_encoder) changes no real-position output or gradient."""
    packed = build(attn, **overrides).train()
    padded = build(attn, **overrides, unpad_encoder=False).train()
    padded.load_state_dict(packed.state_dict())  # the tiny config has no dropout: both runs are deterministic
    input_ids, attention_mask = _ragged_batch(packed.config, left)
    labels = torch.randint(3, packed.config.decoder_vocab_size, (input_ids.shape[0], 5))
    real = attention_mask.bool()
    outs = [
        m(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        for m in (packed, padded)
    ]
    for a, b in zip(outs[0].encoder_hidden_states, outs[1].encoder_hidden_states):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-4)
    assert outs[0].encoder_last_hidden_state[~real].abs().max() == 0  # padding rows are zeros
    assert outs[1].encoder_last_hidden_state[~real].abs().max() > 0  # (the padded path computes them)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=1e-5, rtol=1e-4)
    for out in outs:
        out.loss.backward()
    grads = dict(padded.named_parameters())
    for name, param in packed.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_token_packing_round_trip_and_when_it_is_used():
    from modeling.modeling_labelformer import TokenPacking, token_packing

    config = tiny_config()
    _, attention_mask = _ragged_batch(config)
    packing = TokenPacking(attention_mask)
    assert packing.num_tokens == int(attention_mask.sum())
    states = torch.randn(*attention_mask.shape, 5)
    packed = packing.pack(states)
    assert packed.shape == (packing.num_tokens, 5)
    torch.testing.assert_close(packing.unpack(packed), states * attention_mask[..., None])
    assert token_packing(config, attention_mask) is not None
    assert token_packing(config, torch.ones_like(attention_mask)) is None  # nothing to skip
    assert token_packing(config, None) is None
    assert token_packing(tiny_config(unpad_encoder=False), attention_mask) is None
