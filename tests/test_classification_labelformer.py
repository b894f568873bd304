"""Multi-label heads: constrained decoding, targets, predict_labels, threshold head, learning."""

from __future__ import annotations

import random

import pytest
import torch

from modeling import (
    LabelformerConfig,
    LabelformerEnsemble,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    MultiLabelCollator,
    train_tokenizer,
)
from modeling.data_labelformer import label_target, order_labels
from modeling.multilabel_labelformer import allowed_label_tokens, label_set_bce, threshold_decisions

from .synthetic import LABELS, NUM_CLASSES, check_fast_greedy_matches_generate, synthetic_batch, synthetic_config

SPECIAL = 3


def check_label_sequences(sequences: torch.Tensor, config: LabelformerConfig, max_new_tokens: int) -> None:
    """Every generated row is a valid label set: labels only, no repeats, EOS rules, then padding."""
    for row in sequences.tolist():
        assert row[0] == config.decoder_start_token_id
        body = row[1:]
        labels = []
        for i, token in enumerate(body):
            if token == config.eos_token_id:
                # beam search fills finished rows with EOS when pad_token_id is 0 (`pad or eos` upstream)
                assert all(t in (config.pad_token_id, config.eos_token_id) for t in body[i + 1 :]), row
                break
            assert token >= SPECIAL, f"non-label token {token} in {row}"
            labels.append(token)
        else:
            assert len(body) == max_new_tokens
        assert len(labels) == len(set(labels)), f"repeated label in {row}"
        assert len(labels) <= config.effective_max_labels
        if len(labels) < len(body):  # stopped with EOS
            assert len(labels) >= min(config.min_labels, config.num_labels)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "mode", [{"num_beams": 1}, {"num_beams": 4}, {"num_beams": 1, "do_sample": True, "temperature": 3.0}]
)
@pytest.mark.parametrize("limits", [{}, {"min_labels": 2, "max_labels": 3}, {"min_labels": 0, "max_labels": 1}])
def test_constrained_decoding_is_always_a_valid_label_set(seed, mode, limits):
    torch.manual_seed(seed)
    config = synthetic_config(init_std=0.5 + seed, **limits)  # large random weights: peaky, adversarial logits
    model = LabelformerForMultiLabelGeneration(config).eval()
    with torch.no_grad():  # push the raw model towards forbidden tokens: specials and one label
        model.lm_head.weight[: SPECIAL + 1] *= 20
    ids, _ = synthetic_batch(6, 12, torch.Generator().manual_seed(seed))
    sequences = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, **mode)
    check_label_sequences(sequences, config, 12)


def test_allowed_tokens_worked_example():
    # vocab: pad bos eos + labels 3..6; prefix [bos, 4, 6]
    allowed = allowed_label_tokens(torch.tensor([[1, 4, 6]]), 7, min_labels=2, max_labels=3)[0]
    assert allowed[0].tolist() == [False, False, False, True, True, True, True]  # after bos: any label, no EOS
    assert allowed[1].tolist() == [False, False, False, True, False, True, True]  # 1 label: EOS still banned
    assert allowed[2].tolist() == [False, False, True, True, False, True, False]  # 2 labels: EOS ok
    at_max = allowed_label_tokens(torch.tensor([[1, 3, 4, 5]]), 7, min_labels=1, max_labels=3)[0, -1]
    assert at_max.tolist() == [False, False, True, False, False, False, False]  # max reached: only EOS


def test_generation_respects_max_labels_even_when_the_model_never_stops():
    config = synthetic_config(max_labels=2)
    model = LabelformerForMultiLabelGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[config.eos_token_id] = -10 * model.lm_head.weight[3:].mean(0)
    ids, _ = synthetic_batch(4, 10, torch.Generator().manual_seed(0))
    sequences = model.generate(input_ids=ids)
    assert sequences.shape[1] <= 1 + 2 + 1
    check_label_sequences(sequences, config, config.effective_max_labels + 1)
    assert (sequences[:, 1:3] >= SPECIAL).all()


def test_label_orders():
    label2id = {"earn": 0, "acq": 1, "grain": 2, "wheat": 3}
    labels = ["wheat", "earn", "grain"]
    assert order_labels(labels, label2id, "frequency") == [0, 2, 3]
    assert order_labels(labels, label2id, "alphabetical") == [0, 2, 3]  # earn, grain, wheat
    assert order_labels(["wheat", "acq"], label2id, "alphabetical") == [1, 3]
    seen = {tuple(order_labels(labels, label2id, "random", random.Random(s))) for s in range(30)}
    assert len(seen) > 1 and all(sorted(p) == [0, 2, 3] for p in seen)
    assert label_target([0, 2, 3]) == [3, 5, 6, 2]


@pytest.mark.parametrize("order", ["frequency", "alphabetical", "random"])
def test_collator_builds_ordered_targets(order):
    tokenizer = train_tokenizer(["alpha beta gamma delta"] * 10, vocab_size=40)
    config = LabelformerConfig.from_labels(["z", "a", "m"], vocab_size=len(tokenizer), label_order=order)
    collator = MultiLabelCollator(tokenizer, config, max_length=8)
    rows = [{"text": "alpha beta", "labels": ["m", "z", "a"]}, {"text": "gamma", "labels": ["a"]}]
    epochs = [collator(rows)["labels"] for _ in range(8)]
    first = epochs[0]
    assert first[1].tolist() == [1 + SPECIAL, 2, -100, -100]
    expected = {"frequency": [3, 4, 5, 2], "alphabetical": [4, 5, 3, 2]}
    if order == "random":
        assert len({tuple(e[0].tolist()) for e in epochs}) > 1  # re-shuffled on every pass
        assert all(sorted(e[0, :3].tolist()) == [3, 4, 5] and e[0, 3] == 2 for e in epochs)
    else:
        assert first[0].tolist() == expected[order]
    classification = MultiLabelCollator(tokenizer, config, head="classification")(rows)["labels"]
    assert classification.tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]


def test_scheduled_sampling_replaces_gold_inputs():
    config = synthetic_config(scheduled_sampling_prob=0.5)
    model = LabelformerForMultiLabelGeneration(config).train()
    ids, _ = synthetic_batch(4, 10, torch.Generator().manual_seed(0))
    labels = torch.tensor([[3, 5, 7, 2], [4, 2, -100, -100], [6, 3, 2, -100], [9, 10, 8, 2]])
    encoder_outputs = model.model.encoder(ids)
    model.scheduled_sampling_probability = 0.0
    loss_plain = model(input_ids=ids, labels=labels).loss
    model.scheduled_sampling_probability = 1.0
    mixed = model._scheduled_sampling_inputs(labels, encoder_outputs, None)
    assert (mixed[:, 0] == config.decoder_start_token_id).all()
    # inputs at positions without a loss stay gold (EOS, then padding)
    assert mixed[1, 2:].tolist() == [2, 0] and mixed[2, 3].item() == 2
    replaced = labels[:, 1:] != -100
    assert (mixed[:, 1:][replaced] >= SPECIAL).all()  # every other input is the model's own label choice
    loss_sampled = model(input_ids=ids, labels=labels).loss
    assert torch.isfinite(loss_sampled) and loss_sampled.item() != pytest.approx(loss_plain.item())
    loss_sampled.backward()


def test_predict_labels_on_raw_strings_and_errors():
    texts = ["wheat prices rise", "corn and wheat harvest", "company earnings up"]
    tokenizer = train_tokenizer(texts * 5, vocab_size=50)
    config = LabelformerConfig.from_labels(
        ["wheat", "corn", "earn"],
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
    )
    for head in (LabelformerForMultiLabelGeneration(config), LabelformerForMultiLabelClassification(config)):
        names = head.predict_labels(texts, tokenizer=tokenizer, batch_size=2)
        scored = head.predict_labels(texts, tokenizer=tokenizer, return_scores=True)
        assert len(names) == 3 and all(len(n) >= 1 and set(n) <= {"wheat", "corn", "earn"} for n in names)
        assert [list(s) for s in scored] == names
        assert all(0.0 <= p <= 1.0 for s in scored for p in s.values())
        assert head.predict_labels("wheat prices rise", tokenizer=tokenizer) == names[:1]
        with pytest.raises(ValueError, match="index 1 is empty"):
            head.predict_labels(["fine", "  "], tokenizer=tokenizer)
        with pytest.raises(ValueError, match="index 2 is a int"):
            head.predict_labels(["fine", "ok", 3], tokenizer=tokenizer)
        with pytest.raises(ValueError, match="needs a tokenizer"):
            head.predict_labels(["fine"])
    big_tokenizer = train_tokenizer(
        ["x y z " * 40 + " ".join(f"w{i}" for i in range(200))], vocab_size=300, min_frequency=1
    )
    with pytest.raises(ValueError, match="does not belong to this model"):
        head.predict_labels(["fine"], tokenizer=big_tokenizer)


def test_generation_head_rejects_a_config_without_label_vocabulary():
    with pytest.raises(ValueError, match="from_labels"):
        LabelformerForMultiLabelGeneration(LabelformerConfig(vocab_size=50))


def test_threshold_rules_and_tuning():
    probs = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.3, 0.1], [0.7, 0.8, 0.75]])
    assert threshold_decisions(probs, 0.5, 1, 3).tolist() == [[True, True, False], [False, True, False], [True] * 3]
    assert threshold_decisions(probs, 0.5, 0, 2).tolist() == [[True, True, False], [False] * 3, [False, True, True]]
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 1]])
    config = LabelformerConfig.from_labels(["a", "b", "c"], vocab_size=20, d_model=32, encoder_attention_heads=2)
    head = LabelformerForMultiLabelClassification(config)
    threshold, f1 = head.tune_threshold(probs, targets)
    assert 0.6 < threshold <= 0.7 and f1 == 1.0
    assert head.config.classifier_threshold == threshold


def train_synthetic(model, steps: int, collate_labels, lr: float = 2e-3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids, label_sets = synthetic_batch(64, 16, generator)
        loss = model(input_ids=ids, labels=collate_labels(label_sets)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


def generation_targets(label_sets):
    sequences = [label_target(sorted(LABELS.index(x) for x in labels)) for labels in label_sets]
    out = torch.full((len(sequences), max(map(len, sequences))), -100)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s)
    return out


@pytest.mark.parametrize("overrides", [{"norm_position": "pre"}, {"norm_position": "post", "init_std": 0.05}])
def test_generation_head_learns_varying_label_counts(overrides):
    model = LabelformerForMultiLabelGeneration(synthetic_config(**overrides))
    model = train_synthetic(model, 300, generation_targets)
    ids, gold = synthetic_batch(300, 16, torch.Generator().manual_seed(99))
    assert {len(g) for g in gold} == {1, 2, 3}
    for num_beams in (1, 3):
        predicted = model.predict_batch(ids, torch.ones_like(ids), num_beams=num_beams)
        exact = sum(set(p) == set(g) for p, g in zip(predicted, gold)) / len(gold)
        assert exact >= 0.9, f"exact match {exact:.3f} with {num_beams} beams"


def test_threshold_head_learns():
    def targets(label_sets):
        out = torch.zeros(len(label_sets), NUM_CLASSES)
        for i, labels in enumerate(label_sets):
            out[i, [LABELS.index(x) for x in labels]] = 1
        return out

    model = train_synthetic(LabelformerForMultiLabelClassification(synthetic_config()), 200, targets)
    ids, gold = synthetic_batch(300, 16, torch.Generator().manual_seed(99))
    predicted = model.predict_batch(ids, torch.ones_like(ids), 1)
    exact = sum(set(p) == set(g) for p, g in zip(predicted, gold)) / len(gold)
    assert exact >= 0.9, f"exact match {exact:.3f}"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("limits", [{}, {"min_labels": 2, "max_labels": 3}, {"min_labels": 0}])
def test_fast_greedy_path_matches_generate(seed, limits):
    """`greedy_labels` (running state, no generate) == generate() + LabelSetLogitsProcessor + rescoring."""
    torch.manual_seed(seed)
    model = LabelformerForMultiLabelGeneration(synthetic_config(init_std=0.3, **limits)).eval()
    ids, _ = synthetic_batch(6, 12, torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, -4:] = 0
    check_fast_greedy_matches_generate(model, ids, mask)


def test_generate_shows_the_decoder_vocabulary_size_while_it_runs():
    # transformers 5.17 sizes beam scores by `config.get_text_config().vocab_size`; with a label
    # vocabulary smaller than the text vocabulary that broke beam search (shape error).
    from transformers import LogitsProcessor, LogitsProcessorList

    model = LabelformerForMultiLabelGeneration(synthetic_config()).eval()
    assert model.config.vocab_size != model.config.decoder_vocab_size
    seen = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append((model.config.get_text_config().vocab_size, scores.shape[-1]))
            return scores

    ids, _ = synthetic_batch(3, 12, torch.Generator().manual_seed(0))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=3,
                   logits_processor=LogitsProcessorList([Record()]))  # fmt: skip
    assert seen and all(vocab == width for vocab, width in seen)
    assert model.config.vocab_size != model.config.decoder_vocab_size  # restored afterwards


def test_auxiliary_bce_loss_reads_the_label_sets_and_round_trips(tmp_path):
    config = synthetic_config(auxiliary_bce_weight=0.5)
    model = LabelformerForMultiLabelGeneration(config).eval()
    ids, _ = synthetic_batch(2, 10, torch.Generator().manual_seed(1))
    # row 0: labels 0 and 4 then EOS; row 1: label 2, EOS, padding
    labels = torch.tensor([[3, 7, 2], [5, 2, -100]])
    plain = LabelformerForMultiLabelGeneration(synthetic_config())
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.eval()
    sequence_loss = plain(input_ids=ids, labels=labels).loss
    # logits that are confidently right about exactly these sets cost (almost) nothing ...
    right = torch.full((2, config.num_labels), -30.0)
    right[0, [0, 4]] = 30.0
    right[1, 2] = 30.0
    assert label_set_bce(right, labels) < 1e-6
    assert label_set_bce(right.flip(0), labels) > 1.0
    # ... and an uninformed classifier adds weight * log(2) to the sequence loss
    with torch.no_grad():
        model.auxiliary_classifier.weight.zero_()
        model.auxiliary_classifier.bias.zero_()
    total = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(total, sequence_loss + 0.5 * torch.log(torch.tensor(2.0)))
    total.backward()
    assert model.auxiliary_classifier.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = LabelformerForMultiLabelGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.auxiliary_classifier.bias, model.auxiliary_classifier.bias)
    with pytest.raises(ValueError, match="auxiliary_bce_weight"):
        synthetic_config(auxiliary_bce_weight=-1.0)


def global_model(seed: int, strength: float = 4.0, **overrides) -> LabelformerForMultiLabelGeneration:
    """A generator with document-level label logits strong enough to change its decisions."""
    torch.manual_seed(seed)
    model = LabelformerForMultiLabelGeneration(synthetic_config(global_label_logits=True, **overrides)).eval()
    with torch.no_grad():
        model.auxiliary_classifier.weight.normal_(0.0, strength)
    return model


def test_global_label_logits_enter_the_loss_and_every_decoding_path_once(tmp_path):
    model = global_model(seed=21)
    plain = LabelformerForMultiLabelGeneration(synthetic_config()).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected == ["auxiliary_classifier.weight", "auxiliary_classifier.bias"]
    ids, _ = synthetic_batch(8, 12, torch.Generator().manual_seed(21))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    labels = torch.tensor([[5, 3, 2]] * len(ids))
    with torch.no_grad():
        states = model.model.encoder(ids, mask).last_hidden_state
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        document = torch.nn.functional.pad(model.auxiliary_classifier(pooled), (SPECIAL, 0))  # [b, v]
        torch.testing.assert_close(model.global_row_bias(states, mask), document)
        logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        want = plain(input_ids=ids, attention_mask=mask, labels=labels).logits + document[:, None, :]
        torch.testing.assert_close(logits, want)
        expected = torch.nn.functional.cross_entropy(want.reshape(-1, want.shape[-1]), labels.reshape(-1))
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss, expected)
        assert model.predict_batch(ids, mask) != plain.predict_batch(ids, mask)  # the term decides
        embedded = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, labels=labels)
        torch.testing.assert_close(embedded.logits, want)  # also from embeddings alone
    # the sequence loss alone trains the classifier (no auxiliary BCE)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert model.auxiliary_classifier.weight.grad.abs().sum() > 0
    model.eval()
    # fast greedy (static decoder) == generate() rescored by label_scores: each adds the term exactly once
    fast = check_fast_greedy_matches_generate(model, ids, mask)
    with torch.no_grad():
        assert LabelformerEnsemble([model]).predict_batch(ids, mask) == fast
        assert LabelformerEnsemble([model, model]).predict_batch(ids, mask, 3) == model.predict_batch(ids, mask, 3)
    model.save_pretrained(tmp_path)
    loaded = LabelformerForMultiLabelGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.global_label_logits is True
    with torch.no_grad():
        assert loaded.predict_batch(ids, mask) == fast


def test_global_label_logits_with_the_auxiliary_bce_train_what_decoding_adds():
    """With both on, the auxiliary BCE scores the document-level logits that decoding adds."""
    model = global_model(seed=22, auxiliary_bce_weight=2.0)
    ids, _ = synthetic_batch(4, 10, torch.Generator().manual_seed(22))
    labels = torch.tensor([[3, 7, 2], [5, 2, -100], [4, 2, -100], [6, 3, 2]])
    with torch.no_grad():
        total = model(input_ids=ids, labels=labels).loss
        document = model.global_row_bias(model.model.encoder(ids).last_hidden_state, None)[:, SPECIAL:]
        model.config.auxiliary_bce_weight = 0.0
        sequence = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(total, sequence + 2.0 * label_set_bce(document, labels))


def test_global_label_logits_are_refused_where_they_make_no_sense():
    from modeling import LabelformerForParallelLabelGeneration

    with pytest.raises(ValueError, match="`global_label_logits` must be True or False"):
        synthetic_config(global_label_logits=1)
    with pytest.raises(ValueError, match="threshold head is that document-level classifier"):
        LabelformerForMultiLabelClassification(synthetic_config(global_label_logits=True))
    with pytest.raises(ValueError, match="parallel head does not support `global_label_logits`"):
        LabelformerForParallelLabelGeneration(synthetic_config(global_label_logits=True))
