"""The ``"multi-label-generation"`` pipeline: raw text in, labels with scores out.

    from transformers import pipeline
    classifier = pipeline("multi-label-generation", model="path/or/repo", trust_remote_code=True)
    classifier("Wheat exports rose as grain prices fell.")
    # [{'label': 'grain', 'score': 0.97}, {'label': 'wheat', 'score': 0.93}]
    classifier(["text one", "text two"], num_beams=3)   # one list per text

Saved model folders carry this file and name it in ``config.custom_pipelines``, so the pipeline
loads without our package. It works with every Labelformer multi-label head (they all implement
``predict_batch``).
"""

from __future__ import annotations

from typing import Any

from transformers import Pipeline

TASK = "multi-label-generation"


class MultiLabelGenerationPipeline(Pipeline):
    """Predict each text's label set with a Labelformer multi-label head.

    Call arguments: ``num_beams`` (generation heads; default 1), ``max_length`` (tokens kept per
    text; default the tokenizer's limit). Returns, per text, ``[{"label": str, "score": float}, ...]``
    in the order the model predicted the labels.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(
        self, num_beams: int | None = None, max_length: int | None = None, **kwargs: Any
    ) -> tuple[dict, dict, dict]:
        preprocess = {"max_length": max_length} if max_length is not None else {}
        forward = {"num_beams": num_beams} if num_beams is not None else {}
        return preprocess, forward, {}

    def preprocess(self, text: str, max_length: int | None = None) -> dict[str, Any]:
        if not isinstance(text, str):
            raise ValueError(f"The pipeline takes strings, got {type(text).__name__}.")
        if not text.strip():
            raise ValueError("The pipeline got an empty text; pass a non-empty document.")
        limit = max_length or min(self.tokenizer.model_max_length, 100_000)
        if self.model.config.position_embedding_type == "learned":  # as predict_labels: a learned table ends
            limit = min(limit, self.model.config.max_position_embeddings)
        return self.tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, Any], num_beams: int = 1) -> dict[str, Any]:
        scored = self.model.predict_batch(model_inputs["input_ids"], model_inputs["attention_mask"], num_beams)
        return {"scored": scored[0]}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"label": label, "score": float(score)} for label, score in model_outputs["scored"].items()]


__all__ = ["TASK", "MultiLabelGenerationPipeline"]
