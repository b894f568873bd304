"""Multi-label heads on the Labelformer backbone.

- `LabelformerForMultiLabelGeneration`: multi-label classification as label-sequence generation
  (SGM, Yang et al. 2018). The decoder vocabulary is the label set plus pad/bos/eos (label ``k`` is
  token ``k + 3``); the target is the document's labels in a fixed order followed by EOS, so the
  model decides how many labels a document gets. Decoding is constrained by
  `LabelSetLogitsProcessor`: label tokens only, no label twice, EOS only after ``min_labels``,
  at most ``max_labels``.
- `LabelformerForMultiLabelClassification`: the binary-relevance baseline, a sigmoid per label
  on the mean-pooled encoder with a decision threshold tuned on validation data.

Both answer `predict_labels(texts)` with label names (and scores).

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.utils import logging

from .configuration_labelformer import EOS_TOKEN_ID, NUM_SPECIAL_DECODER_TOKENS, LabelformerConfig
from .label_names_labelformer import LabelNameEvidence, named_labels
from .lexical_labelformer import LEXICAL_LOGIT_WEIGHTS, LexicalLabelScorer
from .modeling_labelformer import (
    LabelformerEncoder,
    LabelformerForConditionalGeneration,
    LabelformerPreTrainedModel,
    StaticDecodingCache,
    add_optional,
    sequence_cross_entropy,
    shift_tokens_right,
)
from .pipeline_labelformer import TASK as PIPELINE_TASK
from .pipeline_labelformer import MultiLabelGenerationPipeline
from .set_search_labelformer import search_label_sets

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Constrained decoding
# ---------------------------------------------------------------------------------------------


def label_rules(used: torch.Tensor, num_labels: torch.Tensor, min_labels: int, max_labels: int) -> torch.Tensor:
    """The label-set rules for the next token, given what has been emitted.

    Only label tokens or EOS; never a label already used; EOS only once ``min_labels`` labels are
    out (or no label is left); no label once ``max_labels`` are out.

    Args:
        used: ``[..., v]`` boolean, True for tokens already in the sequence.
        num_labels: ``[...]`` labels emitted so far.

    Returns:
        ``[..., v]`` boolean: the tokens that may come next.
    """
    allowed = ~used
    allowed[..., :NUM_SPECIAL_DECODER_TOKENS] = False
    allowed[..., NUM_SPECIAL_DECODER_TOKENS:] &= (num_labels < max_labels)[..., None]
    nothing_left = ~allowed[..., NUM_SPECIAL_DECODER_TOKENS:].any(dim=-1)
    allowed[..., EOS_TOKEN_ID] = (num_labels >= min_labels) | nothing_left
    return allowed


def allowed_label_tokens(prefixes: torch.Tensor, vocab_size: int, min_labels: int, max_labels: int) -> torch.Tensor:
    """`label_rules` after every prefix of every sequence.

    Args:
        prefixes: ``[n, t]`` decoder inputs (start token first).

    Returns:
        ``[n, t, vocab_size]`` boolean: entry ``[i, j, v]`` says token ``v`` may follow ``prefixes[i, :j+1]``.
    """
    used = nn.functional.one_hot(prefixes, vocab_size).cumsum(dim=1) > 0  # [n, t, v]
    num_labels = (prefixes >= NUM_SPECIAL_DECODER_TOKENS).long().cumsum(dim=1)  # [n, t]
    return label_rules(used, num_labels, min_labels, max_labels)


class LabelSetLogitsProcessor(LogitsProcessor):
    """Constrain `generate()` to valid label sets; works per beam, with greedy, beam search and sampling.

    The result is renormalised over the allowed tokens (log-softmax): beam search then ranks
    hypotheses by the constrained distribution (the one `label_scores` reports), instead of
    charging a hypothesis for the probability its model still gives to labels it already used.
    Greedy and sampled choices are the same either way.
    """

    def __init__(self, min_labels: int, max_labels: int) -> None:
        self.min_labels = min_labels
        self.max_labels = max_labels

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` ``[n, t]`` so far, ``scores`` ``[n, v]`` -> log-probabilities with forbidden tokens at -inf."""
        allowed = allowed_label_tokens(input_ids, scores.shape[-1], self.min_labels, self.max_labels)[:, -1]
        return scores.float().masked_fill(~allowed, float("-inf")).log_softmax(-1).to(scores.dtype)


class DecodingBiasLogitsProcessor(LogitsProcessor):
    """Add a decoding bias inside `generate()`: the config's (`LabelformerForMultiLabelGeneration.decoding_bias`,
    ``[v]``) or one per input row (the label-name bias, ``[b, v]``; beam search's ``b * num_beams``
    rows take their input row's).

    The result is renormalised (log-softmax), so beam search, which hands processors
    log-probabilities, ranks hypotheses by the biased distribution; greedy choices are the same as
    on biased logits.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``scores`` ``[n, v]`` -> ``log_softmax(scores + bias)`` ``[n, v]``."""
        bias = self.bias.to(scores.device)
        if bias.dim() == 2 and bias.shape[0] != scores.shape[0]:
            bias = bias.repeat_interleave(scores.shape[0] // bias.shape[0], dim=0)
        return (scores.float() + bias).log_softmax(-1).to(scores.dtype)


def prior_label_bias(label_counts: Sequence[int], weight: float) -> list[float]:
    """Logit adjustment for the long tail (Menon et al., 2021): ``-weight * log(frequency)``, centred on 0.

    Args:
        label_counts: training documents per label, in label-id order (0 counts as 1).
        weight: 0 gives no bias; larger values favour rare labels more.

    Returns:
        One bias per label for ``config.label_logit_bias``; they average 0, so the bias moves
        probability between labels and leaves the choice of EOS to ``eos_logit_bias``.
    """
    if weight < 0:
        raise ValueError(f"`weight` must be >= 0, got {weight!r}.")
    log_counts = torch.tensor([float(max(c, 1)) for c in label_counts]).log()
    bias = -weight * (log_counts - log_counts.mean())
    return bias.tolist()


# ---------------------------------------------------------------------------------------------
# predict_labels, shared by every multi-label head
# ---------------------------------------------------------------------------------------------


def check_texts(texts: str | Sequence[str], allow_empty: bool = False) -> list[str]:
    """Validate raw texts; a single string counts as a list of one.

    Raises:
        ValueError: a text is not a string, or is empty/blank (unless ``allow_empty``); names its index.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence):
        raise ValueError(f"`texts` must be a string or a list of strings, got {type(texts).__name__}.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"Text at index {i} is a {type(text).__name__}, not a string.")
        if not allow_empty and not text.strip():
            raise ValueError(f"Text at index {i} is empty; pass a non-empty document (or allow_empty=True).")
    return list(texts)


class MultiLabelPredictionMixin:
    """`predict_labels` and the pipeline entry for a head that implements ``predict_batch``."""

    config: LabelformerConfig
    #: The auto class the ``"multi-label-generation"`` pipeline loads this head with.
    pipeline_auto_class = "AutoModelForSeq2SeqLM"

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """Save as usual, naming our pipeline in ``config.custom_pipelines`` (its file travels with the code)."""
        impl = f"{MultiLabelGenerationPipeline.__module__.rsplit('.', 1)[-1]}.{MultiLabelGenerationPipeline.__name__}"
        self.config.custom_pipelines = {PIPELINE_TASK: {"impl": impl, "pt": [self.pipeline_auto_class], "type": "text"}}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def label_name_logit_bias(self, input_ids: torch.Tensor, named: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[b, num_labels]`` float: ``config.label_name_bias`` at the labels each row of ``input_ids``
        ``[b, s]`` names (`named_labels`, or ``named`` ``[b, num_labels]`` when the caller has it), else 0;
        ``None`` when the bias is off."""
        if not self.config.label_name_bias or self.config.label_name_token_ids is None:
            return None
        named = named_labels(input_ids, self.config.label_name_token_ids) if named is None else named
        return named.float() * self.config.label_name_bias

    def learned_name_logits(self, input_ids: torch.Tensor, named: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[b, num_labels]``: the learned label-name term (`LabelNameEvidence`) for ids ``[b, s]`` (or their
        ``named`` ``[b, num_labels]``), or ``None`` without ``config.label_name_feature``. Part of the
        model's logits, in training too."""
        evidence = getattr(self, "label_name_evidence", None)
        if evidence is None:
            return None
        if input_ids is None and named is None:
            raise ValueError(
                "This model was trained with `label_name_feature`: it matches label names in `input_ids`, so pass "
                "`input_ids` (not only `inputs_embeds` or `encoder_outputs`)."
            )
        return evidence(named_labels(input_ids, self.config.label_name_token_ids) if named is None else named)

    def named_for_decoding(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """`named_labels` of ``input_ids`` ``[b, s]`` -> ``[b, num_labels]``, computed once for the label-name
        bias and the learned term; ``None`` when neither is on."""
        names = self.config.label_name_token_ids
        if names is None or not (self.config.label_name_bias or self.config.label_name_feature):
            return None
        return named_labels(input_ids, names)

    def lexical_margins(self, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        """``[b, num_labels]`` float32: the lexical scorer's SVM margins for ids ``[b, s]`` (unweighted), or
        ``None`` when the model has no lexical scorer (``config.lexical_scorer``)."""
        scorer = getattr(self, "lexical_label_scorer", None)
        if scorer is None:
            return None
        if input_ids is None:
            raise ValueError(
                "This model has a lexical scorer: it reads the bag of `input_ids`, so pass `input_ids` "
                "(not only `inputs_embeds` or `encoder_outputs`)."
            )
        if not scorer.is_fitted:
            raise ValueError(
                "The lexical scorer is not fitted: call fit_lexical_scorer(model, tokenizer, texts, label_sets) "
                "first (train_multilabel.py --lexical_scorer does), or set lexical_logit_weight=0."
            )
        return scorer(input_ids)

    def lexical_logit_bias(self, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        """``[b, num_labels]`` float: ``config.lexical_logit_weight`` times `lexical_margins` of ids ``[b, s]``,
        or ``None`` when the weight is 0."""
        if not self.config.lexical_logit_weight:
            return None
        return self.lexical_margins(input_ids) * self.config.lexical_logit_weight

    def lexical_training_logits(self, lexical_margins: torch.Tensor | None) -> torch.Tensor | None:
        """``[b, num_labels]`` float: ``config.lexical_training_weight`` times the out-of-fold margins a
        training batch passes (stacking), or ``None`` when there are none. Margins without a training
        weight raise: they would be silently ignored."""
        if lexical_margins is None:
            return None
        weight = self.config.lexical_training_weight
        if not weight:
            raise ValueError(
                "`lexical_margins` were passed but config.lexical_training_weight is 0: set it (> 0) to train "
                "with out-of-fold lexical margins (stacking), or leave `lexical_margins` out."
            )
        if lexical_margins.dim() != 2 or lexical_margins.shape[1] != self.config.num_labels:
            raise ValueError(
                f"`lexical_margins` must be [batch, num_labels={self.config.num_labels}], "
                f"got shape {tuple(lexical_margins.shape)}."
            )
        return lexical_margins.float() * weight

    def set_lexical_logit_weight(self, weight: float) -> None:
        """Set (and validate) ``config.lexical_logit_weight``; `save_pretrained` keeps it."""
        old = self.config.lexical_logit_weight
        self.config.lexical_logit_weight = weight
        try:
            self.config.validate_labelformer()
        except ValueError:
            self.config.lexical_logit_weight = old
            raise

    def configure_set_search(self, rounds: int, label_bias: float = 0.0) -> None:
        """Generation heads: set (and validate) ``config.set_search_rounds`` (0 = off) and
        ``config.set_search_label_bias``; `save_pretrained` keeps them."""
        old = (self.config.set_search_rounds, self.config.set_search_label_bias)
        self.config.set_search_rounds, self.config.set_search_label_bias = rounds, label_bias
        try:
            self.config.validate_labelformer()
        except ValueError:
            self.config.set_search_rounds, self.config.set_search_label_bias = old
            raise

    def set_label_name_bias(self, bias: float, name_token_ids: Sequence[Sequence[Sequence[int]]] | None = None) -> None:
        """Set (and validate) ``config.label_name_bias`` (and, if given, ``label_name_token_ids``);
        `save_pretrained` keeps them."""
        old = (self.config.label_name_bias, self.config.label_name_token_ids)
        self.config.label_name_bias = bias
        if name_token_ids is not None:
            self.config.label_name_token_ids = [[list(map(int, word)) for word in label] for label in name_token_ids]
        try:
            self.config.validate_labelformer()
        except ValueError:
            self.config.label_name_bias, self.config.label_name_token_ids = old
            raise

    def _resolve_tokenizer(self, tokenizer: Any | None) -> Any:
        if tokenizer is not None:
            return tokenizer
        cached = getattr(self, "_labelformer_tokenizer", None)
        if cached is not None:
            return cached
        from transformers import AutoTokenizer

        source = getattr(self, "name_or_path", "") or ""
        try:
            # Our tokenizers are plain `PreTrainedTokenizerFast`s: no custom code to trust.
            self._labelformer_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except Exception as error:  # no tokenizer saved beside the model, or no path at all
            raise ValueError(
                "predict_labels needs a tokenizer: pass tokenizer=..., or load the model from a folder "
                f"that holds its tokenizer (tried {source!r}: {error})."
            ) from error
        return self._labelformer_tokenizer

    @torch.inference_mode()
    def predict_labels(
        self,
        texts: str | Sequence[str],
        tokenizer: Any | None = None,
        num_beams: int = 1,
        batch_size: int = 32,
        return_scores: bool = False,
        max_length: int | None = None,
        allow_empty: bool = False,
    ) -> list[list[str]] | list[dict[str, float]]:
        """Predict the label set of each raw text.

        Args:
            texts: one string or a list of strings.
            tokenizer: the model's tokenizer; by default the one saved beside the model.
            num_beams: beam width for the generation heads (1 = greedy); ignored by the threshold head.
            batch_size: texts per forward pass (texts are sorted by length to pad little).
            return_scores: return ``{label: score}`` dicts instead of lists of names.
            max_length: truncate texts to this many tokens (default: the tokenizer's limit).
            allow_empty: accept empty texts (the model then sees only EOS).

        Returns:
            One entry per text, in input order: a list of label names, or with ``return_scores``
            a dict ``{label: probability}`` in the order the labels were predicted.
        """
        texts = check_texts(texts, allow_empty)
        tokenizer = self._resolve_tokenizer(tokenizer)
        if len(tokenizer) > self.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's `vocab_size` is "
                f"{self.config.vocab_size}: this tokenizer does not belong to this model."
            )
        if max_length is None:
            max_length = min(tokenizer.model_max_length, 100_000)
            if self.config.position_embedding_type == "learned":
                max_length = min(max_length, self.config.max_position_embeddings)
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[dict[str, float] | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in chunk], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            ).to(self.device)
            for i, scored in zip(chunk, self.predict_batch(batch["input_ids"], batch["attention_mask"], num_beams)):
                results[i] = scored
        self.train(was_training)
        if return_scores:
            return results
        return [list(scored) for scored in results]

    def predict_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> list[dict[str, float]]:
        """Tokenized batch ``[b, s]`` -> per row ``{label: score}`` in prediction order."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Label-sequence generation head
# ---------------------------------------------------------------------------------------------


def _check_label_vocabulary(config: LabelformerConfig) -> None:
    expected = config.num_labels + NUM_SPECIAL_DECODER_TOKENS
    if config.decoder_vocab_size != expected:
        raise ValueError(
            f"`decoder_vocab_size` is {config.decoder_vocab_size} but a label decoder over {config.num_labels} "
            f"labels needs {expected} (labels + pad/bos/eos). Build the config with "
            "LabelformerConfig.from_labels(labels, ...)."
        )


class _GreedyLabelDecoder:
    """Constrained greedy label decoding on static decoding caches, for one batch shape.

    Each step runs `LabelformerDecoder.decode_step` + ``lm_head`` and applies the label-set rules
    as running state (``used`` labels, label ``count``, rows ``done``). With several ``models``
    (an ensemble sharing one label vocabulary) each step's distribution is the mean of theirs.
    Eagerly it stops once every row has emitted EOS. With ``cuda_graph`` the whole loop (all
    ``steps`` steps and the rules) is captured once as one CUDA graph and later calls replay it:
    one launch per batch instead of hundreds of small kernels, and no host synchronisation
    between steps.
    """

    def __init__(self, models: Sequence[Any], batch: int, source_len: int, steps: int, device: torch.device,
                 dtype: torch.dtype, cuda_graph: bool) -> None:  # fmt: skip
        self.models = [weakref.proxy(m) for m in models]  # the registry holds decoders per model: no cycle
        self.caches = [StaticDecodingCache(m.model.decoder, batch, source_len, steps, device, dtype) for m in models]
        #: Each model's `decoding_bias`, refreshed on every call (static tensors a CUDA graph can read).
        self.biases = [torch.zeros(m.config.decoder_vocab_size, device=device) for m in models]
        #: Per model, what decoding adds to each row (`decoder_row_bias`: label-name bias and learned term).
        self.row_biases = [torch.zeros(batch, m.config.decoder_vocab_size, device=device) for m in models]
        self.batch, self.steps, self.device = batch, steps, device
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def _decode(self, early_exit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.models[0].config
        batch, device = self.batch, self.device
        current = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long, device=device)
        used = torch.zeros(batch, config.decoder_vocab_size, dtype=torch.bool, device=device)
        count = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, scores = [], []
        for step in range(self.steps):
            allowed = label_rules(used, count, config.min_labels, config.effective_max_labels)
            probs = sum(
                (model.lm_head(model.model.decoder.decode_step(current, cache, step)).float() + bias + row_bias)
                .masked_fill(~allowed, float("-inf"))
                .softmax(-1)
                for model, cache, bias, row_bias in zip(self.models, self.caches, self.biases, self.row_biases)
            )
            if len(self.models) > 1:
                probs = probs / len(self.models)
            best = probs.argmax(-1)
            score = probs.gather(-1, best[:, None]).squeeze(-1)
            best = best.masked_fill(done, config.pad_token_id)
            tokens.append(best)
            scores.append(score.masked_fill(done, 0.0))
            used.scatter_(1, best[:, None], True)
            is_label = best >= NUM_SPECIAL_DECODER_TOKENS
            count += is_label.long()
            done |= ~is_label
            if early_exit and bool(done.all()):
                break
            current = best[:, None]
        return torch.stack(tokens, 1), torch.stack(scores, 1)

    def __call__(
        self,
        encoder_states: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None,
        row_bias: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ):
        """One ``[b, s, d]`` encoder output per model (and the ``[b, v]`` row bias, `decoder_row_bias`: one
        for all models or one per model; ``None`` for none) -> ``[b, t]`` tokens and ``[b, t]`` probabilities."""
        for cache, states in zip(self.caches, encoder_states, strict=True):
            cache.set_encoder_states(states, attention_mask)
        for model, bias in zip(self.models, self.biases):
            bias.copy_(model.decoding_bias(bias.device))
        given_biases = per_model(row_bias, len(self.models))
        for model, static, given, states in zip(self.models, self.row_biases, given_biases, encoder_states):
            given = add_optional(given, model.global_row_bias(states, attention_mask))  # document-level logits
            if given is None:
                static.zero_()
            else:
                static.copy_(given)
        if not self.cuda_graph:
            return self._decode(early_exit=True)
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (same inputs: idempotent)
                self._decode(early_exit=False)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self._decode(early_exit=False)
        self.graph.replay()
        return self.outputs[0].clone(), self.outputs[1].clone()


#: Per model: CUDA-graph decoders by batch shape (outside the module, so copies and pickles never see them).
_GRAPH_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def label_set_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE of per-label logits ``[b, num_labels]`` against the label sets in label sequences ``[b, t]``."""
    logits = logits.float()
    is_label = labels >= NUM_SPECIAL_DECODER_TOKENS  # [b, t]; padding (-100) and EOS are not labels
    index = (labels - NUM_SPECIAL_DECODER_TOKENS).clamp(min=0)  # non-labels add 0 at index 0
    targets = torch.zeros_like(logits).scatter_add_(1, index, is_label.to(logits.dtype)).clamp_(max=1.0)
    return nn.functional.binary_cross_entropy_with_logits(logits, targets)


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real (unmasked) positions: ``[b, s, d]``, ``[b, s]`` -> ``[b, d]``."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = attention_mask.to(hidden_states.dtype)[..., None]  # [b, s, 1]
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class LabelformerForMultiLabelGeneration(MultiLabelPredictionMixin, LabelformerForConditionalGeneration):
    """Writes a document's labels one by one and stops with EOS (multi-label as seq2seq).

    Training: ``labels`` ``[b, t]`` are label tokens in the config's ``label_order`` then EOS,
    -100 for padding (see `MultiLabelCollator`); teacher forcing with cross-entropy. With
    ``scheduled_sampling_probability`` > 0 each gold decoder input is replaced, with that
    probability, by the model's own greedy prediction from a first teacher-forced pass
    (parallel scheduled sampling, Duckworth et al. 2019; Bengio et al. 2015), against exposure bias.

    Inference: `generate()` always applies `LabelSetLogitsProcessor`; `predict_labels` returns names.
    """

    def __init__(self, config: LabelformerConfig) -> None:
        _check_label_vocabulary(config)
        super().__init__(config)
        #: Current scheduled-sampling probability; training loops may ramp it up to the config's value.
        self.scheduled_sampling_probability = config.scheduled_sampling_prob
        #: Replay `greedy_labels`' decoding loop as a CUDA graph on GPUs (captured per batch shape).
        self.use_cuda_graphs = True
        if config.auxiliary_bce_weight or config.global_label_logits:
            self.auxiliary_classifier = nn.Linear(config.d_model, config.num_labels)
        self.label_name_evidence = LabelNameEvidence(config.num_labels) if config.label_name_feature else None
        self.lexical_label_scorer = lexical_scorer_of(config)
        extras = (config.auxiliary_bce_weight, config.global_label_logits, config.label_name_feature)
        if any(extras) or config.lexical_scorer:
            self.post_init()

    def label_processor(self) -> LabelSetLogitsProcessor:
        """The decoding constraints of this model's config."""
        return LabelSetLogitsProcessor(self.config.min_labels, self.config.effective_max_labels)

    def decoding_bias(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[decoder_vocab_size]`` float added to the logits when decoding (never in the training loss).

        ``config.eos_logit_bias`` at EOS and ``config.label_logit_bias`` at the labels; zeros by default.
        """
        bias = torch.zeros(self.config.decoder_vocab_size)
        bias[EOS_TOKEN_ID] = self.config.eos_logit_bias
        if self.config.label_logit_bias is not None:
            bias[NUM_SPECIAL_DECODER_TOKENS:] = torch.tensor(self.config.label_logit_bias, dtype=torch.float)
        return bias.to(device) if device is not None else bias

    def learned_row_bias(
        self, input_ids: torch.Tensor | None, named: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The learned label-name term (`learned_name_logits`) over the decoder vocabulary: ``[b, v]``
        (0 at pad/bos/eos), or ``None`` without ``config.label_name_feature``."""
        term = self.learned_name_logits(input_ids, named)
        return None if term is None else nn.functional.pad(term.float(), (NUM_SPECIAL_DECODER_TOKENS, 0))

    def global_row_bias(self, encoder_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The document-level label logits (``config.global_label_logits``) of encoder states ``[b, s, d]``
        over the decoder vocabulary: ``[b, v]`` float (0 at pad/bos/eos), or ``None`` when it is off."""
        if not self.config.global_label_logits:
            return None
        return nn.functional.pad(
            self.document_label_logits(encoder_states, attention_mask), (NUM_SPECIAL_DECODER_TOKENS, 0)
        )

    def document_label_logits(self, encoder_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``auxiliary_classifier`` on the mean-pooled encoder states ``[b, s, d]``: ``[b, num_labels]`` float."""
        return self.auxiliary_classifier(masked_mean(encoder_states, attention_mask)).float()

    def decoder_row_bias(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """What decoding adds to each row's logits for its input ``[b, s]``: the label-name bias, the
        learned label-name term and the weighted lexical margins, over the decoder vocabulary
        ``[b, decoder_vocab_size]`` (0 at pad/bos/eos), or ``None`` when all are off."""
        evidence, learned = self.decoding_row_biases(input_ids)
        return add_optional(evidence, learned)

    def decoding_row_biases(self, input_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`decoder_row_bias` in its two parts, each ``[b, v]`` or ``None``: the decision-time evidence
        (label-name bias and weighted lexical margins) and the learned label-name term."""
        evidence, (learned,) = decoding_row_biases(self, [self], input_ids)
        return evidence, learned

    def set_decoding_bias(self, eos_logit_bias: float = 0.0, label_logit_bias: Sequence[float] | None = None) -> None:
        """Set (and validate) the decoding bias in the config; `save_pretrained` keeps it."""
        old = (self.config.eos_logit_bias, self.config.label_logit_bias)
        self.config.eos_logit_bias = eos_logit_bias
        self.config.label_logit_bias = None if label_logit_bias is None else list(label_logit_bias)
        try:
            self.config.validate_labelformer()
        except ValueError:
            self.config.eos_logit_bias, self.config.label_logit_bias = old
            raise

    def generate(self, *args: Any, logits_processor: LogitsProcessorList | None = None, **kwargs: Any) -> Any:
        """`GenerationMixin.generate` with the decoding bias and the label-set constraints, and room for
        ``max_labels`` + EOS. Given ``input_ids``, it also adds the label-name bias of each row
        (given only ``encoder_outputs``, pass a `DecodingBiasLogitsProcessor` of `decoder_row_bias`)."""
        processors = LogitsProcessorList(logits_processor or [])
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        row_bias = self.decoder_row_bias(input_ids) if isinstance(input_ids, torch.Tensor) else None
        if row_bias is not None:
            processors.append(DecodingBiasLogitsProcessor(row_bias))
        bias = self.decoding_bias()
        if bias.any():
            processors.append(DecodingBiasLogitsProcessor(bias))
        processors.append(self.label_processor())
        if "max_new_tokens" not in kwargs and "max_length" not in kwargs:
            kwargs["max_new_tokens"] = self.config.effective_max_labels + 1
        return super().generate(*args, logits_processor=processors, **kwargs)

    def _scheduled_sampling_inputs(
        self,
        labels: torch.Tensor,
        encoder_outputs: BaseModelOutput,
        attention_mask: torch.Tensor | None,
        row_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gold decoder inputs ``[b, t]`` with some replaced by the model's own constrained greedy choices
        (with the learned label-name term ``row_bias`` ``[b, v]``, if any)."""
        gold = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        with torch.no_grad():
            detached = BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state.detach())
            bias = None if row_bias is None else row_bias.detach()
            predicted = self._constrained_logits(gold, detached, attention_mask, bias).argmax(-1)  # [b, t]: next
        replace = torch.rand(gold.shape, device=gold.device) < self.scheduled_sampling_probability
        replace[:, 0] = False  # the start token stays
        replace &= labels != -100  # and so does padding (input t is label t-1; padded labels stay padded)
        mixed = gold.clone()
        mixed[:, 1:] = torch.where(replace[:, 1:], predicted[:, :-1], gold[:, 1:])
        return mixed

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        labels: torch.Tensor | None = None,
        lexical_margins: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """As `LabelformerForConditionalGeneration.forward`, plus scheduled sampling, the auxiliary loss,
        the learned label-name term and stacked lexical margins.

        With ``config.auxiliary_bce_weight`` > 0 and ``labels`` given, the loss is the sequence
        cross-entropy plus that weight times the BCE of ``auxiliary_classifier`` (mean-pooled encoder
        ``[b, d]`` -> ``[b, num_labels]``) against the label set read off ``labels`` ``[b, t]``.
        With ``config.label_name_feature`` and ``input_ids`` given, the learned label-name term
        (`learned_row_bias`, ``[b, v]``) is added to the logits at every position, before the loss.
        Called without ``input_ids`` (``encoder_outputs`` only, as `generate()` does step by step) the
        logits lack it: decoding adds it as the row bias of `decoder_row_bias`.
        With ``config.global_label_logits`` the document-level label logits (`global_row_bias`) are
        added at every position on every call, before the loss.
        ``lexical_margins`` ``[b, num_labels]`` (training with ``config.lexical_training_weight``: margins
        of scorers that did not see the document, `out_of_fold_lexical_margins`) are added, times that
        weight, at every position before the loss. Decoding adds the fitted scorer's margins instead
        (`decoder_row_bias`).
        """
        row_bias = None  # [b, v]: the learned label-name term and the stacked margins
        if input_ids is not None or labels is not None:
            row_bias = self.learned_row_bias(input_ids)  # with the feature, training without `input_ids` raises
        stacked = self.lexical_training_logits(lexical_margins)
        if stacked is not None:
            row_bias = add_optional(row_bias, nn.functional.pad(stacked, (NUM_SPECIAL_DECODER_TOKENS, 0)))
        sampling = self.training and self.scheduled_sampling_probability and decoder_input_ids is None
        auxiliary = self.config.auxiliary_bce_weight and labels is not None
        needs_states = (labels is not None and (sampling or auxiliary)) or self.config.global_label_logits
        if needs_states and encoder_outputs is None:
            encoder_outputs = self.model.encoder(input_ids, attention_mask, kwargs.get("inputs_embeds"))
        document = self.global_row_bias(encoder_outputs[0], attention_mask) if encoder_outputs is not None else None
        if labels is not None and sampling:
            decoder_input_ids = self._scheduled_sampling_inputs(labels, encoder_outputs, attention_mask, row_bias)
        if labels is not None and decoder_input_ids is None and kwargs.get("decoder_inputs_embeds") is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        added = add_optional(row_bias, document)  # [b, v]: what this model adds to every position
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            encoder_outputs=encoder_outputs,
            labels=labels if added is None else None,
            **kwargs,
        )
        if added is not None:
            outputs.logits = outputs.logits + added[:, None, :].to(outputs.logits.dtype)
            if labels is not None:
                outputs.loss = sequence_cross_entropy(outputs.logits, labels, self.config.label_smoothing)
        if auxiliary:
            if document is None:  # the classifier is a training aid only
                scored = self.document_label_logits(encoder_outputs[0], attention_mask)
            else:  # it is part of the label logits: train it as they use it, with the row bias
                scored = add_optional(document, row_bias)[:, NUM_SPECIAL_DECODER_TOKENS:]
            outputs.loss = outputs.loss + self.config.auxiliary_bce_weight * label_set_bce(scored, labels)
        return outputs

    def label_scores(
        self,
        sequences: torch.Tensor,
        encoder_outputs: BaseModelOutput,
        attention_mask: torch.Tensor,
        row_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Constrained probability of each token of ``sequences`` ``[n, t+1]`` (start token first): ``[n, t]``.

        ``row_bias`` ``[n, v]`` (`decoder_row_bias`) is added at every step, as decoding adds it.
        """
        logits = self._constrained_logits(sequences[:, :-1], encoder_outputs, attention_mask, row_bias)
        return logits.log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1).exp()

    def _constrained_logits(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_outputs: BaseModelOutput,
        attention_mask: torch.Tensor | None,
        row_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced float logits ``[b, t, v]`` with the tokens the label rules forbid at -inf."""
        logits = (
            super()
            .forward(
                attention_mask=attention_mask, encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids
            )
            .logits
        )
        allowed = allowed_label_tokens(
            decoder_input_ids, logits.shape[-1], self.config.min_labels, self.config.effective_max_labels
        )
        logits = logits.float()
        if not self.training:  # the decoding bias is part of the decision rule, not of training
            logits = logits + self.decoding_bias(logits.device)
        row_bias = add_optional(row_bias, self.global_row_bias(encoder_outputs[0], attention_mask))
        if row_bias is not None:
            logits = logits + row_bias[:, None, :]
        return logits.masked_fill(~allowed, float("-inf"))

    @torch.no_grad()
    def greedy_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast constrained greedy decoding: the result of ``generate(num_beams=1)`` without its overhead.

        One encoder pass, then one cached decoder step per label over the small label vocabulary,
        with the label-set rules kept as running state (no re-scan of the prefix) and the
        probability of each choice taken on the way (no second scoring pass). Stops as soon as
        every row has emitted EOS.

        On a CUDA device (eager/SDPA attention, ``use_cuda_graphs``) the decoding loop is replayed
        as one CUDA graph captured per batch shape; it then always runs ``max_labels + 1`` steps
        (rows that are done emit padding), so ``t`` is that width.

        Returns:
            ``[b, t]`` chosen tokens (labels, then EOS, then padding) and ``[b, t]`` their probabilities.
        """
        encoder_states = self.model.encoder(input_ids, attention_mask).last_hidden_state
        decoder = self._greedy_decoder(encoder_states, self.config.effective_max_labels + 1)
        return decoder([encoder_states], attention_mask, self.decoder_row_bias(input_ids))

    def _greedy_decoder(self, encoder_states: torch.Tensor, steps: int) -> _GreedyLabelDecoder:
        """A decoder for this batch shape: reused (with its CUDA graph) while shapes and weights stay."""
        use_graphs = (
            self.use_cuda_graphs
            and encoder_states.is_cuda
            and self.config._attn_implementation in ("eager", "sdpa")
            and not torch.compiler.is_compiling()
        )
        batch, source_len = encoder_states.shape[:2]
        if not use_graphs:
            return _GreedyLabelDecoder([self], batch, source_len, steps, encoder_states.device,
                                       encoder_states.dtype, False)  # fmt: skip
        weights = (self.lm_head.weight.data_ptr(), self.model.decoder.layers[0].self_attn.q_proj.weight.data_ptr())
        key = (batch, source_len, steps, self.config.min_labels, encoder_states.device, encoder_states.dtype,
               self.config._attn_implementation, weights)  # fmt: skip
        decoders = _GRAPH_DECODERS.setdefault(self, {})
        if key not in decoders:
            if len(decoders) >= 8:  # a few shapes at most; graphs hold their own memory pools
                decoders.pop(next(iter(decoders)))
            decoders[key] = _GreedyLabelDecoder([self], batch, source_len, steps, encoder_states.device,
                                                encoder_states.dtype, True)  # fmt: skip
        return decoders[key]

    def predict_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> list[dict[str, float]]:
        """Label sets for a tokenized batch ``[b, s]``; scores are constrained step probabilities.

        Greedy decoding takes the fast path `greedy_labels`; beam search goes through `generate()`.
        With ``config.set_search_rounds`` > 0 either answer is then refined by set search
        (`search_label_sets`), and the scores are those of the refined sets.
        """
        if num_beams == 1 and not self.config.set_search_rounds:
            tokens, scores = self.greedy_labels(input_ids, attention_mask)
            return self._label_dicts(tokens, scores)
        states = self.model.encoder(input_ids, attention_mask).last_hidden_state
        evidence, learned = self.decoding_row_biases(input_ids)
        row_bias = add_optional(evidence, learned)
        if num_beams == 1:
            tokens, scores = self._greedy_decoder(states, self.config.effective_max_labels + 1)(
                [states], attention_mask, row_bias
            )
        else:
            sequences = self.generate(
                # a fresh wrapper: beam search expands the one it gets in place
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                attention_mask=attention_mask,
                num_beams=num_beams,
                do_sample=False,
                logits_processor=None if row_bias is None else [DecodingBiasLogitsProcessor(row_bias)],
            )
            tokens = sequences[:, 1:]
            scores = self.label_scores(sequences, BaseModelOutput(last_hidden_state=states), attention_mask, row_bias)
        if self.config.set_search_rounds:
            tokens, scores = search_label_sets(
                [self], self.config, tokens, [states], attention_mask, [learned], evidence
            )
        return self._label_dicts(tokens, scores)

    def _label_dicts(self, tokens: torch.Tensor, scores: torch.Tensor) -> list[dict[str, float]]:
        """``[b, t]`` generated tokens and scores -> per row ``{label: score}`` up to the first EOS."""
        id2label = self.config.id2label
        results = []
        for row_tokens, row_scores in zip(tokens.tolist(), scores.tolist()):
            scored = {}
            for token, score in zip(row_tokens, row_scores):
                if token < NUM_SPECIAL_DECODER_TOKENS:
                    break  # EOS (or padding after it)
                scored[id2label[token - NUM_SPECIAL_DECODER_TOKENS]] = score
            results.append(scored)
        return results


# ---------------------------------------------------------------------------------------------
# Threshold (binary relevance) head
# ---------------------------------------------------------------------------------------------


#: The label-name biases `tune_label_name_bias` (and `tune_decoding_bias`) try by default.
LABEL_NAME_BIASES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)


def threshold_decisions(probs: torch.Tensor, threshold: float, min_labels: int, max_labels: int) -> torch.Tensor:
    """Labels chosen from sigmoid probabilities ``[n, L]``: those >= ``threshold``, at least the top
    ``min_labels`` and at most the top ``max_labels``. Returns a boolean ``[n, L]``."""
    ranks = probs.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = most probable
    chosen = (probs >= threshold) & (ranks < max_labels)
    return chosen | (ranks < min_labels)


def with_logit_bias(probs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``sigmoid(logit(probs) + bias)`` for probabilities ``[n, L]`` and a bias ``[n, L]`` (``None``: unchanged)."""
    if bias is None:
        return probs
    return torch.sigmoid(torch.logit(probs.double().clamp(1e-12, 1 - 1e-12)) + bias.double()).to(probs.dtype)


def per_model(row_bias: torch.Tensor | Sequence[torch.Tensor | None] | None, count: int) -> list[torch.Tensor | None]:
    """A row bias for each of ``count`` models: one tensor (or ``None``) shared by all, or one per model."""
    if row_bias is None or isinstance(row_bias, torch.Tensor):
        return [row_bias] * count
    if len(row_bias) != count:
        raise ValueError(f"Got {len(row_bias)} row biases for {count} models.")
    return list(row_bias)


def label_name_row_bias(model: Any, input_ids: torch.Tensor, named: torch.Tensor | None = None) -> torch.Tensor | None:
    """A generation head's (or ensemble's) label-name bias over its decoder vocabulary ``[b, v]``, or ``None``
    (``named``: the `named_labels` of ``input_ids``, when the caller has them)."""
    bias = model.label_name_logit_bias(input_ids, named)
    if bias is None:
        return None
    return nn.functional.pad(bias, (NUM_SPECIAL_DECODER_TOKENS, 0))


def lexical_row_bias(model: Any, input_ids: torch.Tensor) -> torch.Tensor | None:
    """A generation head's (or ensemble's) weighted lexical margins (`lexical_logit_bias`) over its decoder
    vocabulary ``[b, v]`` (0 at pad/bos/eos), or ``None`` when the weight is 0."""
    bias = model.lexical_logit_bias(input_ids)
    if bias is None:
        return None
    return nn.functional.pad(bias, (NUM_SPECIAL_DECODER_TOKENS, 0))


def decoding_row_biases(
    model: Any, members: Sequence[Any], input_ids: torch.Tensor
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """What decoding adds to each row ``[b, v]`` for ids ``[b, s]``, in two parts: ``model``'s decision-time
    evidence (label-name bias plus weighted lexical margins; ``None`` when both are off) and, per member, its
    learned label-name term. ``model`` is one generation head (``members`` ``[model]``) or an ensemble."""
    named = model.named_for_decoding(input_ids)  # once for all: members share labels and tokenizer
    evidence = add_optional(label_name_row_bias(model, input_ids, named), lexical_row_bias(model, input_ids))
    return evidence, [member.learned_row_bias(input_ids, named) for member in members]


def lexical_scorer_of(config: LabelformerConfig) -> LexicalLabelScorer | None:
    """The `LexicalLabelScorer` a multi-label head holds under ``config.lexical_scorer`` (unfitted), else ``None``."""
    return LexicalLabelScorer(config.vocab_size, config.num_labels) if config.lexical_scorer else None


def micro_f1_of(chosen: torch.Tensor, targets: torch.Tensor) -> float:
    """Micro-F1 of boolean decisions against 0/1 targets, both ``[n, L]``."""
    gold = targets.bool()
    true_positive = (chosen & gold).sum().item()
    denominator = chosen.sum().item() + gold.sum().item()
    return 2 * true_positive / denominator if denominator else 1.0


def best_threshold(
    probs: torch.Tensor, targets: torch.Tensor, min_labels: int, max_labels: int, grid: Sequence[float] | None = None
) -> tuple[float, float]:
    """The threshold of ``grid`` (default 0.05..0.95) with the best micro-F1 of `threshold_decisions`
    on ``probs``/``targets`` ``[n, L]`` (ties: the one nearest 0.5), and that micro-F1."""
    grid = grid if grid is not None else [round(0.05 * i, 2) for i in range(1, 20)]

    def f1(t: float) -> float:
        return micro_f1_of(threshold_decisions(probs, t, min_labels, max_labels), targets)

    best = max(grid, key=lambda t: (f1(t), -abs(t - 0.5)))
    return float(best), f1(best)


class ThresholdDecisionMixin:
    """`decide` and `tune_threshold` over ``config.classifier_threshold`` and the config's label limits."""

    config: LabelformerConfig

    def threshold_label_dicts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[dict[str, float]]:
        """Ids ``[b, s]`` -> per row ``{label: probability}`` of the chosen labels: ``label_probabilities``
        shifted by the label-name bias and the weighted lexical margins (those that are on), then `decide`."""
        probs = self.label_probabilities(input_ids, attention_mask)
        probs = with_logit_bias(
            probs, add_optional(self.label_name_logit_bias(input_ids), self.lexical_logit_bias(input_ids))
        )
        return chosen_label_dicts(probs, self.decide(probs), self.config.id2label)

    def decision_probabilities(
        self, probs: torch.Tensor, named: torch.Tensor | None = None, lexical: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``probs`` ``[n, L]`` shifted as deciding shifts them (`threshold_label_dicts`): by the label-name
        bias at the ``named`` ``[n, L]`` labels and the weighted lexical margins ``lexical`` ``[n, L]``
        (unweighted `lexical_margins`); for the outputs of `threshold_validation_inputs`."""
        shift = add_optional(
            named.float() * self.config.label_name_bias if named is not None and self.config.label_name_bias else None,
            lexical.float() * self.config.lexical_logit_weight
            if lexical is not None and self.config.lexical_logit_weight
            else None,
        )
        return with_logit_bias(probs, shift)

    def decide(self, probs: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Boolean ``[n, L]`` decisions for probabilities ``[n, L]`` under this config's rules."""
        threshold = self.config.classifier_threshold if threshold is None else threshold
        return threshold_decisions(probs, threshold, self.config.min_labels, self.config.effective_max_labels)

    def tune_threshold(
        self, probs: torch.Tensor, targets: torch.Tensor, grid: Sequence[float] | None = None
    ) -> tuple[float, float]:
        """Pick the threshold with the best micro-F1 on validation ``probs``/``targets`` (``[n, L]``).

        Stores it in ``config.classifier_threshold`` and returns ``(threshold, micro_f1)``.
        """
        best, f1 = best_threshold(probs, targets, self.config.min_labels, self.config.effective_max_labels, grid)
        self.config.classifier_threshold = best
        return best, f1

    def tune_decision_rule(
        self,
        probs: torch.Tensor,
        targets: torch.Tensor,
        named: torch.Tensor | None = None,
        lexical: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Fit the decision rule on validation data: the threshold; with ``named`` ``[n, L]`` (and
        ``config.label_name_token_ids``) the label-name bias with it; with ``lexical`` ``[n, L]`` (the
        unweighted `lexical_margins`) the lexical logit weight with them. Returns ``{"threshold",
        "label_name_bias", "lexical_logit_weight", "micro_f1"}``."""
        if named is not None and self.config.label_name_token_ids is None:
            named = None
        if named is None and lexical is None:
            threshold, f1 = self.tune_threshold(probs, targets)
            return {
                "threshold": threshold,
                "label_name_bias": self.config.label_name_bias,
                "lexical_logit_weight": self.config.lexical_logit_weight,
                "micro_f1": f1,
            }
        tuned = self.tune_label_name_bias(
            probs, named, targets, biases=LABEL_NAME_BIASES if named is not None else (), lexical=lexical
        )
        return {key: tuned[key] for key in ("threshold", "label_name_bias", "lexical_logit_weight", "micro_f1")}

    def tune_label_name_bias(
        self,
        probs: torch.Tensor,
        named: torch.Tensor | None,
        targets: torch.Tensor,
        biases: Sequence[float] = LABEL_NAME_BIASES,
        grid: Sequence[float] | None = None,
        lexical: torch.Tensor | None = None,
        lexical_weights: Sequence[float] = LEXICAL_LOGIT_WEIGHTS,
    ) -> dict[str, Any]:
        """Fit ``config.label_name_bias`` (and, given ``lexical``, ``config.lexical_logit_weight``) together
        with the threshold on validation data.

        For each bias in ``biases`` (0 always included) and, with ``lexical`` ``[n, L]`` (unweighted
        `lexical_margins`), each weight of ``lexical_weights`` (0 always included), the best threshold
        of ``grid`` is found on ``probs`` ``[n, L]`` shifted by that bias at the ``named`` ``[n, L]``
        labels (`named_labels` of each validation batch's input ids) plus the weighted margins; the
        setting with the best micro-F1 against ``targets`` ``[n, L]`` is kept (ties: the smaller bias,
        then the smaller weight) and stored in the config. ``named`` may be ``None`` only with ``lexical``
        (the label-name bias then stays 0); otherwise ``label_name_token_ids`` must be set.

        Returns:
            ``{"label_name_bias", "lexical_logit_weight", "threshold", "micro_f1", "unbiased_micro_f1",
            "grid": [...]}``.
        """
        if named is None and lexical is None:
            raise ValueError("tune_label_name_bias needs `named` (label names in the inputs) or `lexical` margins.")
        if named is not None and self.config.label_name_token_ids is None:
            raise ValueError(
                "tune_label_name_bias needs config.label_name_token_ids: "
                "model.set_label_name_bias(0.0, label_name_token_ids(labels, tokenizer)) first."
            )
        limits = (self.config.min_labels, self.config.effective_max_labels)
        name_biases = sorted({0.0, *map(float, biases)}) if named is not None else [0.0]
        weights = sorted({0.0, *map(float, lexical_weights)}) if lexical is not None else [0.0]
        rows = []
        for bias in name_biases:
            for weight in weights:
                shift = add_optional(
                    named.float() * bias if named is not None and bias else None,
                    lexical.float() * weight if lexical is not None and weight else None,
                )
                threshold, f1 = best_threshold(with_logit_bias(probs, shift), targets, *limits, grid)
                rows.append({"label_name_bias": bias, "lexical_logit_weight": weight, "threshold": threshold,
                             "micro_f1": f1})  # fmt: skip
        best = max(rows, key=lambda row: (row["micro_f1"], -row["label_name_bias"], -row["lexical_logit_weight"]))
        if named is not None:
            self.set_label_name_bias(best["label_name_bias"])
        if lexical is not None:
            self.set_lexical_logit_weight(best["lexical_logit_weight"])
        self.config.classifier_threshold = best["threshold"]
        return {**best, "unbiased_micro_f1": rows[0]["micro_f1"], "grid": rows}


class LabelformerForMultiLabelClassification(
    ThresholdDecisionMixin, MultiLabelPredictionMixin, LabelformerPreTrainedModel
):
    """Binary relevance: pooled encoder -> one sigmoid per label, trained with BCE.

    ``labels`` is a ``[b, num_labels]`` 0/1 matrix. A label is predicted when its probability
    reaches ``config.classifier_threshold`` (tune it on validation data with `tune_threshold`);
    at least ``min_labels`` (top ones) are always predicted.
    """

    base_model_prefix = "encoder"
    pipeline_auto_class = "AutoModelForSequenceClassification"

    def __init__(self, config: LabelformerConfig) -> None:
        if config.global_label_logits:
            raise ValueError(
                "`global_label_logits` is for the generation head (the threshold head is that document-level "
                "classifier already): set global_label_logits=False."
            )
        config.problem_type = "multi_label_classification"
        super().__init__(config)
        embed_tokens = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = LabelformerEncoder(config, embed_tokens)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.label_name_evidence = LabelNameEvidence(config.num_labels) if config.label_name_feature else None
        self.lexical_label_scorer = lexical_scorer_of(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embeddings.embed_tokens = value

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``[b, s, d]`` -> ``[b, d]``: mean over real tokens, or the first token."""
        if self.config.classifier_pooling == "first":
            return hidden_states[:, 0]
        return masked_mean(hidden_states, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        lexical_margins: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """``[b, s]`` ids -> ``logits`` ``[b, num_labels]``; with ``labels`` also the mean BCE ``loss``.

        With ``config.label_name_feature`` the logits include the learned label-name term
        (`learned_name_logits`), which needs ``input_ids``. ``lexical_margins`` ``[b, num_labels]``
        (stacking: out-of-fold margins, in training) are added times ``config.lexical_training_weight``.
        """
        encoded = self.encoder(
            input_ids,
            attention_mask,
            inputs_embeds,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
        )
        logits = self.classifier(self.dropout(self.pool(encoded.last_hidden_state, attention_mask)))
        extra = add_optional(self.learned_name_logits(input_ids), self.lexical_training_logits(lexical_margins))
        if extra is not None:
            logits = logits + extra.to(logits.dtype)
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.to(torch.float32))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )

    def label_probabilities(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities ``[b, num_labels]`` for ids ``[b, s]``: with the learned label-name term when
        ``config.label_name_feature`` is on, without the decision-time ``label_name_bias`` (the decision adds it)."""
        return torch.sigmoid(self(input_ids=input_ids, attention_mask=attention_mask).logits.float())

    def predict_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> list[dict[str, float]]:
        """Threshold decisions for a tokenized batch ``[b, s]``; scores are sigmoid probabilities
        (with the label-name bias, when it is on)."""
        return self.threshold_label_dicts(input_ids, attention_mask)


def chosen_label_dicts(probs: torch.Tensor, chosen: torch.Tensor, id2label: dict[int, str]) -> list[dict[str, float]]:
    """Probabilities ``[n, L]`` and decisions ``[n, L]`` -> per row ``{label: probability}``, most probable first."""
    results = []
    for row_probs, row_chosen in zip(probs.tolist(), chosen.tolist()):
        picked = [(p, i) for i, (p, c) in enumerate(zip(row_probs, row_chosen)) if c]
        results.append({id2label[i]: p for p, i in sorted(picked, reverse=True)})
    return results


__all__ = [
    "LabelSetLogitsProcessor",
    "LabelformerForMultiLabelClassification",
    "LabelformerForMultiLabelGeneration",
    "MultiLabelPredictionMixin",
    "ThresholdDecisionMixin",
    "LABEL_NAME_BIASES",
    "add_optional",
    "allowed_label_tokens",
    "check_texts",
    "threshold_decisions",
    "with_logit_bias",
]
