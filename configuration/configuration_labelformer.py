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

import math
from typing import Any

from transformers import PretrainedConfig

ACTIVATIONS = ("relu", "gelu")
POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned")
NORM_POSITIONS = ("post", "pre")
LABEL_ORDERS = ("frequency", "alphabetical", "random")
POOLINGS = ("mean", "first")
PARALLEL_LOSSES = ("ordered", "hungarian")

# Token ids shared by the tokenizer and every decoder vocabulary (see `train_tokenizer`).
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
NUM_SPECIAL_DECODER_TOKENS = 3  # pad, bos, eos: label k is decoder token k + 3


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")


def _is_finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class LabelformerConfig(PretrainedConfig):
    r"""Configuration of a Labelformer encoder-decoder and its heads.

    Args:
        vocab_size: Size of the encoder (source) vocabulary, i.e. of the tokenizer.
        decoder_vocab_size: Size of the decoder (target) vocabulary; ``None`` means the same as
            ``vocab_size``. The multi-label generation head sets it to ``num_labels + 3``.
        d_model: Width of every hidden state.
        encoder_layers / decoder_layers: Number of identical blocks in each stack (N in the paper).
        encoder_attention_heads / decoder_attention_heads: Heads per attention module; ``d_model``
            must be divisible by both.
        encoder_ffn_dim / decoder_ffn_dim: Inner width of the position-wise feed-forward network.
        activation_function: ``"relu"`` (the paper) or ``"gelu"``.
        dropout: Dropout on embeddings and on every sub-layer output before the residual add.
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
        label_order: Order in which a label set is written as a target sequence:
            ``"frequency"`` (most frequent training label first, as in SGM), ``"alphabetical"``,
            or ``"random"`` (re-shuffled every time a target is built).
        min_labels: Fewest labels the generation head emits before it may stop (0 allows an empty set).
        max_labels: Most labels the generation head emits; ``None`` means ``num_labels``.
        scheduled_sampling_prob: Probability of feeding the model's own prediction instead of the
            gold previous label during training (Bengio et al., 2015); 0 is plain teacher forcing.
        num_label_slots: Output slots of the parallel (non-autoregressive) label decoder;
            ``None`` means ``max_labels + 1`` (room for EOS).
        parallel_loss: Training loss of the parallel decoder: ``"ordered"`` or ``"hungarian"``.
        classifier_threshold: Decision threshold of the sigmoid (binary relevance) head.
        classifier_pooling: How the threshold head pools the encoder: ``"mean"`` or ``"first"``.
        classifier_dropout: Dropout before the threshold head's classifier.
        auxiliary_bce_weight: Weight of an auxiliary binary cross-entropy loss that the generation
            head adds in training: a linear classifier on the mean-pooled encoder predicts the
            label set directly, which gives the encoder a dense signal for every label (multi-task
            learning). 0 turns it off. Decoding uses that classifier only with ``global_label_logits``.
        global_label_logits: Generation head: add the logits of a document-level classifier
            (mean-pooled encoder output -> one logit per label, ``auxiliary_classifier``) to the
            label logits at every step, in training and in decoding. The decoder then starts from
            per-label evidence like the threshold head's and learns the order, the dependencies
            and where to stop. With ``auxiliary_bce_weight`` > 0 that classifier is also trained
            with BCE on its own.
        unpad_encoder: Run the encoder's per-token work (projections, feed-forward, norms) on the
            real tokens of a padded batch only and pad just around attention: the same outputs at
            real positions (zeros at padding), less compute the more padding a batch has.
        eos_logit_bias: Added to the EOS logit when the generation head decodes (never in the
            training loss): > 0 stops earlier (fewer labels per document), < 0 later.
        label_logit_bias: ``num_labels`` numbers added to the label logits when the generation head
            decodes, e.g. a logit adjustment ``-tau * log(label frequency)`` that favours rare labels
            (`prior_label_bias`); ``None`` adds nothing. `tune_decoding_bias` fits both on validation data.
        label_name_token_ids: Per label (in id order), the input-token ids of each word of its name
            (`label_name_token_ids` builds them with the model's tokenizer); a label is *named* in a
            document when every word of its name occurs in the input ids. ``None``: no label names.
        label_name_bias: Added to the logit of every label named in the input when a multi-label head
            decides (never in the training loss): the threshold head adds it before its threshold,
            the generation head at every decoding step. It lets the label names help rare labels
            the model saw too few examples of; 0 turns it off. Fit it on validation data
            (`tune_label_name_bias`, `tune_decoding_bias`).
        label_name_feature: Learn how much a label's name in the input counts, in training: the
            multi-label heads add ``(shared + weight[label])`` to the logit of every named label
            (`LabelNameEvidence`: one shared weight, starting at 1, plus one per label, starting at
            0), in the loss and when deciding. The per-label part lets the model discount names that
            occur without their label ("trade", "interest"); rare labels lean on the shared part.
            Needs ``label_name_token_ids``; ``label_name_bias`` still adds on top when deciding.
        lexical_scorer: Give a multi-label head a lexical label scorer (`LexicalLabelScorer`): a
            linear SVM over the tf-idf bag of the input-token ids, fitted on the training texts with
            a convex solver (`fit_lexical_scorer`), apart from the network. Its margins are added,
            times ``lexical_logit_weight``, to the label logits when the head decides (never in the
            training loss): a wide (bag-of-words) model beside the deep one.
        lexical_logit_weight: How much the lexical scorer's margins count when deciding; 0 turns
            them off. Needs ``lexical_scorer``. Fit it on validation data (`tune_decoding_bias`,
            `tune_decision_rule`).
        lexical_training_weight: Stacking: how much out-of-fold lexical margins count in the training
            loss. When a training batch passes ``lexical_margins`` ``[b, num_labels]`` (margins of
            scorers fit without the batch's documents, `out_of_fold_lexical_margins`), the head adds
            this weight times them to its label logits before the loss, so the network learns what
            the bag-of-words model misses. 0 (the default) trains without them. Needs ``lexical_scorer``.
        set_search_rounds: Generation head: refine each decoded label set by up to this many rounds
            of local search on the whole set's score: the generator's own log-probability of the set
            (in the label order, then EOS) plus, per label in it, the decision-time evidence
            (label-name bias, weighted lexical margins) and ``set_search_label_bias``. Each round
            tries adding or dropping one label (`modeling.set_search_labelformer`). It recovers
            labels that step-by-step decoding skips for good, e.g. "grain" once "corn" is written.
            0 (the default) turns it off; `tune_decoding_bias` turns it on when validation prefers it.
        set_search_candidates: How many labels (those with the most evidence plus first-step
            log-probability) set search tries adding to each set per round.
        set_search_label_bias: What each label adds to a set's score in set search: > 0 favours
            larger sets, < 0 smaller ones. Fit it on validation data (`tune_decoding_bias`).
    """

    model_type = "labelformer"
    keys_to_ignore_at_inference = ["past_key_values"]
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
        scheduled_sampling_prob: float = 0.0,
        num_label_slots: int | None = None,
        parallel_loss: str = "ordered",
        classifier_threshold: float = 0.5,
        classifier_pooling: str = "mean",
        classifier_dropout: float = 0.1,
        auxiliary_bce_weight: float = 0.0,
        global_label_logits: bool = False,
        unpad_encoder: bool = True,
        eos_logit_bias: float = 0.0,
        label_logit_bias: list[float] | None = None,
        label_name_token_ids: list[list[list[int]]] | None = None,
        label_name_bias: float = 0.0,
        label_name_feature: bool = False,
        lexical_scorer: bool = False,
        lexical_logit_weight: float = 0.0,
        lexical_training_weight: float = 0.0,
        set_search_rounds: int = 0,
        set_search_candidates: int = 6,
        set_search_label_bias: float = 0.0,
        pad_token_id: int = PAD_TOKEN_ID,
        bos_token_id: int = BOS_TOKEN_ID,
        eos_token_id: int = EOS_TOKEN_ID,
        decoder_start_token_id: int = BOS_TOKEN_ID,
        is_encoder_decoder: bool = True,
        **kwargs: Any,
    ) -> None:
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
        self.scheduled_sampling_prob = scheduled_sampling_prob
        self.num_label_slots = num_label_slots
        self.parallel_loss = parallel_loss
        self.classifier_threshold = classifier_threshold
        self.classifier_pooling = classifier_pooling
        self.classifier_dropout = classifier_dropout
        self.auxiliary_bce_weight = auxiliary_bce_weight
        self.global_label_logits = global_label_logits
        self.unpad_encoder = unpad_encoder
        self.eos_logit_bias = eos_logit_bias
        self.label_logit_bias = None if label_logit_bias is None else list(label_logit_bias)
        self.label_name_token_ids = label_name_token_ids
        self.label_name_bias = label_name_bias
        self.label_name_feature = label_name_feature
        self.lexical_scorer = lexical_scorer
        self.lexical_logit_weight = lexical_logit_weight
        self.lexical_training_weight = lexical_training_weight
        self.set_search_rounds = set_search_rounds
        self.set_search_candidates = set_search_candidates
        self.set_search_label_bias = set_search_label_bias
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
        _check_choice("parallel_loss", self.parallel_loss, PARALLEL_LOSSES)
        _check_choice("classifier_pooling", self.classifier_pooling, POOLINGS)
        for name in (
            "dropout",
            "attention_dropout",
            "activation_dropout",
            "label_smoothing",
            "scheduled_sampling_prob",
            "classifier_dropout",
        ):
            _check_probability(name, getattr(self, name))
        if not isinstance(self.auxiliary_bce_weight, (int, float)) or self.auxiliary_bce_weight < 0:
            raise ValueError(
                f"`auxiliary_bce_weight` must be a number >= 0 (0 turns it off), got {self.auxiliary_bce_weight!r}."
            )
        for name in ("unpad_encoder", "global_label_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if not _is_finite_number(self.eos_logit_bias):
            raise ValueError(f"`eos_logit_bias` must be a finite number (0 = no bias), got {self.eos_logit_bias!r}.")
        bias = self.label_logit_bias
        if bias is not None and (len(bias) != self.num_labels or not all(map(_is_finite_number, bias))):
            raise ValueError(
                f"`label_logit_bias` must be {self.num_labels} finite numbers (one per label, in id order) or None, "
                f"got {len(bias)} values."
            )
        self._validate_label_names()
        if not isinstance(self.lexical_scorer, bool):
            raise ValueError(f"`lexical_scorer` must be True or False, got {self.lexical_scorer!r}.")
        for key in ("lexical_logit_weight", "lexical_training_weight"):
            value = getattr(self, key)
            if not _is_finite_number(value) or value < 0:
                raise ValueError(f"`{key}` must be a finite number >= 0 (0 = off), got {value!r}.")
            if value and not self.lexical_scorer:
                raise ValueError(
                    f"`{key}` is set but the model has no lexical scorer: set lexical_scorer=True "
                    f"(and fit it with fit_lexical_scorer), or set {key}=0."
                )
        _check_int("set_search_rounds", self.set_search_rounds, 0)
        _check_int("set_search_candidates", self.set_search_candidates, 1)
        if not _is_finite_number(self.set_search_label_bias):
            raise ValueError(
                f"`set_search_label_bias` must be a finite number (0 = no reward), got {self.set_search_label_bias!r}."
            )
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be a positive number, got {self.layer_norm_eps!r}.")
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ValueError(f"`init_std` must be a positive number, got {self.init_std!r}.")
        if not 0.0 < self.classifier_threshold < 1.0:
            raise ValueError(f"`classifier_threshold` must be in (0, 1), got {self.classifier_threshold!r}.")
        if self.share_embeddings and self.vocab_size != self.decoder_vocab_size:
            raise ValueError(
                f"`share_embeddings=True` needs `vocab_size` ({self.vocab_size}) == `decoder_vocab_size` "
                f"({self.decoder_vocab_size}); set `share_embeddings=False` or make them equal."
            )
        _check_int("min_labels", self.min_labels, 0)
        if self.max_labels is not None:
            _check_int("max_labels", self.max_labels, 1)
            if self.max_labels < self.min_labels:
                raise ValueError(f"`max_labels` ({self.max_labels}) must be >= `min_labels` ({self.min_labels}).")
        if self.num_label_slots is not None:
            _check_int("num_label_slots", self.num_label_slots, 2)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.decoder_vocab_size:
                raise ValueError(
                    f"`{name}` ({value}) must be a valid decoder token id in [0, {self.decoder_vocab_size})."
                )

    def _validate_label_names(self) -> None:
        if not _is_finite_number(self.label_name_bias):
            raise ValueError(f"`label_name_bias` must be a finite number (0 = off), got {self.label_name_bias!r}.")
        if not isinstance(self.label_name_feature, bool):
            raise ValueError(f"`label_name_feature` must be True or False, got {self.label_name_feature!r}.")
        names = self.label_name_token_ids
        if names is None:
            if self.label_name_bias:
                raise ValueError(
                    "`label_name_bias` is set but `label_name_token_ids` is None: build them with "
                    "label_name_token_ids(labels, tokenizer) (or set label_name_bias=0)."
                )
            if self.label_name_feature:
                raise ValueError(
                    "`label_name_feature=True` needs `label_name_token_ids`: build them with "
                    "label_name_token_ids(labels, tokenizer) (or set label_name_feature=False)."
                )
            return
        if not isinstance(names, list) or len(names) != self.num_labels:
            count = len(names) if isinstance(names, list) else type(names).__name__
            raise ValueError(
                f"`label_name_token_ids` must hold one entry per label ({self.num_labels}), got {count}; "
                "rebuild it with label_name_token_ids(labels, tokenizer) for this label set."
            )
        for label, words in enumerate(names):
            if not isinstance(words, list) or not all(
                isinstance(word, list) and word and all(isinstance(t, int) and 0 <= t < self.vocab_size for t in word)
                for word in words
            ):
                raise ValueError(
                    f"`label_name_token_ids[{label}]` must be a list of non-empty lists of token ids in "
                    f"[0, {self.vocab_size}), got {words!r}."
                )

    @classmethod
    def from_labels(cls, labels: list[str], **kwargs: Any) -> LabelformerConfig:
        """A config for the multi-label heads: ``labels`` become ``id2label`` in the given order.

        Pass labels most frequent first (as `build_label_vocabulary` returns them) so that the
        ``"frequency"`` target order is ascending label id. The decoder vocabulary is the label
        set plus pad/bos/eos.
        """
        if len(set(labels)) != len(labels) or not all(isinstance(label, str) and label for label in labels):
            raise ValueError("`labels` must be distinct non-empty strings.")
        id2label = dict(enumerate(labels))
        kwargs.setdefault("share_embeddings", False)
        return cls(
            id2label=id2label,
            label2id={label: i for i, label in id2label.items()},
            decoder_vocab_size=len(labels) + NUM_SPECIAL_DECODER_TOKENS,
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
]
