"""A lexical label scorer: a linear SVM over the tf-idf bag of a document's token ids.

A multi-label head with ``config.lexical_scorer`` holds one (`LexicalLabelScorer`); `fit_lexical_scorer`
fits it on the training split with a convex solver (one-vs-rest, L2-regularised squared hinge, the
loss of scikit-learn's ``LinearSVC``), separately from the network. When the head decides, it adds
``config.lexical_logit_weight`` times the scorer's margins to its label logits: the threshold head
before its threshold, the generation head at every decoding step. By default the network's training
loss never sees it; with ``config.lexical_training_weight`` > 0 (stacking, Wolpert 1992) training adds
that weight times *out-of-fold* margins (`out_of_fold_lexical_margins`: each document scored by a
scorer fit without it) to the label logits, so the network learns what the SVM misses. A
bag-of-words linear model errs on other documents than the Transformer does (it reads every word
with the same weight, the network learns soft, contextual evidence), so the sum is better than
either (wide & deep: Cheng et al., 2016, "Wide & Deep Learning for Recommender Systems").
Everything is trained on the training documents only: still from scratch.

    scorer_stats = fit_lexical_scorer(model, tokenizer, train_texts, train_label_sets)
    model.set_lexical_logit_weight(1.0)     # or fit it on validation (tune_decoding_bias, tune_decision_rule)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: The SVM's regularisation constant by default: larger fits the training set harder. Chosen on Reuters'
#: validation split with the threshold ensemble (micro-F1 0.9253 at C = 3 against 0.9225 at ``LinearSVC``'s 1).
LEXICAL_C = 3.0
#: The lexical logit weights `tune_decoding_bias` and `tune_decision_rule` try by default (0 is always tried).
#: On Reuters validation picks 6 to 12: the SVM's margins (about +-1) are small next to the network's logits.
#: A grid up to 24 was tried: the generator's fit then picked 24 on two runs and lost on the test set
#: (-0.0034 micro-F1, -0.016 macro-F1 on the default run), so the grid stops at 12.
LEXICAL_LOGIT_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
#: How many parts `out_of_fold_lexical_margins` splits the training texts into.
LEXICAL_STACKING_FOLDS = 5


class LexicalLabelScorer(nn.Module):
    """One linear margin per label over a document's tf-idf bag of input-token ids.

    ``input_ids`` ``[b, s]`` -> ``[b, num_labels]`` float: ``features(input_ids) @ weight.T + bias``.
    The features are scikit-learn's ``TfidfVectorizer(sublinear_tf=True)`` over token ids: per
    distinct token ``(1 + log count) * idf``, then each row scaled to unit L2 norm. Tokens with
    ``idf`` 0 (padding, the other special tokens, and tokens no training document holds) are
    ignored, so no attention mask is needed.
    All three tensors are persistent buffers (saved with the model, never trained by the optimiser).
    """

    def __init__(self, vocab_size: int, num_labels: int) -> None:
        super().__init__()
        self.register_buffer("idf", torch.zeros(vocab_size))
        self.register_buffer("weight", torch.zeros(num_labels, vocab_size))
        self.register_buffer("bias", torch.zeros(num_labels))

    @property
    def is_fitted(self) -> bool:
        """Whether `fit_lexical_scorer` (or a loaded checkpoint) has set the idf table."""
        return bool(self.idf.any())

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` token ids -> ``[b, vocab_size]`` float32 tf-idf rows of unit L2 norm (zero rows stay 0)."""
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be [batch, seq_len], got shape {tuple(input_ids.shape)}.")
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

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids -> ``[b, num_labels]`` float32 SVM margins (> 0: the SVM alone would pick the label)."""
        return self.features(input_ids) @ self.weight.float().T + self.bias.float()


def document_frequencies(id_rows: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` float: in how many of the ``id_rows`` (token-id lists) each id occurs."""
    df = torch.zeros(vocab_size)
    for ids in id_rows:
        df[torch.tensor(list(ids), dtype=torch.long).unique()] += 1
    return df


def smooth_idf(df: torch.Tensor, documents: int, ignored: Sequence[int]) -> torch.Tensor:
    """``[vocab_size]`` idf from document frequencies ``df`` ``[vocab_size]`` over ``documents`` texts:
    ``log((1 + n) / (1 + df)) + 1`` (scikit-learn's smooth idf); 0 at ``ignored`` ids and at tokens no
    document holds (which, as in scikit-learn, then count for nothing, not even in a document's norm)."""
    idf = torch.log((1 + documents) / (1 + df)) + 1
    idf[df == 0] = 0.0
    idf[list(ignored)] = 0.0
    return idf


def _with_intercept(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse ``[n, f]`` -> CSR ``[n, f + 1]`` (last column all ones) and its CSR transpose, in ``dtype``."""
    x = x.coalesce()
    n, f = x.shape
    rows = torch.arange(n)
    indices = torch.cat([x.indices(), torch.stack([rows, torch.full_like(rows, f)])], 1)
    values = torch.cat([x.values().to(dtype), torch.ones(n, dtype=dtype)])
    coo = torch.sparse_coo_tensor(indices, values, (n, f + 1), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": products and transposes are all we use
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()


class _Solution(NamedTuple):
    solution: torch.Tensor
    cg_steps: int


def _preconditioned_cg(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    preconditioner: torch.Tensor,
    target: torch.Tensor,
) -> _Solution:
    """Solve ``A_j s_j = rhs_j`` for every column ``j`` of ``rhs`` ``[f, k]`` by preconditioned CG.

    ``product(p, cols)`` returns ``A p`` for the columns ``p`` ``[f, m]`` of the systems ``cols`` ``[m]``.
    A column stops once its residual norm is at most ``target`` ``[k]``; the running columns are
    kept packed side by side, so finished ones cost nothing. Returns the ``[f, k]`` solutions and the
    number of column-steps taken.
    """
    solution = torch.zeros_like(rhs)
    cols = torch.arange(rhs.shape[1])
    step, residual = torch.zeros_like(rhs), rhs.clone()
    z = residual / preconditioner
    direction, rz = z, (residual * z).sum(0)
    steps = 0
    for _ in range(10 * rhs.shape[0]):  # CG is exact after f steps in exact arithmetic
        running = residual.norm(dim=0) > target[cols]
        if not running.all():  # pack the running columns
            solution[:, cols[~running]] = step[:, ~running]
            cols, step, residual, direction, rz = (
                cols[running], step[:, running], residual[:, running], direction[:, running], rz[running]
            )  # fmt: skip
            preconditioner = preconditioner[:, running]
            if not cols.numel():
                break
        steps += cols.numel()
        h_direction = product(direction, cols)
        alpha = rz / (direction * h_direction).sum(0).clamp(min=1e-300)
        step += alpha * direction
        residual -= alpha * h_direction
        z = residual / preconditioner
        rz_next = (residual * z).sum(0)
        direction = z + (rz_next / rz.clamp(min=1e-300)) * direction
        rz = rz_next
    solution[:, cols] = step
    return _Solution(solution, steps)


def squared_hinge_svm(
    x: torch.Tensor, y: torch.Tensor, c: float = LEXICAL_C, max_iter: int = 100, tolerance: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One-vs-rest L2-regularised squared-hinge SVMs, all labels at once, by Newton's method.

    Minimises, per label ``j``: ``0.5 * (|w_j|^2 + b_j^2) + c * sum_i max(0, 1 - t_ij (x_i . w_j + b_j))^2``
    with ``t`` = +1/-1 (``LinearSVC``'s primal, its intercept regularised like a feature of value 1).
    The objective is convex and once differentiable; its generalised Hessian is
    ``I + 2c X_A^T X_A`` over the documents ``A`` inside the margin (Keerthi & DeCoste, 2005; the
    truncated Newton method of liblinear, Lin et al., 2008). Each Newton step solves
    ``H d = -g`` with conjugate gradients preconditioned by ``diag(H)``, then halves the step until
    the objective decreases enough (Armijo). The labels are independent: each of the ``L`` columns
    runs its own CG and line search, and a column leaves the matrix products once its CG is done.
    Gradients, objectives and margins are float64 (float32 objectives stop changing before the
    gradient vanishes); the Hessian products inside CG, which only shape the direction, are float32.

    Args:
        x: sparse ``[n, f]`` features.
        y: ``[n, L]`` 0/1 targets.
        max_iter: the most Newton steps.
        tolerance: a label is solved when the L2 norm of its gradient is at most this. The objective
            is 1-strongly convex, so its weights (intercept included) are then within ``tolerance``
            of the optimum, and its margins on a unit-norm document within ``sqrt(2) * tolerance``.

    Returns:
        ``weight`` ``[L, f]``, ``bias`` ``[L]`` (float32) and ``{"newton_steps", "cg_steps", "objective",
        "gradient_norm"}`` (CG steps summed over labels; the summed objective at the end and the
        largest of the labels' gradient norms).
    """
    if c <= 0 or not math.isfinite(c):
        raise ValueError(f"The lexical scorer's C must be a positive number, got {c!r}.")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"`x` has {x.shape[0]} rows but `y` has {y.shape[0]}.")
    xa, xt = _with_intercept(x, torch.float64)  # [n, f + 1], [f + 1, n]
    xa32, xt32 = xa.to(torch.float32), xt.to(torch.float32)
    xt_squared = torch.sparse_csr_tensor(
        xt.crow_indices(), xt.col_indices(), xt.values().square(), xt.shape, check_invariants=False
    )
    signs = y.double() * 2 - 1  # [n, L]
    w = torch.zeros(xa.shape[1], y.shape[1], dtype=torch.float64)  # [f + 1, L]; last row: intercepts
    margins = torch.zeros_like(signs)  # x . w, kept up to date: line searches need no products

    def objective(w: torch.Tensor, margins: torch.Tensor, labels: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Per-label objective ``[k]`` of the columns ``labels``, from their weights and margins."""
        return 0.5 * w.square().sum(0) + c * (1 - signs[:, labels] * margins).clamp(min=0).square().sum(0)

    def gradient(w: torch.Tensor, margins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slack = (1 - signs * margins).clamp(min=0)  # [n, L]
        return xt @ (-2 * c * slack * signs) + w, slack  # [f + 1, L]

    newton_steps = cg_steps = 0
    for _ in range(max_iter):
        grad, slack = gradient(w, margins)
        grad_norm = grad.norm(dim=0)  # [L]
        todo = torch.nonzero(grad_norm > tolerance).flatten()  # labels not yet solved
        if not todo.numel():
            break
        newton_steps += 1
        active = (slack[:, todo] > 0).float()  # the generalised Hessian's documents, per label
        preconditioner = 1 + 2 * c * (xt_squared @ active.double())  # diag(H), [f + 1, k]

        def hessian_product(p: torch.Tensor, cols: torch.Tensor, active: torch.Tensor = active) -> torch.Tensor:
            """``H p`` for the columns ``p`` ``[f + 1, m]`` of the labels ``todo[cols]``."""
            return p + 2 * c * (xt32 @ (active[:, cols] * (xa32 @ p.float()))).double()

        # CG stops at a residual of a tenth of the gradient (a constant forcing term)
        step, taken = _preconditioned_cg(hessian_product, -grad[:, todo], preconditioner, 0.1 * grad_norm[todo])
        cg_steps += taken
        x_step = xa @ step  # [n, k]
        w_todo, m_todo = w[:, todo], margins[:, todo]
        before, slope = objective(w_todo, m_todo, todo), (grad[:, todo] * step).sum(0)
        length = torch.ones_like(slope)
        for _ in range(40):  # Armijo backtracking, per label
            trial = objective(w_todo + length * step, m_todo + length * x_step, todo)
            enough = trial <= before + 0.01 * length * slope
            if enough.all():
                break
            length = torch.where(enough, length, length / 2)
        length = torch.where(enough, length, 0.0)
        logger.debug(
            "Newton step %d: %d labels, largest gradient norm %.3g, %d CG steps, step lengths %.3g..%.3g",
            newton_steps, todo.numel(), float(grad_norm.max()), cg_steps, float(length.min()), float(length.max()),
        )  # fmt: skip
        w[:, todo] = w_todo + length * step
        margins[:, todo] = m_todo + length * x_step
    else:  # the loop's last gradient predates its last step
        logger.warning("squared_hinge_svm: no convergence in %d Newton steps; the margins are approximate.", max_iter)
        grad, _ = gradient(w, margins)
    stats = {
        "newton_steps": newton_steps,
        "cg_steps": cg_steps,
        "objective": float(objective(w, margins).sum()),
        "gradient_norm": float(grad.norm(dim=0).max()),
    }
    weights = w.float()
    return weights[:-1].T.contiguous(), weights[-1].clone(), stats


@torch.no_grad()
def fit_lexical_scorer(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    label_sets: Sequence[Sequence[str]],
    c: float = LEXICAL_C,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Fit ``model``'s `LexicalLabelScorer` (``config.lexical_scorer``) on training texts and their label sets.

    The texts are tokenized as the model reads them (``max_length``: the same truncation as in
    training), the idf table is taken from them, and one squared-hinge SVM per label is solved
    (`squared_hinge_svm`). Labels outside ``model.config.label2id`` raise; labels without
    training documents get a weight of 0 and a negative intercept.

    Returns:
        ``{"documents", "features", "newton_steps", "cg_steps", "objective", "gradient_norm", "train_micro_f1"}``.
    """
    scorer, targets, encoded = _training_inputs(model, tokenizer, texts, label_sets, max_length)
    features, stats = _fit_on_ids(scorer, encoded, targets, c, tokenizer)
    margins = torch.sparse.mm(features, scorer.weight.float().T.cpu()) + scorer.bias.float().cpu()
    chosen, gold = margins > 0, targets.bool()
    denominator = chosen.sum().item() + gold.sum().item()
    stats.update(
        documents=len(texts),
        features=int((scorer.idf > 0).sum()),
        train_micro_f1=2 * (chosen & gold).sum().item() / denominator if denominator else 1.0,
    )
    logger.info(
        "lexical scorer: %d documents, %d features, %d Newton steps (%d CG steps), training micro-F1 %.4f",
        stats["documents"], stats["features"], stats["newton_steps"], stats["cg_steps"], stats["train_micro_f1"],
    )  # fmt: skip
    return stats


@torch.no_grad()
def out_of_fold_lexical_margins(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    label_sets: Sequence[Sequence[str]],
    c: float = LEXICAL_C,
    max_length: int | None = None,
    folds: int = LEXICAL_STACKING_FOLDS,
    seed: int = 0,
) -> torch.Tensor:
    """``[n, num_labels]`` float32 margins of each training text from a scorer that never saw it (stacking).

    The texts are split at random (``seed``) into ``folds`` parts; for each part a fresh scorer
    (idf table and SVMs, as `fit_lexical_scorer` fits them) is fit on the other parts and scores
    it. Margins of a scorer fit on the document itself would be over-confident (the SVM fits its
    training set almost perfectly), and a network trained beside them would learn to trust them
    too much. ``model`` only gives the label vocabulary and sizes; its own scorer is not changed.
    Pass the result to `MultiLabelCollator` (``lexical_margins``) with ``config.lexical_training_weight`` > 0.
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"`folds` must be an integer >= 2, got {folds!r}.")
    scorer, targets, encoded = _training_inputs(model, tokenizer, texts, label_sets, max_length)
    if len(texts) < folds:
        raise ValueError(f"Out-of-fold margins need at least as many texts as folds ({folds}), got {len(texts)}.")
    pad = _pad_id(tokenizer)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    margins = torch.zeros(len(texts), targets.shape[1])
    for fold in range(folds):
        held = order[fold::folds]
        kept = torch.ones(len(texts), dtype=torch.bool)
        kept[held] = False
        part = LexicalLabelScorer(scorer.idf.shape[0], targets.shape[1]).to(scorer.idf.device)
        rows = kept.nonzero().squeeze(1).tolist()
        _fit_on_ids(part, [encoded[i] for i in rows], targets[kept], c, tokenizer)
        for start in range(0, len(held), 256):
            chunk = held[start : start + 256].tolist()
            ids = _padded([encoded[i] for i in chunk], pad).to(part.idf.device)
            margins[chunk] = part(ids).cpu()
    logger.info("lexical scorer: out-of-fold margins of %d documents (%d folds)", len(texts), folds)
    return margins


def _training_inputs(
    model: Any, tokenizer: Any, texts: Sequence[str], label_sets: Sequence[Sequence[str]], max_length: int | None
) -> tuple[LexicalLabelScorer, torch.Tensor, list[list[int]]]:
    """``model``'s scorer, the ``[n, num_labels]`` targets and the texts' token ids as the model reads them
    (``max_length``: the training truncation); a model without a scorer and bad label sets raise."""
    scorer = getattr(model, "lexical_label_scorer", None)
    if scorer is None:
        raise ValueError("This model has no lexical scorer: build its config with lexical_scorer=True.")
    targets = _label_matrix(model.config, texts, label_sets)
    encoded = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length)["input_ids"]
    return scorer, targets, encoded


def _label_matrix(config: Any, texts: Sequence[str], label_sets: Sequence[Sequence[str]]) -> torch.Tensor:
    """``[n, num_labels]`` 0/1 float targets of ``label_sets``; unknown labels and empty input raise."""
    if len(texts) != len(label_sets):
        raise ValueError(f"Got {len(texts)} texts but {len(label_sets)} label sets.")
    if not texts:
        raise ValueError("The lexical scorer needs at least one training text.")
    label2id = config.label2id
    targets = torch.zeros(len(texts), config.num_labels)
    for row, labels in enumerate(label_sets):
        unknown = [label for label in labels if label not in label2id]
        if unknown:
            raise ValueError(f"Label set {row} holds labels the model does not know: {unknown[:5]}.")
        for label in labels:
            targets[row, label2id[label]] = 1
    return targets


def _pad_id(tokenizer: Any) -> int:
    """An id of idf 0 to pad with: the padding token, else another special token."""
    pad = next((i for i in (tokenizer.pad_token_id, *tokenizer.all_special_ids) if i is not None), None)
    if pad is None:
        raise ValueError("The lexical scorer needs a tokenizer with a padding (or other special) token.")
    return pad


def _padded(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Token-id lists -> ``[len(rows), longest]`` long, padded with ``pad``."""
    ids = torch.full((len(rows), max(1, max(map(len, rows)))), pad, dtype=torch.long)
    for row, seq in enumerate(rows):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids


def _fit_on_ids(
    scorer: LexicalLabelScorer, encoded: Sequence[Sequence[int]], targets: torch.Tensor, c: float, tokenizer: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Set ``scorer``'s idf from the id lists ``encoded`` and solve its SVMs for ``targets`` ``[n, L]``.
    Returns the sparse training matrix ``[n, vocab_size]`` and the solver's stats."""
    pad = _pad_id(tokenizer)
    df = document_frequencies(encoded, scorer.idf.shape[0])
    scorer.idf.copy_(smooth_idf(df, len(encoded), tokenizer.all_special_ids).to(scorer.idf))
    # The training matrix comes from `features`, the formula the scorer applies when deciding.
    blocks = [
        scorer.features(_padded(encoded[start : start + 256], pad).to(scorer.idf.device)).cpu().to_sparse()
        for start in range(0, len(encoded), 256)
    ]
    features = torch.cat(blocks).coalesce()  # [n, vocab_size]
    weight, bias, stats = squared_hinge_svm(features, targets, c)
    scorer.weight.copy_(weight.to(scorer.weight))
    scorer.bias.copy_(bias.to(scorer.bias))
    return features, stats


__all__ = [
    "LEXICAL_C",
    "LEXICAL_LOGIT_WEIGHTS",
    "LEXICAL_STACKING_FOLDS",
    "LexicalLabelScorer",
    "document_frequencies",
    "fit_lexical_scorer",
    "out_of_fold_lexical_margins",
    "smooth_idf",
    "squared_hinge_svm",
]
