"""Labelformer configuration: `LabelformerConfig`, registered with `AutoConfig` on import."""

from transformers import AutoConfig

from .configuration_labelformer import LabelformerConfig

AutoConfig.register(LabelformerConfig.model_type, LabelformerConfig, exist_ok=True)
# Saved folders carry this file and name it in `auto_map`, so they load without our package.
LabelformerConfig.register_for_auto_class()

__all__ = ["LabelformerConfig"]
