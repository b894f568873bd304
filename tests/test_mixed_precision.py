"""Reduced precision on the CPU: bf16 autocast training (`--mixed_precision`: the same loss and gradients
as fp32 within bf16's precision, fp32 master weights, the script's choice), bf16 inference
(`predict_labels(..., dtype=...)`) and the int8 copy (`quantize_int8`)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from modeling import LabelformerConfig, LabelformerForMultiLabelGeneration
from modeling.modeling_labelformer import LabelformerDecoder, LabelformerEncoder

from .conftest import TINY

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_multilabel.py"
BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _train_script():
    spec = importlib.util.spec_from_file_location("train_multilabel_mp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loss_and_grads(model, batch, bf16: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 kernels")
def test_bf16_autocast_step_matches_fp32():
    torch.manual_seed(0)
    labels = [f"label{i}" for i in range(12)]
    config = LabelformerConfig.from_labels(labels, **{**TINY, "vocab_size": 64}, max_labels=4)
    model = LabelformerForMultiLabelGeneration(config).train()
    ids = torch.randint(4, 64, (6, 20))
    mask = torch.ones_like(ids)
    mask[:3, 12:] = 0  # padded rows go through the packed attention path
    targets = torch.tensor([[3, 5, 2, -100]] * 3 + [[4, 2, -100, -100]] * 3)  # labels, EOS (2), padding
    batch = {"input_ids": ids, "attention_mask": mask, "labels": targets}
    loss32, grads32 = _loss_and_grads(model, batch, bf16=False)
    loss16, grads16 = _loss_and_grads(model, batch, bf16=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights
    assert torch.isfinite(grads16).all()
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grads16, grads32, dim=0) > 0.99


def test_mixed_precision_choice():
    module = _train_script()
    assert module.resolve_mixed_precision("no") == "no"
    assert module.resolve_mixed_precision("bf16") == "bf16"
    expected = "bf16" if BF16 else "no"
    if not torch.cuda.is_available():
        assert module.resolve_mixed_precision("auto") == expected
    args = module.parse_args(["--output_dir", "x", "--mixed_precision", "no"])
    assert args.mixed_precision == "no"
    with pytest.raises(SystemExit):
        module.parse_args(["--output_dir", "x", "--mixed_precision", "fp16"])


@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 kernels")
def test_predict_labels_in_bf16_computes_in_bf16_and_leaves_the_model_fp32():
    from .textdata import make_texts, trained_text_model

    model, tokenizer = trained_text_model(steps=80)
    texts = [row["text"] for row in make_texts(24, 1)]
    seen = []
    layer = model.model.encoder.layers[0].feed_forward.fc1
    hook = layer.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    try:
        full = model.predict_labels(texts, tokenizer, return_scores=True, batch_size=8)
        assert set(seen) == {torch.float32}
        seen.clear()
        half = model.predict_labels(texts, tokenizer, return_scores=True, batch_size=8, dtype=torch.bfloat16)
        assert set(seen) == {torch.bfloat16} and len(seen) == 3  # every batch computed in bf16
    finally:
        hook.remove()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model is not changed
    assert not torch.is_autocast_enabled("cpu")  # nor is the caller's autocast state
    # a trained model's answers barely move: the same labels, probabilities within bf16's rounding
    assert [list(row) for row in half] == [list(row) for row in full]
    for a, b in zip(full, half):
        assert all(abs(a[label] - b[label]) < 0.05 for label in a)
    with pytest.raises(ValueError, match="`dtype` must be None or torch.bfloat16"):
        model.predict_labels(texts[:1], tokenizer, dtype=torch.float16)


def test_predict_labels_without_dtype_keeps_the_callers_autocast():
    from .textdata import make_texts, trained_text_model

    model, tokenizer = trained_text_model(steps=2)
    seen = []
    layer = model.model.encoder.layers[0].feed_forward.fc1
    hook = layer.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.predict_labels([row["text"] for row in make_texts(4, 2)], tokenizer)
    finally:
        hook.remove()
    assert set(seen) == {torch.bfloat16}  # the caller's region applies; predict_labels does not turn it off


def test_quantize_int8_copy_answers_like_the_model_and_leaves_it_unchanged(tmp_path):
    from .textdata import make_texts, trained_text_model

    model, tokenizer = trained_text_model(steps=80)
    texts = [row["text"] for row in make_texts(24, 1)]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    int8 = model.quantize_int8()
    assert isinstance(int8.model.encoder.layers[0].feed_forward.fc1, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(int8.model.decoder.layers[0].self_attn.q_proj, torch.ao.nn.quantized.dynamic.Linear)
    assert type(model.model.encoder.layers[0].feed_forward.fc1) is torch.nn.Linear  # the model is not changed
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in before.items())
    full = model.predict_labels(texts, tokenizer, return_scores=True, batch_size=8)
    quantized = int8.predict_labels(texts, tokenizer, return_scores=True, batch_size=8)
    # a trained model's answers barely move: the same labels, probabilities within int8's rounding
    assert [list(row) for row in quantized] == [list(row) for row in full]
    for a, b in zip(full, quantized):
        assert all(abs(a[label] - b[label]) < 0.05 for label in a)
    # the copy's generate() takes the decisions its predict_labels reports
    batch = tokenizer(texts[:6], return_tensors="pt", padding=True)
    assert int8.decode_labels(int8.generate(**batch)) == [list(row) for row in quantized[:6]]
    with pytest.raises(ValueError, match="int8 copy made by quantize_int8"):
        int8.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
    with pytest.raises(ValueError, match="int8 copy made by quantize_int8"):  # before any Hub request
        int8.push_to_hub("someone/int8")
    with pytest.raises(ValueError, match="computes in int8 and fp32 only"):  # no bf16 on top of int8
        int8.predict_labels(texts[:2], tokenizer, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"quantizes fp32 weights.*\.float\(\)\.quantize_int8\(\)"):
        copy.deepcopy(model).to(torch.bfloat16).quantize_int8()


@pytest.mark.parametrize("head", ["LabelformerForMultiLabelClassification", "LabelformerForParallelLabelGeneration"])
def test_quantize_int8_covers_the_other_heads(head):
    import modeling

    torch.manual_seed(0)
    config = LabelformerConfig.from_labels([f"label{i}" for i in range(12)], **{**TINY, "vocab_size": 64})
    model = getattr(modeling, head)(config).eval()
    int8 = model.quantize_int8()
    stacks = [m for m in int8.modules() if isinstance(m, (LabelformerEncoder, LabelformerDecoder))]
    assert len(stacks) == (1 if head == "LabelformerForMultiLabelClassification" else 2)
    for stack in stacks:  # every linear layer of the encoder and decoder stacks is int8
        assert not any(type(m) is torch.nn.Linear for m in stack.modules())
        assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in stack.modules())
    ids = torch.randint(4, 64, (3, 10))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.flatten(), int8(input_ids=ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 kernels")
@pytest.mark.parametrize(
    ("head", "num_beams"),
    [("LabelformerForMultiLabelGeneration", 3), ("LabelformerForMultiLabelClassification", 1),
     ("LabelformerForParallelLabelGeneration", 1)],
)  # fmt: skip
def test_bf16_and_int8_inference_cover_beam_search_and_the_other_heads(head, num_beams):
    """Every head's predict_labels runs in bf16 (beam search too) and from an int8 copy: label sets from the
    label vocabulary with probabilities, the model left fp32; the bf16 pass computes in bf16."""
    import modeling

    from .textdata import KEYWORDS, make_texts, trained_text_model

    _, tokenizer = trained_text_model(steps=2)  # its tokenizer
    torch.manual_seed(0)
    config = LabelformerConfig.from_labels(sorted(KEYWORDS), **{**TINY, "vocab_size": len(tokenizer)})
    model = getattr(modeling, head)(config).eval()
    texts = [row["text"] for row in make_texts(6, 3)]
    seen = []
    encoder = getattr(model.base_model, "encoder", model.base_model)  # the heads keep their encoder differently
    hook = encoder.layers[0].feed_forward.fc1.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    try:
        half = model.predict_labels(texts, tokenizer, num_beams=num_beams, return_scores=True, dtype=torch.bfloat16)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    quantized = model.quantize_int8().predict_labels(texts, tokenizer, num_beams=num_beams, return_scores=True)
    for rows in (half, quantized):
        assert len(rows) == len(texts)
        for row in rows:
            assert set(row) <= set(config.label2id) and all(0.0 <= p <= 1.0 for p in row.values())
