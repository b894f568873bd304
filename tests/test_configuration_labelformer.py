"""LabelformerConfig: defaults, validation messages, serialisation."""

from __future__ import annotations

import pytest

from configuration import LabelformerConfig

from .conftest import tiny_config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 30, "encoder_attention_heads": 4}, "d_model"),
        ({"decoder_attention_heads": 5}, "d_model"),
        ({"activation_function": "swish"}, "activation_function"),
        ({"dropout": 1.0}, "dropout"),
        ({"attention_dropout": -0.1}, "attention_dropout"),
        ({"position_embedding_type": "rotary"}, "position_embedding_type"),
        ({"norm_position": "sandwich"}, "norm_position"),
        ({"encoder_layers": 0}, "encoder_layers"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"label_order": "length"}, "label_order"),
        ({"min_labels": 3, "max_labels": 2}, "max_labels"),
        ({"share_embeddings": True, "decoder_vocab_size": 11}, "share_embeddings"),
        ({"layer_norm_eps": 0}, "layer_norm_eps"),
        ({"classifier_threshold": 1.5}, "classifier_threshold"),
        ({"eos_token_id": 99}, "eos_token_id"),
        ({"unpad_encoder": "yes"}, "unpad_encoder"),
    ],
)
def test_bad_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}[`=]"):
        tiny_config(**overrides)


def test_hf_names_and_defaults():
    config = LabelformerConfig()
    assert config.model_type == "labelformer"
    assert config.is_encoder_decoder
    assert config.position_embedding_type == "sinusoidal" and config.norm_position == "post"
    # attribute_map lets generic code (caches, Trainer) find the sizes
    assert config.hidden_size == config.d_model
    assert config.num_hidden_layers == config.encoder_layers
    assert config.decoder_vocab_size == config.vocab_size


def test_round_trip_through_dict(tmp_path):
    config = tiny_config(norm_position="pre", activation_function="gelu", decoder_vocab_size=13)
    config.save_pretrained(tmp_path)
    loaded = LabelformerConfig.from_pretrained(tmp_path)
    for key in ("norm_position", "activation_function", "decoder_vocab_size", "d_model", "encoder_ffn_dim"):
        assert getattr(loaded, key) == getattr(config, key)
