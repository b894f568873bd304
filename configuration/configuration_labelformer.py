"""Configuration of Labelformer, a from-scratch Transformer encoder-decoder.

Every hyperparameter of the model lives here, flat and validated: a bad value raises a
``ValueError`` that names the field and what is allowed. Field names follow the Hugging Face
conventions (``d_model``, ``encoder_layers``, ``decoder_ffn_dim``, ...) so that ``Trainer``,
``generate()`` and the KV caches find them.

This file is copied next to the weights by ``save_pretrained`` and loaded by
``AutoConfig.from_pretrained(..., trust_remote_code=True)``, so it must import nothing from our
own packages.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from transformers import PretrainedConfig

ACTIVATIONS = ("relu", "gelu")
POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned")
NORM_POSITIONS = ("post", "pre")
LABEL_ORDERS = ("frequency", "alphabetical", "random")
POOLINGS = ("mean", "first")

# Token ids shared by the tokenizer and every decoder vocabulary (see `train_tokenizer`).
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
NUM_SPECIAL_DECODER_TOKENS = 3  # pad, bos, eos: label k is decoder token k + 3


#: Training-only fields of earlier releases, dropped when an old config is read: scheduled sampling
#: changed nothing measurable (benchmarks/RESULTS.md) and was removed (2026-12-04).
RETIRED_TRAINING_FIELDS = ("scheduled_sampling_prob",)

#: Fields of earlier releases that no longer exist, and what replaces them. A config that still sets one
#: is refused instead of silently ignored (an old `classifier_threshold` would otherwise decide at 0.5).
REMOVED_FIELDS = {
    "classifier_threshold": "the threshold head folds its threshold into the classifier bias: model.fold_threshold(t)",
    "classifier_dropout": "the threshold head uses `dropout`",
    "lexical_logit_weight": "the scale is the `scale` buffer of the model's LexicalLabelScorer",
    "unpad_encoder": "the padding-free encoder is always on for padded batches",
    "global_label_logits": "the generation head always adds its `document_classifier`'s logits at every step",
    **{
        name: "removed with the decision-time add-ons (2026-12); retrain with this release"
        for name in (
            "eos_logit_bias", "label_logit_bias", "label_name_token_ids", "label_name_bias", "label_name_feature",
            "lexical_training_weight", "set_search_rounds", "set_search_candidates", "set_search_label_bias",
            "auxiliary_bce_weight", "parallel_loss",
        )
    },
}  # fmt: skip


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")


def label_fingerprint(id2label: dict[int, str]) -> str:
    """A short hash of the label names in id order: what the label head's rows were trained as."""
    names = [id2label[i] for i in sorted(id2label)]
    return hashlib.sha256(json.dumps(names, ensure_ascii=False).encode()).hexdigest()[:16]


def _is_finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class LabelformerConfig(PretrainedConfig):
    r"""Configuration of a Labelformer encoder-decoder and its heads (architecture and task fields only).

    Args:
        vocab_size: Size of the encoder (source) vocabulary, i.e. of the tokenizer.
        decoder_vocab_size: Size of the decoder (target) vocabulary; ``None`` means the same as
            ``vocab_size``. The multi-label heads set it to ``num_labels + 3`` (`from_labels`).
        d_model: Width of every hidden state.
        encoder_layers / decoder_layers: Number of identical blocks in each stack (N in the paper).
        encoder_attention_heads / decoder_attention_heads: Heads per attention module; ``d_model``
            must be divisible by both.
        encoder_ffn_dim / decoder_ffn_dim: Inner width of the position-wise feed-forward network.
        activation_function: ``"relu"`` (the paper) or ``"gelu"``.
        dropout: Dropout on embeddings, on every sub-layer output before the residual add, and before
            the threshold head's classifier.
        attention_dropout: Dropout on the attention probabilities.
        activation_dropout: Dropout after the feed-forward activation.
        position_embedding_type: ``"sinusoidal"`` (fixed, extrapolates) or ``"learned"``.
        max_position_embeddings: Longest sequence a learned table covers; the sinusoidal table is
            precomputed to this length and grown on demand.
        norm_position: ``"post"`` (Add & Norm after each sub-layer, as in the paper) or ``"pre"``
            (LayerNorm before each sub-layer plus a final LayerNorm per stack).
        layer_norm_eps: Epsilon of every LayerNorm.
        scale_embedding: Multiply token embeddings by ``sqrt(d_model)`` (paper section 3.4).
        share_embeddings: One embedding matrix for encoder and decoder (needs equal vocabularies).
        tie_word_embeddings: Tie the decoder input embedding and the output projection.
        label_smoothing: Label smoothing of the cross-entropy loss, in [0, 1).
        init_std: Standard deviation of the normal initialisation of linear and embedding weights.
        use_cache: Use the key/value cache when generating.
        label_order: Order in which a label set is written as a target sequence:
            ``"frequency"`` (most frequent training label first, as in SGM), ``"alphabetical"``,
            or ``"random"`` (re-shuffled every time a target is built).
        min_labels: Fewest labels the generation heads emit before they may stop (0 allows an empty set).
        max_labels: Most labels the generation heads emit; ``None`` means ``num_labels``.
        num_label_slots: Output slots of the parallel (non-autoregressive) label decoder;
            ``None`` means ``max_labels + 1`` (room for EOS).
        classifier_pooling: How the threshold head pools the encoder: ``"mean"`` or ``"first"``.
        lexical_scorer: The multi-label heads hold the optional hybrid part `LexicalLabelScorer`
            (``modeling/lexical_labelformer.py``): a linear model over the tf-idf bag of the input ids,
            fit with scikit-learn, whose scaled margins ``forward()`` adds to the label logits.
        ensemble_size: How many Transformers (encoder-decoders of this shape) the label-generation
            model holds: 1 for `LabelformerForMultiLabelGeneration`; 2 or more for
            `LabelformerEnsembleForMultiLabelGeneration`, whose ``forward()`` averages their probabilities.
        label_fingerprint: Hash of the label names in id order (`label_fingerprint`), set by
            `from_labels`; loading checks ``id2label`` against it, so renamed or reordered labels are
            refused instead of silently mislabelling predictions. ``None``: not checked.
        tokenizer_fingerprint: Hash of the training tokenizer's vocabulary, set by the training
            script; `predict_labels` refuses a different tokenizer. ``None``: only sizes are checked.
    """

    model_type = "labelformer"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
    }

    def __init__(
        self,
        vocab_size: int = 16000,
        decoder_vocab_size: int | None = None,
        d_model: int = 256,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        encoder_attention_heads: int = 4,
        decoder_attention_heads: int = 4,
        encoder_ffn_dim: int = 1024,
        decoder_ffn_dim: int = 1024,
        activation_function: str = "relu",
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        position_embedding_type: str = "sinusoidal",
        max_position_embeddings: int = 512,
        norm_position: str = "post",
        layer_norm_eps: float = 1e-5,
        scale_embedding: bool = True,
        share_embeddings: bool = False,
        tie_word_embeddings: bool = True,
        label_smoothing: float = 0.0,
        init_std: float = 0.02,
        use_cache: bool = True,
        label_order: str = "frequency",
        min_labels: int = 1,
        max_labels: int | None = None,
        num_label_slots: int | None = None,
        classifier_pooling: str = "mean",
        lexical_scorer: bool = False,
        ensemble_size: int = 1,
        label_fingerprint: str | None = None,
        tokenizer_fingerprint: str | None = None,
        pad_token_id: int = PAD_TOKEN_ID,
        bos_token_id: int = BOS_TOKEN_ID,
        eos_token_id: int = EOS_TOKEN_ID,
        decoder_start_token_id: int = BOS_TOKEN_ID,
        is_encoder_decoder: bool = True,
        **kwargs: Any,
    ) -> None:
        for name in RETIRED_TRAINING_FIELDS:  # never shaped a prediction: an old config still loads
            kwargs.pop(name, None)
        removed = sorted(REMOVED_FIELDS.keys() & kwargs.keys())
        if removed:
            raise ValueError(
                f"`{removed[0]}` is no longer a LabelformerConfig field: {REMOVED_FIELDS[removed[0]]}. "
                f"Remove {removed} from the config."
            )
        self.vocab_size = vocab_size
        self.decoder_vocab_size = vocab_size if decoder_vocab_size is None else decoder_vocab_size
        self.d_model = d_model
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_attention_heads = decoder_attention_heads
        self.encoder_ffn_dim = encoder_ffn_dim
        self.decoder_ffn_dim = decoder_ffn_dim
        self.activation_function = activation_function
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.position_embedding_type = position_embedding_type
        self.max_position_embeddings = max_position_embeddings
        self.norm_position = norm_position
        self.layer_norm_eps = layer_norm_eps
        self.scale_embedding = scale_embedding
        self.share_embeddings = share_embeddings
        self.label_smoothing = label_smoothing
        self.init_std = init_std
        self.use_cache = use_cache
        self.label_order = label_order
        self.min_labels = min_labels
        self.max_labels = max_labels
        self.num_label_slots = num_label_slots
        self.classifier_pooling = classifier_pooling
        self.lexical_scorer = lexical_scorer
        self.ensemble_size = ensemble_size
        self.label_fingerprint = label_fingerprint
        self.tokenizer_fingerprint = tokenizer_fingerprint
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            is_encoder_decoder=is_encoder_decoder,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_labelformer()

    def validate_labelformer(self) -> None:
        """Raise ``ValueError`` naming the first field whose value is not allowed."""
        for name in ("vocab_size", "decoder_vocab_size", "d_model", "max_position_embeddings"):
            _check_int(name, getattr(self, name), 1)
        for name in ("encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads"):
            _check_int(name, getattr(self, name), 1)
        for name in ("encoder_ffn_dim", "decoder_ffn_dim"):
            _check_int(name, getattr(self, name), 1)
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads != 0:
                raise ValueError(
                    f"`d_model` ({self.d_model}) must be divisible by `{side}_attention_heads` ({heads}); "
                    f"pick a head count that divides it, e.g. {[h for h in (1, 2, 4, 8, 16) if self.d_model % h == 0]}."
                )
        _check_choice("activation_function", self.activation_function, ACTIVATIONS)
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("label_order", self.label_order, LABEL_ORDERS)
        _check_choice("classifier_pooling", self.classifier_pooling, POOLINGS)
        for name in (
            "dropout",
            "attention_dropout",
            "activation_dropout",
            "label_smoothing",
        ):
            _check_probability(name, getattr(self, name))
        for name in ("lexical_scorer", "scale_embedding", "share_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        for name in ("layer_norm_eps", "init_std"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value <= 0:
                raise ValueError(f"`{name}` must be a finite positive number, got {value!r}.")
        if self.share_embeddings and self.vocab_size != self.decoder_vocab_size:
            raise ValueError(
                f"`share_embeddings=True` needs `vocab_size` ({self.vocab_size}) == `decoder_vocab_size` "
                f"({self.decoder_vocab_size}); set `share_embeddings=False` or make them equal."
            )
        if self.num_labels < 1:
            raise ValueError("`id2label` is empty (`num_labels` 0): a Labelformer config needs at least one label.")
        _check_int("min_labels", self.min_labels, 0)
        _check_int("ensemble_size", self.ensemble_size, 1)
        if self.max_labels is not None:
            _check_int("max_labels", self.max_labels, 1)
            if self.max_labels < self.min_labels:
                raise ValueError(f"`max_labels` ({self.max_labels}) must be >= `min_labels` ({self.min_labels}).")
        if self.is_label_model and self.min_labels > self.num_labels:
            raise ValueError(f"`min_labels` ({self.min_labels}) must be <= the number of labels ({self.num_labels}).")
        if self.num_label_slots is not None:
            _check_int("num_label_slots", self.num_label_slots, 2)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.decoder_vocab_size:
                raise ValueError(
                    f"`{name}` ({value}) must be a valid decoder token id in [0, {self.decoder_vocab_size})."
                )

    def verify_label_fingerprint(self) -> None:
        """Raise ``ValueError`` if ``id2label``/``label2id`` disagree with each other or with ``label_fingerprint``."""
        if self.label2id and {v: k for k, v in self.id2label.items()} != {k: int(v) for k, v in self.label2id.items()}:
            raise ValueError(
                "`label2id` is not the inverse of `id2label`: restore the label maps the model was saved with."
            )
        if self.label_fingerprint is not None and label_fingerprint(self.id2label) != self.label_fingerprint:
            raise ValueError(
                "`id2label` differs from the labels the model was trained with (its `label_fingerprint` "
                f"{self.label_fingerprint} does not match): labels were renamed or reordered, which would mislabel "
                "every prediction. Restore the saved id2label/label2id."
            )

    @property
    def is_label_model(self) -> bool:
        """Whether the decoder vocabulary is this config's label set plus pad/bos/eos (`from_labels`)."""
        return self.decoder_vocab_size == self.num_labels + NUM_SPECIAL_DECODER_TOKENS

    @classmethod
    def from_labels(cls, labels: list[str], **kwargs: Any) -> LabelformerConfig:
        """A config for the multi-label heads: ``labels`` become ``id2label`` in the given order.

        Pass labels most frequent first (as `build_label_vocabulary` returns them) so that the
        ``"frequency"`` target order is ascending label id. The decoder vocabulary is the label
        set plus pad/bos/eos.
        """
        if not labels:
            raise ValueError("`labels` is empty: a multi-label head needs at least one label.")
        if len(set(labels)) != len(labels) or not all(isinstance(label, str) and label for label in labels):
            raise ValueError("`labels` must be distinct non-empty strings.")
        id2label = dict(enumerate(labels))
        kwargs.setdefault("share_embeddings", False)
        return cls(
            id2label=id2label,
            label2id={label: i for i, label in id2label.items()},
            decoder_vocab_size=len(labels) + NUM_SPECIAL_DECODER_TOKENS,
            label_fingerprint=label_fingerprint(id2label),
            **kwargs,
        )

    @property
    def effective_max_labels(self) -> int:
        """``max_labels``, or the number of labels when unset."""
        return min(self.max_labels, self.num_labels) if self.max_labels is not None else self.num_labels

    @property
    def effective_num_label_slots(self) -> int:
        """Slots of the parallel decoder: ``num_label_slots`` or ``max_labels + 1``."""
        return self.num_label_slots if self.num_label_slots is not None else self.effective_max_labels + 1


__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "NUM_SPECIAL_DECODER_TOKENS",
    "PAD_TOKEN_ID",
    "LabelformerConfig",
    "label_fingerprint",
]
