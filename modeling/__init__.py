"""Labelformer models, registered with the `transformers` Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from configuration import LabelformerConfig

from .modeling_labelformer import (
    LabelformerForConditionalGeneration,
    LabelformerModel,
    LabelformerPreTrainedModel,
)

AutoConfig.register(LabelformerConfig.model_type, LabelformerConfig, exist_ok=True)
AutoModel.register(LabelformerConfig, LabelformerModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(LabelformerConfig, LabelformerForConditionalGeneration, exist_ok=True)
# Saved folders name these classes in `auto_map` and carry their code.
LabelformerModel.register_for_auto_class("AutoModel")
LabelformerForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "LabelformerConfig",
    "LabelformerForConditionalGeneration",
    "LabelformerModel",
    "LabelformerPreTrainedModel",
]
