"""The label-generation head: constrained generate(), scores, predict_labels, learning."""

from __future__ import annotations

import pytest
import torch

from modeling import (
    LabelformerConfig,
    LabelformerForMultiLabelClassification,
    LabelformerForMultiLabelGeneration,
    train_tokenizer,
)
from modeling.data_labelformer import label_target
from modeling.generation_labelformer import LabelEncoderOutput

from .synthetic import LABELS, synthetic_batch, synthetic_config

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


@pytest.mark.parametrize("seed", range(2))
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


def test_generation_respects_max_labels_even_when_the_model_never_stops():
    config = synthetic_config(max_labels=2)
    model = LabelformerForMultiLabelGeneration(config).eval()
    with torch.no_grad():
        model.document_classifier.bias += 50.0  # every label far above EOS at every step
    ids, _ = synthetic_batch(4, 10, torch.Generator().manual_seed(0))
    for kwargs in ({}, {"num_beams": 2}):  # by default room for max_labels + EOS, fast path and generic loop
        sequences = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        assert sequences.shape[1] <= 1 + 2 + 1
        check_label_sequences(sequences, config, config.effective_max_labels + 1)
        assert (sequences[:, 1:3] >= SPECIAL).all()


def test_beam_scores_are_the_transition_scores_of_the_constrained_distribution():
    """With beams, predict_batch's scores (label_scores) == exp of compute_transition_scores of generate()."""
    torch.manual_seed(4)
    model = LabelformerForMultiLabelGeneration(synthetic_config(init_std=0.3)).eval()
    ids, _ = synthetic_batch(5, 12, torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, num_beams=3, output_scores=True,
                             return_dict_in_generate=True)  # fmt: skip
        steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices).exp()
        scores = model.label_scores(out.sequences, model.encode(ids, mask), mask)
        predicted = model.predict_batch(ids, mask, num_beams=3)
    assert model.decode_labels(out.sequences) == [list(p) for p in predicted]
    for row, scored in enumerate(predicted):
        n = len(scored) + 1  # the labels and EOS
        torch.testing.assert_close(scores[row, :n], steps[row, :n], atol=1e-5, rtol=1e-4)
        assert list(scored.values()) == pytest.approx(scores[row, : n - 1].tolist(), abs=1e-6)
        assert scores[row, :n].min() > 0 and scores[row, :n].max() <= 1


def test_constrained_logits_forbid_what_the_rules_forbid():
    model = LabelformerForMultiLabelGeneration(synthetic_config(min_labels=2, max_labels=3)).eval()
    ids, _ = synthetic_batch(1, 10, torch.Generator().manual_seed(0))
    prefix = torch.tensor([[1, 4, 6, 3]])  # start, then labels 1, 3 and 0
    with torch.no_grad():
        logits = model.constrained_logits(prefix, model.encode(ids), None)[0]
        raw = model(input_ids=ids, decoder_input_ids=prefix).logits[0]
    finite = torch.isfinite(logits)
    assert not finite[:, :SPECIAL][:, [0, 1]].any()  # never pad or bos
    assert finite[0, SPECIAL:].all() and not finite[0, 2]  # after start: any label, no EOS (min_labels 2)
    assert not finite[1, 2] and not finite[1, 4]  # one label out: EOS still banned, label 1 used
    assert finite[2, 2]  # two labels: EOS allowed
    assert finite[3].nonzero().flatten().tolist() == [2]  # three labels (max): only EOS
    torch.testing.assert_close(logits[finite], raw.float()[finite])  # allowed tokens keep forward()'s logits


def test_decode_labels_reads_names_up_to_the_first_eos():
    config = synthetic_config()
    model = LabelformerForMultiLabelGeneration(config).eval()
    sequences = torch.tensor([[1, 5, 3, 2, 0], [1, 2, 0, 0, 0], [1, 10, 4, 9, 8]])
    assert model.decode_labels(sequences) == [[LABELS[2], LABELS[0]], [], [LABELS[7], LABELS[1], LABELS[6], LABELS[5]]]
    assert model.decode_labels(sequences[:, 1:]) == model.decode_labels(sequences)  # start token optional


@pytest.fixture(scope="module")
def text_task():
    texts = ["wheat prices rise", "corn and wheat harvest", "company earnings up"]
    tokenizer = train_tokenizer(texts * 5, vocab_size=50)
    config = LabelformerConfig.from_labels(
        ["wheat", "corn", "earn"], vocab_size=len(tokenizer), d_model=32, encoder_attention_heads=2,
        decoder_attention_heads=2, init_std=0.3,
    )  # fmt: skip
    return texts, tokenizer, config


def test_predict_labels_on_raw_strings_is_generate(text_task):
    texts, tokenizer, config = text_task
    torch.manual_seed(0)
    model = LabelformerForMultiLabelGeneration(config).eval()
    predicted = {}
    for num_beams in (1, 2):
        names = model.predict_labels(texts, tokenizer=tokenizer, batch_size=2, num_beams=num_beams)
        predicted[num_beams] = names
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            sequences = model.generate(**batch, num_beams=num_beams)
        assert names == model.decode_labels(sequences)
        scored = model.predict_labels(texts, tokenizer=tokenizer, return_scores=True, num_beams=num_beams)
        assert [list(s) for s in scored] == names
        assert all(len(n) >= 1 and set(n) <= {"wheat", "corn", "earn"} for n in names)
        assert all(0.0 < p <= 1.0 for s in scored for p in s.values())
    assert model.predict_labels("wheat prices rise", tokenizer=tokenizer) == predicted[1][:1]


@pytest.mark.parametrize("head", [LabelformerForMultiLabelGeneration, LabelformerForMultiLabelClassification])
def test_predict_labels_errors(text_task, head):
    texts, tokenizer, config = text_task
    model = head(LabelformerConfig.from_dict(config.to_dict()))
    with pytest.raises(ValueError, match="eval mode"):  # a freshly built head is in training mode
        model.predict_labels(texts, tokenizer=tokenizer)
    model.eval()
    with pytest.raises(ValueError, match=r"`texts\[1\]` is empty"):
        model.predict_labels(["fine", "  "], tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"`texts\[2\]` is a int"):
        model.predict_labels(["fine", "ok", 3], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.predict_labels(["fine"])
    with pytest.raises(ValueError, match="`num_beams` must be an integer >= 1"):
        model.predict_labels(["fine"], tokenizer=tokenizer, num_beams=0)
    big_tokenizer = train_tokenizer(
        ["x y z " * 40 + " ".join(f"w{i}" for i in range(200))], vocab_size=300, min_frequency=1
    )
    with pytest.raises(ValueError, match="does not belong to this model"):
        model.predict_labels(["fine"], tokenizer=big_tokenizer)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.predict_labels(["fine"], tokenizer=tokenizer)


def test_generation_head_rejects_a_config_without_label_vocabulary():
    with pytest.raises(ValueError, match="from_labels"):
        LabelformerForMultiLabelGeneration(LabelformerConfig(vocab_size=50))


def test_encode_carries_the_document_label_logits():
    model = LabelformerForMultiLabelGeneration(synthetic_config()).eval()
    ids, _ = synthetic_batch(2, 10, torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
    states = model.model.encoder(ids, mask).last_hidden_state
    assert isinstance(encoded, LabelEncoderOutput)
    torch.testing.assert_close(encoded.last_hidden_state, states)
    pooled = torch.stack([states[0].mean(0), states[1, :6].mean(0)])  # the mean over real tokens only
    attended = []  # label-wise attention: label k's softmax over real tokens of its query scores
    for row, real in ((0, 10), (1, 6)):
        weights = model.label_attention.query(states[row, :real]).softmax(0)  # [s, L]
        attended.append((weights * model.label_attention.value(states[row, :real])).sum(0))
    expected = model.document_classifier(pooled) + torch.stack(attended)
    torch.testing.assert_close(encoded.label_logits, expected)
    bias = model.row_bias(encoded)
    assert bias.shape == (2, model.config.decoder_vocab_size) and not bias[:, :SPECIAL].any()


@torch.no_grad()
def test_document_label_logits_shift_every_step_and_decide():
    """A document classifier's logit reaches every position of forward() and so every path that decodes it."""
    model = LabelformerForMultiLabelGeneration(synthetic_config()).eval()
    ids, _ = synthetic_batch(3, 12, torch.Generator().manual_seed(1))
    decoder_input_ids = torch.tensor([[model.config.decoder_start_token_id, 4, 5]] * 3)
    before = model(input_ids=ids, decoder_input_ids=decoder_input_ids).logits
    model.document_classifier.bias[7] += 50.0
    after = model(input_ids=ids, decoder_input_ids=decoder_input_ids).logits
    shift = torch.zeros(model.config.decoder_vocab_size)
    shift[7 + SPECIAL] = 50.0
    torch.testing.assert_close(after - before, shift.expand_as(after), atol=1e-4, rtol=0)
    for num_beams in (1, 2):  # the fast greedy path and the generic beam search both read it
        first = model.generate(input_ids=ids, do_sample=False, num_beams=num_beams)[:, 1]
        assert first.tolist() == [7 + SPECIAL] * 3


@torch.no_grad()
def test_label_attention_decides_and_ignores_padding():
    """A label's own attention reading reaches the decoded labels; padding and chunking never change it."""
    model = LabelformerForMultiLabelGeneration(synthetic_config()).eval()
    ids, _ = synthetic_batch(2, 12, torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.full((2, 5), model.config.pad_token_id)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(
        model.encode(padded, mask).label_logits, model.encode(ids, torch.ones_like(ids)).label_logits
    )
    whole = model.encode(padded, mask).label_logits
    empty = model.label_attention(torch.randn(2, 5, model.config.d_model), torch.zeros(2, 5, dtype=torch.long))
    assert not empty.any()  # a row of padding only reads nothing, as the masked mean does
    model.label_attention.chunk_size = 3  # label sets in the thousands are read in chunks: the same logits
    torch.testing.assert_close(model.encode(padded, mask).label_logits, whole)
    model.label_attention.value.bias[5] += 50.0
    assert model.generate(input_ids=ids, do_sample=False)[:, 1].tolist() == [5 + SPECIAL] * 2


def test_label_attention_learns_from_the_loss():
    """The training loss reaches both of label attention's weights (its query through the softmax)."""
    model = LabelformerForMultiLabelGeneration(synthetic_config()).train()
    ids, _ = synthetic_batch(2, 12, torch.Generator().manual_seed(3))
    labels = torch.tensor([[4, 5, 2], [6, 2, -100]])
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    for weight in (model.label_attention.query.weight, model.label_attention.value.weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0


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
