"""Labelformer models, registered with the `transformers` Auto classes on import.

`AutoModelForSeq2SeqLM` maps `LabelformerConfig` to both generation heads; which one a saved
folder gets is decided by `config.architectures` (written by `save_pretrained`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
from transformers.pipelines import PIPELINE_REGISTRY

from configuration import LabelformerConfig

from .classification_labelformer import LabelformerForMultiLabelClassification
from .data_labelformer import (
    LengthGroupedSampler,
    MultiLabelCollator,
    build_label_vocabulary,
    load_multilabel_dataset,
    split_unknown_labels,
)
from .decoding_labelformer import LabelSetLogitsProcessor, StaticDecodingCache
from .ensemble_labelformer import LabelformerEnsembleForMultiLabelGeneration
from .generation_labelformer import LabelformerForMultiLabelGeneration
from .lexical_labelformer import LexicalLabelScorer, fit_lexical_scorer
from .modeling_labelformer import LabelformerForConditionalGeneration, LabelformerModel, LabelformerPreTrainedModel
from .multilabel_metrics import METRIC_PATH, compute_multilabel_metrics
from .parallel_labelformer import LabelformerForParallelLabelGeneration
from .pipeline_labelformer import TASK as PIPELINE_TASK
from .pipeline_labelformer import MultiLabelGenerationPipeline
from .tokenization_labelformer import train_tokenizer

AutoConfig.register(LabelformerConfig.model_type, LabelformerConfig, exist_ok=True)
AutoModel.register(LabelformerConfig, LabelformerModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(
    LabelformerConfig,
    (
        LabelformerForConditionalGeneration,
        LabelformerForMultiLabelGeneration,
        LabelformerEnsembleForMultiLabelGeneration,
        LabelformerForParallelLabelGeneration,
    ),
    exist_ok=True,
)
AutoModelForSequenceClassification.register(LabelformerConfig, LabelformerForMultiLabelClassification, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK,
    pipeline_class=MultiLabelGenerationPipeline,
    pt_model=(AutoModelForSeq2SeqLM, AutoModelForSequenceClassification),
    type="text",
)
# Saved folders name these classes in `auto_map` and carry their code.
LabelformerModel.register_for_auto_class("AutoModel")
LabelformerForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
LabelformerForMultiLabelGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
LabelformerEnsembleForMultiLabelGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
LabelformerForParallelLabelGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
LabelformerForMultiLabelClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "METRIC_PATH",
    "LabelSetLogitsProcessor",
    "LabelformerConfig",
    "LabelformerEnsembleForMultiLabelGeneration",
    "LabelformerForConditionalGeneration",
    "LabelformerForMultiLabelClassification",
    "LabelformerForMultiLabelGeneration",
    "LabelformerForParallelLabelGeneration",
    "LabelformerModel",
    "LabelformerPreTrainedModel",
    "LengthGroupedSampler",
    "MultiLabelCollator",
    "MultiLabelGenerationPipeline",
    "StaticDecodingCache",
    "build_label_vocabulary",
    "compute_multilabel_metrics",
    "LexicalLabelScorer",
    "fit_lexical_scorer",
    "load_multilabel_dataset",
    "split_unknown_labels",
    "train_tokenizer",
]
