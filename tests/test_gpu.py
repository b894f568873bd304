"""CUDA checks: attention backends, bf16, cached decoding, the label fast paths and the padding-free encoder.

Skipped where no CUDA device is present (CI); run on a GPU machine with
``python -m pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from modeling import (
    LabelformerEnsembleForMultiLabelGeneration,
    LabelformerForConditionalGeneration,
    LabelformerForMultiLabelGeneration,
)
from modeling.parallel_labelformer import LabelformerForParallelLabelGeneration

from .conftest import tiny_config
from .synthetic import LABELS, synthetic_batch, synthetic_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def padded_batch(batch: int = 4, length: int = 24, vocab: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length // 2 :] = 0  # one padded row
    return ids.to(CUDA), mask.to(CUDA)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_sdpa_matches_eager_on_cuda(dtype, atol):
    torch.manual_seed(0)
    model = LabelformerForConditionalGeneration(tiny_config()).to(CUDA, dtype).eval()
    ids, mask = padded_batch()
    decoder_ids = ids[:, :7]
    outputs = {}
    for backend in ("eager", "sdpa"):
        model.config._attn_implementation = backend
        with torch.no_grad():
            outputs[backend] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.float()
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], atol=atol, rtol=atol)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_2_matches_sdpa_in_bf16():
    torch.manual_seed(0)
    model = LabelformerForConditionalGeneration(tiny_config()).to(CUDA, torch.bfloat16).eval()
    ids, mask = padded_batch()
    outputs = {}
    for backend in ("sdpa", "flash_attention_2"):
        model.config._attn_implementation = backend
        with torch.no_grad():
            outputs[backend] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7]).logits.float()
    torch.testing.assert_close(outputs["flash_attention_2"], outputs["sdpa"], atol=5e-2, rtol=5e-2)


def test_cached_generation_on_cuda_matches_the_cpu():
    torch.manual_seed(0)
    model = LabelformerForConditionalGeneration(tiny_config()).eval()
    ids, mask = padded_batch()
    kwargs = dict(max_new_tokens=8, num_beams=1, do_sample=False)
    on_cpu = model.generate(input_ids=ids.cpu(), attention_mask=mask.cpu(), **kwargs)
    model.to(CUDA)
    on_gpu = model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # the fast greedy path
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    model.fast_greedy_generate = False
    generic = model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # the generic cached loop
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.equal(uncached, on_gpu)
    assert torch.equal(generic, on_gpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_fast_paths_match_generate_on_cuda(dtype):
    torch.manual_seed(0)
    config = synthetic_config(max_labels=4)
    model = LabelformerForMultiLabelGeneration(config).to(CUDA, dtype).eval()
    ids, _ = synthetic_batch(8, 16, torch.Generator().manual_seed(0))
    ids = ids.to(CUDA)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        tokens, _ = model.greedy_labels(ids, mask)
        # the generic loop under the label rules (asking for scores leaves the fast path)
        reference = model.generate(input_ids=ids, attention_mask=mask, num_beams=1, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True).sequences[:, 1:]  # fmt: skip
        assert model.decode_labels(reference) == model.decode_labels(model.generate(input_ids=ids, attention_mask=mask))
    width = min(tokens.shape[1], reference.shape[1])
    fast = torch.where(tokens[:, :width] == config.pad_token_id, config.eos_token_id, tokens[:, :width])
    slow = torch.where(reference[:, :width] == config.pad_token_id, config.eos_token_id, reference[:, :width])
    assert torch.equal(fast, slow)
    parallel = LabelformerForParallelLabelGeneration(synthetic_config(max_labels=4)).to(CUDA, dtype).eval()
    with torch.no_grad():
        for row in parallel.predict_batch(ids, mask):
            assert len(row) == len(set(row)) <= 4


def test_bf16_autocast_training_learns_on_cuda():
    torch.manual_seed(0)
    model = LabelformerForMultiLabelGeneration(synthetic_config()).to(CUDA).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        ids, label_sets = synthetic_batch(32, 16, generator)
        targets = torch.full((32, len(LABELS) + 1), -100)
        for i, names in enumerate(label_sets):
            row = [LABELS.index(n) + 3 for n in names] + [2]
            targets[i, : len(row)] = torch.tensor(row)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids.to(CUDA), labels=targets.to(CUDA)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10  # fp32 on CPU: 2.18 -> 1.60


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_cuda_graph_decoding_matches_eager_decoding(dtype, backend):
    torch.manual_seed(0)
    config = synthetic_config(max_labels=5, init_std=0.3, lexical_scorer=True)
    model = LabelformerForMultiLabelGeneration(config).to(CUDA, dtype).eval()
    model.config._attn_implementation = backend
    generator = torch.Generator().manual_seed(0)
    for call in range(3):  # the first call captures; later calls replay with new inputs
        ids, _ = synthetic_batch(8, 16, generator)
        ids = ids.to(CUDA)
        mask = torch.ones_like(ids)
        mask[call, 10:] = 0
        model.use_cuda_graphs = True
        with torch.no_grad():
            graphed = model.greedy_labels(ids, mask)
            model.use_cuda_graphs = False
            plain = model.greedy_labels(ids, mask)
        assert_same_decoding(graphed, plain)
    # weights changed in place (as an optimizer does) are seen by the captured graphs
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
        model.use_cuda_graphs = True
        graphed = model.greedy_labels(ids, mask)
        model.use_cuda_graphs = False
        plain = model.greedy_labels(ids, mask)
    assert_same_decoding(graphed, plain)
    # so is the lexical part's row bias set after the capture (a static tensor the graph reads):
    # a large margin for the first label makes it every row's first choice
    scorer = model.lexical_scorer
    with torch.no_grad():
        scorer.idf.fill_(1.0)
        scorer.bias[0] = 10.0
        scorer.scale.fill_(50.0)
        model.use_cuda_graphs = True
        graphed = model.greedy_labels(ids, mask)
        model.use_cuda_graphs = False
        plain = model.greedy_labels(ids, mask)
    assert_same_decoding(graphed, plain)
    assert (graphed[0][:, 0] == config.label2id[LABELS[0]] + 3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ensemble_decoding_on_cuda_matches_its_generic_loop_and_graphs(dtype):
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(LabelformerForMultiLabelGeneration(synthetic_config(max_labels=5, init_std=0.1)).eval())
    ensemble = LabelformerEnsembleForMultiLabelGeneration.from_members(members).to(CUDA, dtype)
    ids, _ = synthetic_batch(8, 16, torch.Generator().manual_seed(0))
    ids = ids.to(CUDA)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    with torch.no_grad():
        for _ in range(2):  # capture, then replay
            ensemble.use_cuda_graphs = True
            graphed = ensemble.greedy_labels(ids, mask)
            ensemble.use_cuda_graphs = False
            plain = ensemble.greedy_labels(ids, mask)
            assert_same_decoding(graphed, plain)
        if dtype != torch.float32:  # bf16 rounding may break near-ties between the loops; graphs are checked
            return
        ensemble.fast_greedy_generate = False
        for beams in (1, 3):
            generic = ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=beams)
            uncached = ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=beams, use_cache=False)
            assert ensemble.decode_labels(generic) == ensemble.decode_labels(uncached)
        assert ensemble.decode_labels(plain[0]) == ensemble.decode_labels(
            ensemble.generate(input_ids=ids, attention_mask=mask, num_beams=1)
        )


def assert_same_decoding(graphed, plain) -> None:
    """The graph runs every step; eager decoding stops when all rows are done (then only padding follows)."""
    width = plain[0].shape[1]
    assert torch.equal(graphed[0][:, :width], plain[0])
    torch.testing.assert_close(graphed[1][:, :width], plain[1])
    assert (graphed[0][:, width:] == 0).all() and (graphed[1][:, width:] == 0).all()


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_padding_free_encoder_matches_unpadded_rows_on_cuda(dtype, atol):
    """The padding-free encoder on CUDA (index ops, bf16) gives each row of a padded batch what the row
    alone, without padding, gets from the dense path; and it stands aside while a CUDA graph is
    captured (its token count is data dependent)."""
    from modeling.modeling_labelformer import token_packing

    torch.manual_seed(0)
    model = LabelformerForConditionalGeneration(tiny_config()).to(CUDA, dtype).eval()
    model.config._attn_implementation = "sdpa"
    ids, mask = padded_batch()
    mask[2, -3:] = 0  # two padded rows of different lengths
    assert token_packing(mask) is not None
    encoder = model.get_encoder()
    with torch.no_grad():
        packed = encoder(ids, mask).last_hidden_state.float()
        for row in range(ids.shape[0]):
            length = int(mask[row].sum())
            alone = ids[row : row + 1, :length]
            assert token_packing(torch.ones_like(alone)) is None  # no padding: the dense path
            dense = encoder(alone, torch.ones_like(alone)).last_hidden_state.float()[0]
            torch.testing.assert_close(packed[row, :length], dense, atol=atol, rtol=atol)
    assert packed[~mask.bool()].abs().max() == 0
    seen = []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen.append(token_packing(mask))
    assert seen == [None]
