"""Optional hybrid part: a lexical label scorer, a linear model over the tf-idf bag of a document's token ids.

Not part of the Transformer. A multi-label head whose config has ``lexical_scorer=True`` holds one
`LexicalLabelScorer`, and its ``forward()`` adds the scorer's scaled margins to the label logits,
in training and in every decision (``generate()``, pipelines, Trainer evaluation, `predict_labels`).
The scorer's numbers are buffers of the model (saved in its safetensors). `fit_lexical_scorer` fits
them with scikit-learn's ``LinearSVC`` (the ``labelformer[hybrid]`` extra) on the training texts after
the network is trained; the scale is then chosen on validation data (the training script's
``--lexical_scorer``). A bag-of-words linear model errs on other documents than the network (wide &
deep: Cheng et al., 2016), which is what the hybrid buys; the README's results table shows both.

This file needs only torch to *run* a fitted scorer, so saved folders carry it; fitting imports
scikit-learn lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: ``LinearSVC``'s regularisation constant by default (larger fits the training set harder); chosen on
#: Reuters validation (micro-F1 0.9253 at C = 3 against 0.9225 at C = 1).
LEXICAL_C = 3.0
#: The scales the training script tries on validation data (0, the Transformer alone, is always tried).
LEXICAL_SCALES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)


class LexicalLabelScorer(nn.Module):
    """Scaled linear margins over a document's tf-idf bag of input-token ids.

    ``input_ids`` ``[b, s]`` -> ``[b, num_labels]`` float: ``scale * (features(input_ids) @ weight.T + bias)``.
    The features are scikit-learn's ``TfidfVectorizer(sublinear_tf=True)`` over token ids: per
    distinct token ``(1 + log count) * idf``, each row scaled to unit L2 norm. Tokens with ``idf`` 0
    (padding, the other special tokens, tokens no training document holds) are ignored, so no
    attention mask is needed. All four tensors are persistent buffers (saved with the model, never
    trained by the optimiser); an unfitted scorer (``scale`` 0) adds nothing.
    """

    def __init__(self, vocab_size: int, num_labels: int) -> None:
        super().__init__()
        self.register_buffer("idf", torch.zeros(vocab_size))
        self.register_buffer("weight", torch.zeros(num_labels, vocab_size))
        self.register_buffer("bias", torch.zeros(num_labels))
        self.register_buffer("scale", torch.zeros(()))

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` token ids -> ``[b, vocab_size]`` float32 tf-idf rows of unit L2 norm (zero rows stay 0)."""
        vocab = self.idf.shape[0]
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(
                f"`input_ids` hold ids outside the lexical scorer's vocabulary (0..{vocab - 1}): the ids come "
                "from another tokenizer than the one the model was trained with."
            )
        counts = torch.zeros(input_ids.shape[0], vocab, device=input_ids.device)
        counts.scatter_add_(1, input_ids, torch.ones(input_ids.shape, device=input_ids.device))
        tf = torch.where(counts > 0, 1 + torch.log(counts.clamp(min=1)), counts)
        x = tf * self.idf.float()
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def margins(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids -> ``[b, num_labels]`` unscaled margins (> 0: the linear model alone picks the label)."""
        return self.features(input_ids) @ self.weight.float().T + self.bias.float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids -> ``[b, num_labels]`` float32: the label logits this part adds (fp32 even under
        autocast: a linear model's margins, not worth rounding)."""
        with torch.autocast(input_ids.device.type, enabled=False):
            return self.scale.float() * self.margins(input_ids)


@torch.no_grad()
def fit_lexical_scorer(
    scorer: LexicalLabelScorer,
    input_ids: Sequence[Sequence[int]],
    targets: torch.Tensor,
    special_ids: Sequence[int],
    c: float = LEXICAL_C,
) -> float:
    """Fit ``scorer``'s idf table and one ``LinearSVC`` per label on tokenized training documents.

    Args:
        input_ids: the training documents' token ids, as the model reads them (same truncation).
        targets: ``[n, num_labels]`` 0/1 label matrix.
        special_ids: token ids that carry no content (idf 0).
        c: ``LinearSVC``'s ``C``.

    Returns:
        The training micro-F1 of the linear model alone. Labels without positive (or without negative)
        training documents get weight 0 and a bias of -1 (or +1). ``scale`` is left as it was.
    """
    try:
        from scipy import sparse
        from sklearn.svm import LinearSVC
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Fitting the lexical scorer needs scikit-learn: pip install 'labelformer[hybrid]'."
        ) from error
    if len(input_ids) != targets.shape[0] or not len(input_ids):
        raise ValueError(f"Got {len(input_ids)} documents but {targets.shape[0]} label rows; both must be > 0.")
    vocab = scorer.idf.shape[0]
    df = torch.zeros(vocab)
    for ids in input_ids:
        df[torch.tensor(list(ids), dtype=torch.long).unique()] += 1
    idf = torch.log((1 + len(input_ids)) / (1 + df)) + 1  # scikit-learn's smooth idf
    idf[df == 0] = 0.0
    idf[list(special_ids)] = 0.0
    scorer.idf.copy_(idf.to(scorer.idf))
    pad = int(next(iter(special_ids), 0))
    blocks = []
    for start in range(0, len(input_ids), 256):  # the features `forward` computes, as a sparse matrix
        rows = input_ids[start : start + 256]
        ids = torch.full((len(rows), max(1, max(map(len, rows)))), pad, dtype=torch.long)
        for row, seq in enumerate(rows):
            ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        blocks.append(sparse.csr_matrix(scorer.features(ids.to(scorer.idf.device)).cpu().numpy()))
    x = sparse.vstack(blocks).tocsr()
    weight, bias = torch.zeros(targets.shape[1], vocab), torch.zeros(targets.shape[1])
    y = targets.bool().numpy()
    for label in range(y.shape[1]):
        positives = int(y[:, label].sum())
        if positives in (0, y.shape[0]):
            bias[label] = 1.0 if positives else -1.0
            continue
        svm = LinearSVC(C=c, max_iter=5000).fit(x, y[:, label])
        weight[label] = torch.from_numpy(svm.coef_[0]).float()
        bias[label] = float(svm.intercept_[0])
    scorer.weight.copy_(weight.to(scorer.weight))
    scorer.bias.copy_(bias.to(scorer.bias))
    chosen = torch.from_numpy(x @ weight.numpy().T).float() + bias > 0
    gold = targets.bool()
    denominator = int(chosen.sum() + gold.sum())
    f1 = 2 * int((chosen & gold).sum()) / denominator if denominator else 1.0
    logger.info(
        "lexical scorer: %d documents, %d features, training micro-F1 %.4f", len(input_ids), int((idf > 0).sum()), f1
    )
    return f1


__all__ = ["LEXICAL_C", "LEXICAL_SCALES", "LexicalLabelScorer", "fit_lexical_scorer"]
