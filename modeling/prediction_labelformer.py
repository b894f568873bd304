"""Helpers shared by the multi-label heads: `predict_labels`, input checks, the optional lexical part.

Every head implements ``predict_batch(input_ids, attention_mask, num_beams)``, which reads its
answer off its own ``forward()`` / ``generate()``; `MultiLabelPredictionMixin.predict_labels` adds
tokenization and batching on top, and the ``"multi-label-generation"`` pipeline calls
``predict_batch`` too, so all three give the same labels and scores.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .configuration_labelformer import LabelformerConfig
from .lexical_labelformer import LexicalLabelScorer
from .pipeline_labelformer import TASK as PIPELINE_TASK
from .pipeline_labelformer import MultiLabelGenerationPipeline

_TOKENIZERS: dict[str, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (size, fingerprint)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id); stored as ``config.tokenizer_fingerprint``."""
    cached = _FINGERPRINTS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    fingerprint = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    _FINGERPRINTS[tokenizer] = (len(tokenizer), fingerprint)
    return fingerprint


def check_texts(
    texts: str | Sequence[str], allow_empty: bool = False, empty_hint: str = " (or allow_empty=True)"
) -> list[str]:
    """Validate raw texts; a single string counts as a list of one. ``empty_hint`` ends the empty-text error
    (callers without an ``allow_empty`` option pass ``""``).

    Raises:
        ValueError: a text is not a string, is empty/blank (unless ``allow_empty``) or holds a lone
            surrogate (not encodable Unicode); names its index in a list ("the text" for a single string).
    """
    single = isinstance(texts, str)
    if single:
        texts = [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise ValueError(
            f"`texts` must be a string or a list of strings, got {type(texts).__name__} (decode bytes first)."
        )
    for i, text in enumerate(texts):
        name = "The text" if single else f"`texts[{i}]`"
        if not isinstance(text, str):
            raise ValueError(f"{name} is a {type(text).__name__}, not a string (decode bytes first).")
        if not allow_empty and not text.strip():
            raise ValueError(f"{name} is empty; pass a non-empty document{empty_hint}.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{name} is not valid Unicode: a lone surrogate at character {error.start}. Decode the "
                "source with errors='replace' (or fix it) first."
            ) from None
    return list(texts)


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens: ``[b, s, d]`` and ``[b, s]`` 1/0 mask -> ``[b, d]``."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = attention_mask.to(hidden_states.dtype)[..., None]
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def lexical_scorer_of(config: LabelformerConfig) -> LexicalLabelScorer | None:
    """The optional hybrid part a multi-label head holds (``config.lexical_scorer``), else ``None``."""
    return LexicalLabelScorer(config.vocab_size, config.num_labels) if config.lexical_scorer else None


def check_finite_weights(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter or buffer that holds NaN or infinity."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"The model's `{name}` holds NaN or infinite values: it cannot predict. Reload a good checkpoint."
            )


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

    def _resolve_tokenizer(self, tokenizer: Any | None) -> Any:
        if tokenizer is not None:
            return tokenizer
        source = str(getattr(self, "name_or_path", "") or "")
        with _TOKENIZERS_LOCK:
            if source not in _TOKENIZERS:
                from transformers import AutoTokenizer

                try:  # a plain fast tokenizer: no custom code to trust; our config, so AutoTokenizer reads none
                    _TOKENIZERS[source] = AutoTokenizer.from_pretrained(
                        source, config=self.config, trust_remote_code=False
                    )
                except Exception as error:  # no tokenizer saved beside the model, or no path at all
                    raise ValueError(
                        "predict_labels needs a tokenizer: pass tokenizer=..., or load the model from a folder "
                        f"that holds its tokenizer (tried {source!r}: {error})."
                    ) from error
            return _TOKENIZERS[source]

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
        dtype: torch.dtype | None = None,
    ) -> list[list[str]] | list[dict[str, float]]:
        """Predict the label set of each raw text (the model must be in eval mode, as `from_pretrained` leaves it).

        Args:
            texts: one string or a list of strings.
            tokenizer: the model's tokenizer; by default the one saved beside the model.
            num_beams: beam width for the generation head (1 = greedy); ignored by the other heads.
            batch_size: texts per forward pass (texts are sorted by length to pad little).
            return_scores: return ``{label: probability}`` dicts instead of lists of names.
            max_length: truncate texts to this many tokens (default: the tokenizer's limit, at most
                ``config.max_position_embeddings``, so a huge text costs no more than a long one).
            allow_empty: accept empty texts (the model then sees only its special tokens).
            dtype: ``torch.bfloat16`` computes the matrix products in bf16 under autocast (the weights and
                the lexical part stay fp32, and so do greedy decoding's softmax and scores): on CPUs with bf16
                kernels (AVX-512 BF16, AMX) faster for batches and many labels, slower at batch 1
                (benchmarks/RESULTS.md has its speed and test micro-F1; not measured on GPUs). ``None``
                (default): the weights' own precision, or the caller's autocast. The model is not changed.

        Returns:
            One entry per text, in input order: a list of label names, or with ``return_scores``
            a dict ``{label: probability}`` in the order the labels were predicted.
        """
        if self.training:
            raise ValueError("predict_labels needs the model in eval mode (dropout off): call model.eval() first.")
        for name, value in (("num_beams", num_beams), ("batch_size", batch_size), ("max_length", max_length)):
            if (value is not None or name != "max_length") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f"`dtype` must be None or torch.bfloat16, got {dtype!r}.")
        if getattr(self, "is_int8_copy", False) and (dtype is not None or torch.is_autocast_enabled(self.device.type)):
            raise ValueError(
                "This int8 copy (quantize_int8) computes in int8 and fp32 only: call predict_labels without "
                "`dtype` and outside autocast, or use bf16 on the model it was made from."
            )
        texts = check_texts(texts, allow_empty)
        check_finite_weights(self)
        tokenizer = self._resolve_tokenizer(tokenizer)
        if len(tokenizer) > self.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's `vocab_size` is "
                f"{self.config.vocab_size}: this tokenizer does not belong to this model."
            )
        expected = self.config.tokenizer_fingerprint
        if expected is not None and tokenizer_fingerprint(tokenizer) != expected:
            raise ValueError(
                f"`tokenizer` is not the one this model was trained with (its vocabulary fingerprint differs from "
                f"`config.tokenizer_fingerprint` {expected}): load the tokenizer saved beside the model."
            )
        if max_length is None:
            max_length = min(tokenizer.model_max_length, self.config.max_position_embeddings)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[dict[str, float] | None] = [None] * len(texts)
        # one autocast region for the whole call: the weights are cast to bf16 once, not per batch (without
        # `dtype`, no region at all, so a caller's own autocast still applies)
        region = nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)
        with region:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in chunk], truncation=True, max_length=max_length, padding=True,
                    return_tensors="pt",
                ).to(self.device)  # fmt: skip
                for i, scored in zip(chunk, self.predict_batch(batch["input_ids"], batch["attention_mask"], num_beams)):
                    results[i] = scored
        if return_scores:
            return results
        return [list(scored) for scored in results]

    def predict_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> list[dict[str, float]]:
        """Tokenized batch ``[b, s]`` -> per row ``{label: probability}`` in prediction order."""
        raise NotImplementedError


__all__ = [
    "MultiLabelPredictionMixin",
    "check_finite_weights",
    "check_texts",
    "lexical_scorer_of",
    "masked_mean",
    "tokenizer_fingerprint",
]
