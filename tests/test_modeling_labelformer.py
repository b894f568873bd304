"""The core encoder-decoder: shapes, masks, backends, options, caching, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from modeling import LabelformerForConditionalGeneration, LabelformerModel, modeling_labelformer
from modeling.decoding_labelformer import CACHE_OUTPUT_FIELD, output_cache
from modeling.modeling_labelformer import SinusoidalPositionalEncoding, sinusoidal_table
from modeling.packing_labelformer import TokenPacking, token_packing

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
def test_padding_free_encoder_matches_the_padded_one(monkeypatch, attn, left, overrides):
    """Packing real tokens (always on for padded batches) changes no real-position output or gradient."""
    packed = build(attn, **overrides).train()
    padded = build(attn, **overrides).train()
    padded.load_state_dict(packed.state_dict())  # the tiny config has no dropout: both runs are deterministic
    input_ids, attention_mask = _ragged_batch(packed.config, left)
    labels = torch.randint(3, packed.config.decoder_vocab_size, (input_ids.shape[0], 5))
    real = attention_mask.bool()
    outs = []
    for model, packing in ((packed, modeling_labelformer.token_packing), (padded, lambda attention_mask: None)):
        monkeypatch.setattr(modeling_labelformer, "token_packing", packing)
        outs.append(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True))
        outs[-1].loss.backward()
    for a, b in zip(outs[0].encoder_hidden_states, outs[1].encoder_hidden_states):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-4)
    assert outs[0].encoder_last_hidden_state[~real].abs().max() == 0  # padding rows are zeros
    assert outs[1].encoder_last_hidden_state[~real].abs().max() > 0  # (the padded path computes them)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=1e-5, rtol=1e-4)
    grads = dict(padded.named_parameters())
    for name, param in packed.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_token_packing_round_trip_and_when_it_is_used():
    config = tiny_config()
    _, attention_mask = _ragged_batch(config)
    packing = TokenPacking(attention_mask)
    assert packing.num_tokens == int(attention_mask.sum())
    states = torch.randn(*attention_mask.shape, 5)
    packed = packing.pack(states)
    assert packed.shape == (packing.num_tokens, 5)
    torch.testing.assert_close(packing.unpack(packed), states * attention_mask[..., None])
    assert token_packing(attention_mask) is not None
    assert token_packing(torch.ones_like(attention_mask)) is None  # nothing to skip
    assert token_packing(None) is None
