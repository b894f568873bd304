"""Hugging Face plumbing of every Labelformer model: safe, strict loading, complete saving, weight tying.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

from typing import Any


class StrictLoadingMixin:
    """Mixed into `LabelformerPreTrainedModel` before ``PreTrainedModel``."""

    def _tied_keys(self) -> dict[str, str]:
        """Target -> source parameter names tied under this module (overridden by heads)."""
        return {}

    # Tying depends on two config flags (share_embeddings, tie_word_embeddings), so the mapping
    # is built from the config instead of being a fixed class attribute.
    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        return self._tied_keys()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict[str, str]:
        # The base class ignores every tie when `tie_word_embeddings` is False; shared
        # encoder/decoder embeddings are tied independently of it.
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return self._tied_keys()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, but safe and strict.

        Weights load from safetensors only (never pickle). A checkpoint that lacks weights the
        model needs, or whose tensors do not fit its config (e.g. label maps naming more or fewer
        labels than the head was trained with), raises ``ValueError`` instead of silently
        initialising weights at random. Pass ``strict=False`` to allow missing weights.
        """
        kwargs.setdefault("use_safetensors", True)
        strict = kwargs.pop("strict", True)
        want_info = kwargs.pop("output_loading_info", False)
        source = str(pretrained_model_name_or_path)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RuntimeError as error:
            if "size mismatch" in str(error) or "mismatch" in str(error).lower():
                raise ValueError(
                    f"The weights in {source!r} do not fit its config: {error}. If the config's label maps "
                    "(id2label/label2id) were edited, restore them: a head's label count is fixed by its weights."
                ) from error
            raise
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if strict and problems:
            raise ValueError(
                f"{source!r} is not a complete {cls.__name__} checkpoint: {problems}. "
                "Load it with the class it was saved from, or pass strict=False to initialise these at random."
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.save_pretrained`, plus an ``AutoModel`` entry in ``auto_map``.

        A class registers for one auto class only; the bare model is added by hand so that
        ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works from any head's folder.
        """
        # Start from a clean map: a config shared with (or loaded from) another head must not keep
        # that head's entry. The config and this class add their own entries while saving.
        self.config.auto_map = {"AutoModel": "modeling_labelformer.LabelformerModel"}
        return super().save_pretrained(save_directory, *args, **kwargs)


__all__ = ["StrictLoadingMixin"]
