"""Set search for the label-generation head: refine each decoded label set by local search.

Greedy and beam decoding commit to one label per step. The target order writes a document's
labels most frequent first, so once the decoder has written a rarer label ("corn") the more
frequent one it skipped ("grain") can no longer follow; the decision-time evidence (label-name
bias, lexical margins), added to every step's logits, can tip that first choice and lose the
skipped label for good. Set search scores whole label sets instead:

    F(S) = log P(S written in the label order, then EOS)  +  sum over labels l in S of (e_l + c)

``P`` is the generator's own sequence probability (its constrained logits with the decoding bias,
the learned label-name term and the document-level logits: everything it was trained with or
decodes with apart from the evidence), ``e_l`` the decision-time evidence for label ``l`` (what
`decoder_row_bias` adds for the label-name bias and the lexical scorer) and ``c`` is
``config.set_search_label_bias``, a reward per label that sets how large sets may grow. Starting
from the decoded set, each round tries every one-label change: adding one of the
``config.set_search_candidates`` labels ranked highest by ``e_l`` plus the first step's
log-probability, or dropping one label (within ``min_labels`` / ``max_labels``). It keeps the best
set and stops after ``config.set_search_rounds`` rounds or when no change raises ``F``.
`tune_decoding_bias` fits ``c`` on validation data (or leaves the search off).

Ensembles may mix members that write labels in different orders (`order_groups`): ``log P`` is
then each order group's log-probability of the set written in its own order, averaged by group
size (`set_scores`), as in ensembles of classifier chains with different chain orders.

This file is copied into saved model folders and must only import our own code relatively.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from .configuration_labelformer import EOS_TOKEN_ID, NUM_SPECIAL_DECODER_TOKENS, LabelformerConfig
from .modeling_labelformer import add_optional

#: Rounds of set search `tune_decoding_bias` tries by default (0 leaves it off).
SET_SEARCH_ROUNDS = 3
#: The per-label rewards ``c`` `tune_decoding_bias` tries for the set search.
SET_SEARCH_LABEL_BIASES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
#: Candidate sequences scored per forward pass (each copies its row's encoder states for cross-attention).
_CHUNK = 512


def order_kind(config: LabelformerConfig) -> str:
    """``"alphabetical"`` for heads that write labels by name, else ``"id"`` (``frequency`` writes by id;
    ``random`` was trained on every order, so any fixed one will do)."""
    return "alphabetical" if config.label_order == "alphabetical" else "id"


def label_order_key(config: LabelformerConfig) -> Callable[[Iterable[int]], tuple[int, ...]]:
    """Label ids -> a tuple in the order the head writes them (`order_kind`: by name or by id)."""
    if order_kind(config) == "alphabetical":
        names = config.id2label
        return lambda ids: tuple(sorted(ids, key=lambda i: names[i]))
    return lambda ids: tuple(sorted(ids))


def order_groups(models: Sequence[Any]) -> list[list[int]]:
    """Indices of ``models`` grouped by the order they write labels in (`order_kind`); member 0's group first.

    Members of one group decode step by step together; members of different groups only meet where
    whole label sets are scored (`set_scores`).
    """
    groups: dict[str, list[int]] = {}
    for i, model in enumerate(models):
        groups.setdefault(order_kind(model.config), []).append(i)
    return list(groups.values())


def _written(sequences: torch.Tensor) -> torch.Tensor:
    """``[n, t]`` label tokens, EOS, padding -> ``[n, t]`` True up to and including the first EOS."""
    is_end = (sequences < NUM_SPECIAL_DECODER_TOKENS).long()  # EOS or padding
    return is_end.cumsum(1) - is_end == 0


def mean_sequence_scores(
    models: Sequence[Any],
    sequences: torch.Tensor,
    states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    row_biases: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score candidate label sequences with generation heads that share one label vocabulary.

    Args:
        models: `LabelformerForMultiLabelGeneration` heads (one, or an ensemble's members).
        sequences: ``[n, t]`` label tokens then EOS (then padding), without the start token.
        states: each model's encoder output ``[b, s, d]``.
        attention_mask: ``[b, s]``.
        rows: ``[n]`` the batch row each candidate belongs to.
        row_biases: per model, ``[b, v]`` added at every step (``None``: nothing).

    Returns:
        ``[n]`` log of the product of the models' mean step probabilities up to and including EOS,
        and ``[n, t]`` those mean step probabilities (0 after EOS).
    """
    start = torch.full_like(sequences[:, :1], models[0].config.decoder_start_token_id)
    with_start = torch.cat([start, sequences], dim=1)
    step_probs = sum(
        model.label_scores(
            with_start,
            BaseModelOutput(last_hidden_state=h[rows]),
            attention_mask[rows],
            None if bias is None else bias[rows],
        )  # fmt: skip
        for model, h, bias in zip(models, states, row_biases, strict=True)
    ) / len(models)
    scored = _written(sequences)  # [n, t]: no EOS before this position
    log_probs = torch.where(scored, step_probs.clamp(min=1e-30).log(), torch.zeros_like(step_probs))
    return log_probs.sum(1), step_probs.masked_fill(~scored, 0.0)


def label_sequences(sets: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> torch.Tensor:
    """Label-id sets (already in writing order) -> ``[n, max size + 1]`` tokens: labels, EOS, padding."""
    tokens = torch.full((len(sets), max((len(s) for s in sets), default=0) + 1), pad_token_id, dtype=torch.long)
    for i, labels in enumerate(sets):
        tokens[i, : len(labels) + 1] = torch.tensor([label + NUM_SPECIAL_DECODER_TOKENS for label in labels]
                                                    + [EOS_TOKEN_ID])  # fmt: skip
    return tokens.to(device)


def set_scores(
    models: Sequence[Any],
    sets: Sequence[Sequence[int]],
    states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    row_biases: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score label sets with generation heads that share one label vocabulary but may write in other orders.

    Each group of `order_groups` scores a set written in its own label order (`mean_sequence_scores`:
    the product of its members' mean step probabilities; member 0's group takes the sets as given,
    the others re-order them into theirs); the score is the groups' log-probabilities
    averaged with weights proportional to their sizes (a product of experts across orders, which is
    `mean_sequence_scores` itself when all members write alike).

    Args:
        models: `LabelformerForMultiLabelGeneration` heads (one, or an ensemble's members).
        sets: ``n`` label-id sets, in member 0's writing order (`label_order_key`).
        states: each model's encoder output ``[b, s, d]``.
        attention_mask: ``[b, s]``.
        rows: ``[n]`` the batch row each set belongs to.
        row_biases: per model, ``[b, v]`` added at every step (``None``: nothing).

    Returns:
        ``[n]`` the scores; ``[n, t]`` the sets as tokens (labels as given, EOS, padding);
        ``[n, t]`` per token, the groups' step probabilities of that token combined the same way (0 after EOS).
    """
    pad, device = models[0].config.pad_token_id, attention_mask.device
    total, written = 0.0, []
    for k, group in enumerate(order_groups(models)):
        order = label_order_key(models[group[0]].config)
        sequences = label_sequences(sets if k == 0 else [order(s) for s in sets], pad, device)
        log_prob, step_probs = mean_sequence_scores(
            [models[i] for i in group], sequences, [states[i] for i in group], attention_mask, rows,
            [row_biases[i] for i in group],
        )  # fmt: skip
        share = len(group) / len(models)
        total = total + share * log_prob
        written.append((sequences, step_probs, share))
    tokens, step_probs, _ = written[0]
    if len(written) == 1:
        return total, tokens, step_probs
    combined = torch.zeros_like(step_probs)
    for sequences, probs, share in written:  # each token's log step probability, moved to member 0's positions
        logs = torch.where(_written(sequences), probs.clamp(min=1e-30).log(), torch.zeros_like(probs))
        by_token = torch.zeros(len(sets), models[0].config.decoder_vocab_size, device=device, dtype=logs.dtype)
        combined += share * by_token.scatter_add_(1, sequences, logs).gather(1, tokens)
    return total, tokens, combined.exp().masked_fill(~_written(tokens), 0.0)


def decoded_sets(tokens: torch.Tensor) -> list[list[int]]:
    """``[b, t]`` decoded tokens -> per row the label ids up to the first EOS (or padding)."""
    sets = []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t < NUM_SPECIAL_DECODER_TOKENS), len(row))
        sets.append([t - NUM_SPECIAL_DECODER_TOKENS for t in row[:end]])
    return sets


def local_search(
    starts: Sequence[Sequence[int]],
    score: Callable[[list[tuple[int, ...]], list[int]], list[float]],
    evidence: torch.Tensor,
    ranking: torch.Tensor,
    rounds: int,
    candidates: int,
    min_labels: int,
    max_labels: int,
    order: Callable[[Iterable[int]], tuple[int, ...]] = lambda ids: tuple(sorted(ids)),
) -> list[tuple[int, ...]]:
    """Hill-climb each row's label set on ``score(S) + sum(evidence[row, l] for l in S)``.

    Args:
        starts: per row, the label ids to start from.
        score: ``(sets, rows) -> values``: the model's log-probability of each set (in writing order)
            for its batch row; called once per round with the sets not scored before.
        evidence: ``[b, L]`` what each label adds to a set's score.
        ranking: ``[b, L]``; the ``candidates`` highest labels of a row are the ones tried for adding.
        rounds: at most this many rounds of one-label changes.
        min_labels / max_labels: the sizes a set may have.
        order: label ids -> the tuple the head writes (`label_order_key`).

    Returns:
        Per row, the best set found (the start wins ties), in writing order.
    """
    current = [order(s) for s in starts]
    top = ranking.topk(min(candidates, ranking.shape[-1]), dim=-1).indices.tolist()
    gains = evidence.tolist()
    cache: list[dict[tuple[int, ...], float]] = [{} for _ in current]
    for _ in range(rounds):
        options = []
        for row, labels in enumerate(current):
            moves = [labels]
            if len(labels) < max_labels:
                moves += [order((*labels, j)) for j in top[row] if j not in labels]
            if len(labels) > min_labels:
                moves += [tuple(x for x in labels if x != j) for j in labels]
            options.append(moves)
        todo = [(row, s) for row, moves in enumerate(options) for s in dict.fromkeys(moves) if s not in cache[row]]
        if todo:
            for (row, s), value in zip(todo, score([s for _, s in todo], [row for row, _ in todo]), strict=True):
                cache[row][s] = value
        best = [
            max(moves, key=lambda s, row=row: cache[row][s] + sum(gains[row][j] for j in s))
            for row, moves in enumerate(options)
        ]
        if best == current:
            break
        current = best
    return current


@torch.no_grad()
def search_label_sets(
    models: Sequence[Any],
    config: LabelformerConfig,
    tokens: torch.Tensor,
    states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    network_biases: Sequence[torch.Tensor | None],
    evidence: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine decoded label sets by set search (module docstring) with ``config``'s settings.

    Args:
        models: the generation heads that decoded together (one model, or an ensemble's members).
        config: holds ``set_search_rounds``, ``set_search_candidates``, ``set_search_label_bias``,
            the label order and the label-count limits.
        tokens: ``[b, t]`` the decoded tokens (labels, EOS, padding).
        states: each model's encoder output ``[b, s, d]``.
        attention_mask: ``[b, s]``.
        network_biases: per model, the ``[b, v]`` row bias that is part of the network (the learned
            label-name term) or ``None``.
        evidence: ``[b, v]`` the decision-time evidence (label-name bias and weighted lexical margins)
            or ``None``.

    Returns:
        ``[b, t']`` tokens of the chosen sets (written in the label order, then EOS) and ``[b, t']``
        their step probabilities as decoding reports them (evidence included).
    """
    batch, device = tokens.shape[0], tokens.device
    gains = torch.full((batch, config.num_labels), float(config.set_search_label_bias), device=device)
    if evidence is not None:
        gains = gains + evidence[:, NUM_SPECIAL_DECODER_TOKENS:].float()
    start = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long, device=device)
    first = sum(
        model._constrained_logits(start, BaseModelOutput(last_hidden_state=h), attention_mask, bias)[:, 0].softmax(-1)
        for model, h, bias in zip(models, states, network_biases, strict=True)
    ) / len(models)  # [b, v]: the first step's mean distribution
    ranking = gains + first[:, NUM_SPECIAL_DECODER_TOKENS:].clamp(min=1e-30).log()

    def score(sets: list[tuple[int, ...]], rows: list[int]) -> list[float]:
        values = []
        for at in range(0, len(sets), _CHUNK):
            where = torch.tensor(rows[at : at + _CHUNK], device=device)
            totals, _, _ = set_scores(models, sets[at : at + _CHUNK], states, attention_mask, where, network_biases)
            values += totals.tolist()
        return values

    chosen = local_search(
        decoded_sets(tokens), score, gains, ranking, config.set_search_rounds, config.set_search_candidates,
        config.min_labels, config.effective_max_labels, label_order_key(config),
    )  # fmt: skip
    full = [add_optional(evidence, bias) for bias in network_biases]
    _, sequences, step_probs = set_scores(models, chosen, states, attention_mask, torch.arange(batch, device=device),
                                          full)  # fmt: skip
    return sequences, step_probs


__all__ = [
    "SET_SEARCH_LABEL_BIASES",
    "SET_SEARCH_ROUNDS",
    "label_order_key",
    "local_search",
    "mean_sequence_scores",
    "order_groups",
    "order_kind",
    "search_label_sets",
    "set_scores",
]
