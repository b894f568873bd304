"""LabelformerConfig: defaults, validation messages, label configs, serialisation."""

from __future__ import annotations

import inspect
import json

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
        ({"classifier_pooling": "max"}, "classifier_pooling"),
        ({"min_labels": 3, "max_labels": 2}, "max_labels"),
        ({"min_labels": -1}, "min_labels"),
        ({"num_label_slots": 1}, "num_label_slots"),
        ({"share_embeddings": True, "decoder_vocab_size": 11}, "share_embeddings"),
        ({"share_embeddings": 1}, "share_embeddings"),
        ({"lexical_scorer": "yes"}, "lexical_scorer"),
        ({"layer_norm_eps": 0}, "layer_norm_eps"),
        ({"init_std": float("nan")}, "init_std"),
        ({"eos_token_id": 99}, "eos_token_id"),
        ({"num_labels": 0}, "id2label"),
        ({"init_std": float("inf")}, "init_std"),
        ({"layer_norm_eps": float("nan")}, "layer_norm_eps"),
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
    assert config.lexical_scorer is False and config.min_labels == 1 and config.label_order == "frequency"
    # attribute_map lets generic code (caches, Trainer) find the sizes
    assert config.hidden_size == config.d_model
    assert config.num_hidden_layers == config.encoder_layers
    assert config.decoder_vocab_size == config.vocab_size
    assert not config.is_label_model


def test_the_config_has_its_37_fields_and_every_one_round_trips(tmp_path):
    fields = [
        name for name in inspect.signature(LabelformerConfig.__init__).parameters if name not in ("self", "kwargs")
    ]
    assert len(fields) == 37
    changed = dict(
        norm_position="pre", activation_function="gelu", decoder_vocab_size=13, d_model=64, encoder_ffn_dim=96,
        label_order="random", min_labels=0, max_labels=4, num_label_slots=6, classifier_pooling="first",
        lexical_scorer=True, position_embedding_type="learned", ensemble_size=3,
    )  # fmt: skip
    config = tiny_config(**changed)
    config.save_pretrained(tmp_path)
    loaded = LabelformerConfig.from_pretrained(tmp_path)
    for name in fields:
        assert getattr(loaded, name) == getattr(config, name), name
    for name, value in changed.items():
        assert getattr(loaded, name) == value, name


def test_label_configs():
    config = LabelformerConfig.from_labels(["earn", "acq", "grain"], vocab_size=50, max_labels=2)
    assert config.id2label == {0: "earn", 1: "acq", 2: "grain"} and config.label2id["grain"] == 2
    assert config.decoder_vocab_size == 3 + 3 and config.is_label_model
    assert config.share_embeddings is False
    assert config.effective_max_labels == 2 and config.effective_num_label_slots == 3
    unbounded = LabelformerConfig.from_labels(["a", "b"], vocab_size=50, max_labels=9, num_label_slots=4)
    assert unbounded.effective_max_labels == 2 and unbounded.effective_num_label_slots == 4
    with pytest.raises(ValueError, match="`labels` is empty"):
        LabelformerConfig.from_labels([], vocab_size=50)
    for bad in (["a", "a"], ["a", ""], ["a", 3]):
        with pytest.raises(ValueError, match="distinct non-empty strings"):
            LabelformerConfig.from_labels(bad, vocab_size=50)
    with pytest.raises(ValueError, match="`min_labels` \\(3\\) must be <= the number of labels \\(2\\)"):
        LabelformerConfig.from_labels(["a", "b"], vocab_size=50, min_labels=3)


@pytest.mark.parametrize("field", ["classifier_threshold", "eos_logit_bias", "unpad_encoder"])
def test_removed_fields_are_refused_with_their_replacement(field):
    from configuration.configuration_labelformer import REMOVED_FIELDS

    with pytest.raises(ValueError, match=field) as error:
        tiny_config(**{field: 0.4})
    assert REMOVED_FIELDS[field] in str(error.value)


def test_a_config_of_an_earlier_release_with_scheduled_sampling_still_loads(tmp_path):
    """A training-only field that was retired is dropped on reading, so saved models keep loading."""
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "scheduled_sampling_prob": 0.2}))
    loaded = LabelformerConfig.from_pretrained(tmp_path)
    assert not hasattr(loaded, "scheduled_sampling_prob")
    assert "scheduled_sampling_prob" not in loaded.to_dict()
