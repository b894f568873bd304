"""Hugging Face plumbing of every Labelformer model: safe, strict loading, complete saving, weight tying.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

#: The manifest beside saved weights and in checkpoints: one ``<sha256>  <file name>`` line per file,
#: the format of ``sha256sum`` (``sha256sum -c checksums.sha256`` checks a folder by hand).
CHECKSUMS_FILE = "checksums.sha256"


def sha256_of(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: str | os.PathLike, names: list[str] | None = None) -> None:
    """Write ``folder/checksums.sha256`` for ``names`` (default: every file in ``folder``)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE)
    lines = "".join(f"{sha256_of(folder / name)}  {name}\n" for name in names)
    tmp = folder / f".{CHECKSUMS_FILE}.tmp"
    tmp.write_text(lines)
    os.replace(tmp, folder / CHECKSUMS_FILE)


def verify_checksums(folder: str | os.PathLike) -> bool:
    """Check every file ``folder/checksums.sha256`` lists; False when the folder has no manifest.

    Raises:
        ValueError: a listed file is missing or its sha256 differs (the message names it).
    """
    folder = Path(folder)
    manifest = folder / CHECKSUMS_FILE
    if not manifest.is_file():
        return False
    for line in manifest.read_text().splitlines():
        expected, _, name = line.partition("  ")
        if not name:
            raise ValueError(f"{manifest} is malformed (line {line!r}); expected '<sha256>  <file name>' lines.")
        path = folder / name
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: {manifest} lists it. The folder is incomplete; save or copy it again."
            )
        if sha256_of(path) != expected:
            raise ValueError(
                f"{path} is corrupt: its sha256 differs from the one in {manifest} (the file changed after it was "
                "saved, e.g. a bad copy or disk). Save, copy or download it again."
            )
    return True


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

    def post_init(self) -> None:
        super().post_init()
        # Tied weights are stored once. Trainer's load-best re-ties them, instead of warning that the checkpoint
        # misses them, when the keys it misses are exactly `_keys_to_ignore_on_save` (which then drops nothing
        # more: save_pretrained leaves tied copies out anyway).
        self._keys_to_ignore_on_save = set(self._keys_to_ignore_on_save or ()) | set(self._tied_keys())

    def _adjust_missing_and_unexpected_keys(self, loading_info: Any) -> None:
        """The bare model loads from any head's folder: the head's own weights (``lm_head``, the lexical part,
        a classifier) are not unexpected there. A head keeps reporting every key it does not know."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        if self.base_model is self and getattr(loading_info, "unexpected_keys", None):
            own = tuple(f"{name}." for name, _ in self.named_children())
            loading_info.unexpected_keys = {key for key in loading_info.unexpected_keys if key.startswith(own)}

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
        initialising weights at random. A local folder's weights are checked against its
        ``checksums.sha256`` and the label maps against the config's ``label_fingerprint``
        (``ValueError`` naming what differs). Pass ``strict=False`` to skip these checks and allow
        missing weights.
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
        if strict and os.path.isdir(source):
            verify_checksums(Path(source, kwargs.get("subfolder") or ""))
        if strict:
            model.config.verify_label_fingerprint()
        return (model, info) if want_info else model

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.push_to_hub`; an int8 copy is refused before anything is created on the Hub."""
        _refuse_int8_copy(self)
        return super().push_to_hub(*args, **kwargs)

    def save_pretrained(self, save_directory: str | Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.save_pretrained`, plus an ``AutoModel`` entry in ``auto_map``.

        A class registers for one auto class only; the bare model is added by hand so that
        ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works from any head's folder.
        The weight files get a ``checksums.sha256`` manifest that `from_pretrained` verifies.
        """
        _refuse_int8_copy(self)
        # Start from a clean map: a config shared with (or loaded from) another head must not keep
        # that head's entry. The config and this class add their own entries while saving.
        self.config.auto_map = {"AutoModel": "modeling_labelformer.LabelformerModel"}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            weights = sorted(p.name for p in Path(save_directory).iterdir() if ".safetensors" in p.name)
            write_checksums(save_directory, weights)
        return result


def _refuse_int8_copy(model: Any) -> None:
    if getattr(model, "is_int8_copy", False):
        raise ValueError(
            "This is an int8 copy made by quantize_int8() for CPU inference; its weights are not a "
            "checkpoint. Save or push the model it was made from."
        )


__all__ = ["CHECKSUMS_FILE", "StrictLoadingMixin", "sha256_of", "verify_checksums", "write_checksums"]
