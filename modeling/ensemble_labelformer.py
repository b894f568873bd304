"""Ensembles of trained multi-label Labelformer models (seed averaging).

Several models of one head, trained on the same label set and tokenizer with different seeds,
predict as one:

- label-sequence generation heads decode greedily together: at every step the constrained label
  distributions of the members are averaged, and the label-set rules apply to the average;
- members may write labels in different orders (frequency or random vs alphabetical): those that
  write alike decode together, and whole label sets are compared across orders (`set_scores`);
- threshold heads average their sigmoid probabilities and apply one threshold (by default the
  mean of the members' tuned thresholds; `tune_threshold` re-tunes it on validation data, and
  `tune_label_name_bias` re-tunes it together with the label-name bias).

    ensemble = LabelformerEnsemble.from_pretrained(["runs/seed1", "runs/seed2"])
    ensemble.predict_labels(["Shares of ... rose ..."])
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging

from .multilabel_labelformer import (
    DecodingBiasLogitsProcessor,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    MultiLabelPredictionMixin,
    ThresholdDecisionMixin,
    _GreedyLabelDecoder,
    add_optional,
    decoding_row_biases,
    per_model,
)
from .set_search_labelformer import (
    decoded_sets,
    label_order_key,
    mean_sequence_scores,
    order_groups,
    search_label_sets,
    set_scores,
)

_HEADS = (LabelformerForMultiLabelGeneration, LabelformerForMultiLabelClassification)

logger = logging.get_logger(__name__)


def check_lexical_scorers(models: Sequence[nn.Module]) -> None:
    """Raise when some members have a lexical scorer and others not; warn when their scorers differ.

    The ensemble adds member 0's margins once (`lexical_label_scorer`): right when every member was
    fitted on the same training texts (train_multilabel.py on one split does that), not otherwise.
    """
    scorers = [getattr(model, "lexical_label_scorer", None) for model in models]
    for i, scorer in enumerate(scorers[1:], start=1):
        if (scorer is None) != (scorers[0] is None):
            raise ValueError(
                f"Member {i} {'has no' if scorer is None else 'has a'} lexical scorer but member 0 "
                f"{'has one' if scorer is None else 'has none'}: ensemble members must all be built with the same "
                "`lexical_scorer` setting."
            )
        if scorer is not None and not all(
            torch.allclose(getattr(scorer, name).float(), getattr(scorers[0], name).float(), atol=1e-3)
            for name in ("idf", "weight", "bias")
        ):
            logger.warning(
                "Member %d holds another lexical scorer than member 0 (fitted on other texts or settings); the "
                "ensemble adds member 0's margins only.",
                i,
            )


class LabelformerEnsemble(ThresholdDecisionMixin, MultiLabelPredictionMixin, nn.Module):
    """Models of one multi-label head that predict together; `predict_labels` as on a single model.

    Args:
        models: trained `LabelformerForMultiLabelGeneration` or `LabelformerForMultiLabelClassification`
            models (all of the same head) with the same labels in the same order and the same
            tokenizer vocabulary size. The first member's tokenizer is used for all.

    Raises:
        ValueError: no models, mixed or unsupported heads, or members whose labels, label
            limits, vocabulary sizes or lexical-scorer settings differ (the message names the first
            mismatch). Members whose fitted lexical scorers differ get a warning: the ensemble
            uses member 0's.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("LabelformerEnsemble needs at least one model.")
        head = type(models[0])
        if head not in _HEADS:
            raise ValueError(
                f"LabelformerEnsemble supports {', '.join(h.__name__ for h in _HEADS)}; got {head.__name__}."
            )
        first = models[0].config
        for i, model in enumerate(models[1:], start=1):
            if type(model) is not head:
                raise ValueError(f"Member {i} is a {type(model).__name__} but member 0 is a {head.__name__}.")
            for key in ("id2label", "vocab_size", "min_labels", "effective_max_labels"):
                if getattr(model.config, key) != getattr(first, key):
                    raise ValueError(
                        f"Member {i} differs from member 0 in `{key}`: ensemble members must be trained on the "
                        "same label set with the same tokenizer and label limits."
                    )
        check_lexical_scorers(models)
        self.members = nn.ModuleList(models)
        self.is_generation = head is LabelformerForMultiLabelGeneration
        #: Member 0's config; for threshold heads ``classifier_threshold``, ``label_name_bias`` and
        #: ``lexical_logit_weight`` are the members' means.
        self.config = copy.deepcopy(first)
        if not self.is_generation:
            self.config.classifier_threshold = sum(m.config.classifier_threshold for m in models) / len(models)
            if first.label_name_token_ids is not None:
                self.config.label_name_bias = sum(m.config.label_name_bias for m in models) / len(models)
            if first.lexical_scorer:
                self.config.lexical_logit_weight = sum(m.config.lexical_logit_weight for m in models) / len(models)
        self.name_or_path = getattr(models[0], "name_or_path", "")

    @classmethod
    def from_pretrained(cls, folders: Sequence[str | os.PathLike], **kwargs: Any) -> LabelformerEnsemble:
        """Load each saved model folder (its head from ``config.architectures``) and check they share a tokenizer.

        ``kwargs`` go to every member's ``from_pretrained`` (e.g. ``dtype``, ``device_map``).
        """
        from transformers import AutoConfig, PreTrainedTokenizerFast

        models, vocabularies = [], []
        for folder in folders:
            architectures = AutoConfig.from_pretrained(folder).architectures or []
            head = next((h for h in _HEADS if h.__name__ in architectures), None)
            if head is None:
                raise ValueError(
                    f"{folder} holds a {architectures or 'model of unknown class'}; LabelformerEnsemble needs "
                    f"{' or '.join(h.__name__ for h in _HEADS)} folders."
                )
            models.append(head.from_pretrained(folder, **kwargs))
            if (Path(folder) / "tokenizer.json").is_file():
                vocabularies.append((folder, PreTrainedTokenizerFast.from_pretrained(folder).get_vocab()))
        for folder, vocabulary in vocabularies[1:]:
            if vocabulary != vocabularies[0][1]:
                raise ValueError(
                    f"The tokenizer in {folder} differs from the one in {vocabularies[0][0]}: ensemble members must "
                    "be trained with the same tokenizer (train_multilabel.py --tokenizer_name_or_path)."
                )
        return cls(models)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def lexical_label_scorer(self) -> nn.Module | None:
        """Member 0's lexical scorer (members fitted on the same training data hold the same one), or ``None``."""
        return getattr(self.members[0], "lexical_label_scorer", None)

    def __len__(self) -> int:
        return len(self.members)

    def set_decoding_bias(self, eos_logit_bias: float = 0.0, label_logit_bias: Sequence[float] | None = None) -> None:
        """Generation heads: set the same decoding bias on every member (and on ``config``)."""
        if not self.is_generation:
            raise TypeError("set_decoding_bias is for ensembles of generation heads.")
        for member in self.members:
            member.set_decoding_bias(eos_logit_bias, label_logit_bias)
        self.config.eos_logit_bias = self.members[0].config.eos_logit_bias
        self.config.label_logit_bias = self.members[0].config.label_logit_bias

    def set_label_name_bias(self, bias: float, name_token_ids: Sequence[Sequence[Sequence[int]]] | None = None) -> None:
        """Set the label-name bias (and word ids) on ``config`` and on every member, so each saves it."""
        for member in self.members:
            member.set_label_name_bias(bias, name_token_ids)
        super().set_label_name_bias(bias, name_token_ids)

    def set_lexical_logit_weight(self, weight: float) -> None:
        """Set the lexical logit weight on ``config`` and on every member, so each saves it."""
        for member in self.members:
            member.set_lexical_logit_weight(weight)
        super().set_lexical_logit_weight(weight)

    def configure_set_search(self, rounds: int, label_bias: float = 0.0) -> None:
        """Generation heads: set the set search (rounds, per-label reward) on ``config`` and on every member."""
        if not self.is_generation:
            raise TypeError("configure_set_search is for ensembles of generation heads.")
        for member in self.members:
            member.configure_set_search(rounds, label_bias)
        super().configure_set_search(rounds, label_bias)

    def label_probabilities(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Threshold heads: the members' mean sigmoid probabilities ``[b, num_labels]`` for ids ``[b, s]``."""
        if self.is_generation:
            raise TypeError("label_probabilities is for ensembles of threshold heads.")
        return sum(
            torch.sigmoid(m(input_ids=input_ids, attention_mask=attention_mask).logits.float()) for m in self.members
        ) / len(self.members)

    @torch.no_grad()
    def predict_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1
    ) -> list[dict[str, float]]:
        """Label sets for a tokenized batch ``[b, s]`` with averaged scores.

        Generation heads: members that write labels in the same order (`order_groups`) decode
        greedily together, on their averaged step distributions. When there are several such groups
        (e.g. frequency- and alphabetical-order members) or ``num_beams`` > 1, the candidates (each
        group's greedy answer, with beams also every member's ``num_beams`` beam-search hypotheses)
        are pooled and each row keeps the one with the highest ensemble score (`set_scores`: per
        group the product over steps of its members' mean constrained probabilities, EOS included,
        in its own order; groups averaged in log space by size). With ``config.set_search_rounds``
        > 0 the answer is then refined by set search on the same scores (`search_label_sets`).
        """
        if num_beams < 1:
            raise ValueError(f"`num_beams` must be >= 1, got {num_beams}.")
        if not self.is_generation:
            return self.threshold_label_dicts(input_ids, attention_mask)
        states = [m.model.encoder(input_ids, attention_mask).last_hidden_state for m in self.members]
        batch, source_len = input_ids.shape
        evidence, learned = decoding_row_biases(self, self.members, input_ids)
        row_bias = [add_optional(evidence, term) for term in learned]
        groups = order_groups(self.members)
        # Per member, its decoded labels as a candidate in member 0's writing order (`set_scores`): as
        # written for member 0's group, re-ordered for the others.
        canonical = label_order_key(self.config)
        as_candidate = [tuple if i in groups[0] else canonical for i in range(len(self.members))]
        candidates: list[set[tuple[int, ...]]] = [set() for _ in range(batch)]
        for group in groups:
            decoder = _GreedyLabelDecoder([self.members[i] for i in group], batch, source_len,
                                          self.config.effective_max_labels + 1, states[0].device, states[0].dtype,
                                          cuda_graph=False)  # fmt: skip
            tokens, scores = decoder([states[i] for i in group], attention_mask, [row_bias[i] for i in group])
            for row, labels in enumerate(decoded_sets(tokens)):
                candidates[row].add(as_candidate[group[0]](labels))
        if num_beams > 1:
            self._add_beams(candidates, states, attention_mask, num_beams, row_bias, as_candidate)
        if len(groups) > 1 or num_beams > 1:
            tokens, scores = self._best_candidates(candidates, states, attention_mask, row_bias)
        if self.config.set_search_rounds:
            tokens, scores = search_label_sets(self.members, self.config, tokens, states, attention_mask, learned,
                                               evidence)  # fmt: skip
        return self.members[0]._label_dicts(tokens, scores)

    def member_row_biases(self, input_ids: torch.Tensor) -> list[torch.Tensor | None]:
        """Generation heads: per member, what decoding adds to each row ``[b, v]`` for ids ``[b, s]``: the
        ensemble's label-name bias and weighted lexical margins plus the member's own learned label-name
        term (``None``: nothing)."""
        evidence, learned = decoding_row_biases(self, self.members, input_ids)
        return [add_optional(evidence, term) for term in learned]

    def sequence_scores(
        self,
        sequences: torch.Tensor,
        states: Sequence[torch.Tensor],
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        row_bias: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ensemble's view of candidate label sequences.

        Args:
            sequences: ``[n, t]`` labels then EOS (then padding), without the start token.
            states: each member's encoder output ``[b, s, d]``.
            attention_mask: ``[b, s]``.
            rows: ``[n]`` the batch row each candidate belongs to.
            row_bias: ``[b, v]`` what decoding adds to each batch row (`member_row_biases`): one for all
                members or one per member; ``None`` for nothing.

        Returns:
            ``[n]`` log-probability of each sequence up to and including its EOS, and ``[n, t]``
            the mean step probabilities. When members write labels in different orders, the
            sequences' label sets are scored by `set_scores` (``t`` is then the longest set + 1).
        """
        biases = per_model(row_bias, len(self.members))
        if len(order_groups(self.members)) == 1:
            return mean_sequence_scores(self.members, sequences, states, attention_mask, rows, biases)
        totals, _, step_probs = set_scores(self.members, decoded_sets(sequences), states, attention_mask, rows, biases)
        return totals, step_probs

    def _add_beams(
        self,
        candidates: list[set[tuple[int, ...]]],
        states: Sequence[torch.Tensor],
        attention_mask: torch.Tensor,
        num_beams: int,
        row_bias: Sequence[torch.Tensor | None],
        as_candidate: Sequence[Callable[[list[int]], tuple[int, ...]]],
    ) -> None:
        """Add every member's ``num_beams`` beam-search hypotheses to ``candidates``, each turned into a
        label-id tuple by that member's ``as_candidate``."""
        for member, h, bias, convert in zip(self.members, states, row_bias, as_candidate, strict=True):
            beams = member.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=h), attention_mask=attention_mask,
                num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                logits_processor=None if bias is None else [DecodingBiasLogitsProcessor(bias)],
            )  # fmt: skip
            for i, labels in enumerate(decoded_sets(beams[:, 1:])):
                candidates[i // num_beams].add(convert(labels))

    def _best_candidates(
        self,
        candidates: list[set[tuple[int, ...]]],
        states: Sequence[torch.Tensor],
        attention_mask: torch.Tensor,
        row_bias: Sequence[torch.Tensor | None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row the candidate set with the highest `set_scores`: ``[b, t]`` tokens and step probabilities."""
        flat = [(row, c) for row, pool in enumerate(candidates) for c in sorted(pool)]
        rows = torch.tensor([row for row, _ in flat], device=attention_mask.device)
        totals, sequences, step_probs = set_scores(self.members, [c for _, c in flat], states, attention_mask, rows,
                                                   row_bias)  # fmt: skip
        best: dict[int, int] = {}
        for i, (row, _) in enumerate(flat):
            if row not in best or totals[i] > totals[best[row]]:
                best[row] = i
        chosen = [best[row] for row in range(len(candidates))]
        return sequences[chosen], step_probs[chosen]


__all__ = ["LabelformerEnsemble"]
