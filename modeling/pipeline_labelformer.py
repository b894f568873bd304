"""The ``"multi-label-generation"`` pipeline: raw text in, labels with scores out.

    from transformers import pipeline
    classifier = pipeline("multi-label-generation", model="path/or/repo", trust_remote_code=True)
    classifier("Wheat exports rose as grain prices fell.")
    # [{'label': 'grain', 'score': 0.97}, {'label': 'wheat', 'score': 0.93}]
    classifier(["text one", "text two"], batch_size=32)   # one list per text; batched forward passes
    classifier(texts, top_k=1, threshold=0.5)             # only the model's surest label, if >= 0.5

Saved model folders carry this file and name it in ``config.custom_pipelines``, so the pipeline
loads without our package. It works with every Labelformer multi-label head (they all implement
``predict_batch``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

TASK = "multi-label-generation"
#: The call and constructor options `MultiLabelGenerationPipeline` takes, besides ``batch_size`` and ``num_workers``.
OPTIONS = ("num_beams", "max_length", "top_k", "threshold")


class MultiLabelGenerationPipeline(Pipeline):
    """Predict each text's label set with a Labelformer multi-label head.

    Options (at the call or in ``pipeline(...)``; any other raises ``ValueError``):
        num_beams: beam width for the generation head (default 1, greedy).
        max_length: tokens kept per text (default: the tokenizer's limit, at most the model's
            ``max_position_embeddings``, as `predict_labels`).
        top_k: keep only the ``top_k`` highest-scoring labels of the model's answer, best first.
        threshold: keep only labels whose score is at least ``threshold``.
        batch_size: texts per forward pass (``transformers.Pipeline``'s own option; default 1).

    Returns, per text, ``[{"label": str, "score": float}, ...]``: the model's label set, in the order the
    model predicted the labels, each with the model's own probability for it (what `predict_labels`
    returns). ``top_k`` and ``threshold`` only remove labels from that answer.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(
        self,
        num_beams: int | None = None,
        max_length: int | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        **unknown: Any,
    ) -> tuple[dict, dict, dict]:
        if unknown:
            raise ValueError(
                f"The {TASK!r} pipeline has no option {', '.join(map(repr, sorted(unknown)))}; it takes "
                f"{', '.join(OPTIONS)}, batch_size and num_workers."
            )
        for name, value in (("num_beams", num_beams), ("max_length", max_length), ("top_k", top_k)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"`threshold` must be a probability in [0, 1], got {threshold!r}.")
        preprocess = {"max_length": max_length} if max_length is not None else {}
        forward = {"num_beams": num_beams} if num_beams is not None else {}
        postprocess = {k: v for k, v in (("top_k", top_k), ("threshold", threshold)) if v is not None}
        return preprocess, forward, postprocess

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """`Pipeline.__call__`; a list with ``batch_size`` > 1 is batched as `predict_labels` batches it."""
        from .prediction_labelformer import check_texts  # here: that module imports this one

        if isinstance(inputs, (list, tuple)) and not inputs:
            return []  # no texts, no predictions (Pipeline.__call__ would index the empty list)
        if isinstance(inputs, (list, tuple)):  # (a single text is checked in `preprocess`)
            check_texts(inputs, empty_hint="")  # every text, with its index in the input, before any batch runs
        batch_size = kwargs.get("batch_size") or self._batch_size or 1
        if not isinstance(inputs, list) or (inputs and (args or batch_size == 1 or kwargs.get("num_workers"))):
            return super().__call__(inputs, *args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")}
        # options are checked for an empty list too
        stages = zip((self._preprocess_params, self._forward_params, self._postprocess_params),
                     self._sanitize_parameters(**kwargs))  # fmt: skip
        preprocess, forward, postprocess = ({**default, **given} for default, given in stages)
        return self._run_sorted(inputs, batch_size, preprocess, forward, postprocess)

    def _run_sorted(
        self, texts: list[Any], batch_size: int, preprocess: dict, forward: dict, postprocess: dict
    ) -> list[list[dict[str, Any]]]:
        """Texts sorted by length, cut into batches of ``batch_size``, as `predict_labels` does: little padding,
        and the same batches, so the same numbers (Pipeline's own loader pads batches in input order)."""
        results: list[Any] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # checked strings (__call__)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            outputs = self.forward(self._encode([texts[i] for i in chunk], **preprocess), **forward)
            for row, i in enumerate(chunk):
                results[i] = self.postprocess({k: v[row : row + 1] for k, v in outputs.items()}, **postprocess)
        return results

    def preprocess(self, text: str, max_length: int | None = None) -> dict[str, Any]:
        from .prediction_labelformer import check_texts  # here: that module imports this one

        if not isinstance(text, str):  # a generator's or Dataset's item: one text each (a list would lose texts)
            raise ValueError(
                f"Each input of the {TASK!r} pipeline must be a string, got {type(text).__name__}; pass the texts "
                "themselves (a list, a generator or a Dataset column of strings)."
            )
        return self._encode(check_texts(text, empty_hint=""), max_length)

    def _encode(self, texts: list[str], max_length: int | None = None) -> dict[str, Any]:
        """Checked texts -> a padded batch ``[b, s]`` (truncated to ``max_length``, default as `predict_labels`)."""
        # as predict_labels: at most the model's maximum, so a huge text costs no more than a long one
        limit = max_length or min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        return self.tokenizer(texts, truncation=True, max_length=limit, padding=True, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, Any], num_beams: int = 1) -> dict[str, torch.Tensor]:
        """A padded batch ``[b, s]`` -> the model's labels ``[b, k]`` (label ids, -1 after the last) and their
        probabilities ``[b, k]``: tensors, so that `Pipeline` can split a batch into rows."""
        rows = self.model.predict_batch(model_inputs["input_ids"], model_inputs["attention_mask"], num_beams)
        width = max([len(row) for row in rows] + [1])
        label2id = self.model.config.label2id
        label_ids = [[label2id[label] for label in row] + [-1] * (width - len(row)) for row in rows]
        scores = [list(row.values()) + [0.0] * (width - len(row)) for row in rows]
        return {"label_ids": torch.tensor(label_ids), "scores": torch.tensor(scores, dtype=torch.float64)}

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], top_k: int | None = None, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        id2label = self.model.config.id2label
        found = [
            {"label": id2label[i], "score": score}
            for i, score in zip(model_outputs["label_ids"][0].tolist(), model_outputs["scores"][0].tolist())
            if i >= 0 and (threshold is None or score >= threshold)
        ]
        if top_k is not None:
            found = sorted(found, key=lambda item: -item["score"])[:top_k]  # stable: ties keep the model's order
        return found


__all__ = ["OPTIONS", "TASK", "MultiLabelGenerationPipeline"]
