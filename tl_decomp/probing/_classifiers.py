"""The probes of `tl_decomp.probing`, on plain tensors: splits, scikit-learn probes, F1.

Every function takes one tensor per split, ``[subset occurrence d]``. Each subset gets its
own probe, fitted by scikit-learn (logistic regression, a one-hidden-layer MLP, k-NN), with
its regularisation chosen on the validation split; subsets run in parallel with joblib.
The MLP has no dropout (`MLPClassifier` has none): its L2 penalty, picked on validation, is
its only regulariser. A torch MLP with dropout would be a second training loop to maintain
for a regulariser the subsets' ranking does not hinge on; docs/method.md §4 states the gap.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_decomp.decomposition import KINDS

SUBSETS = tuple("+".join(c) for r in range(1, 5) for c in itertools.combinations(KINDS, r))


def check_kinds(spec: Any) -> None:
    """The probes read the paper's four terms: a model with more (a token mixer's ``m``, a
    decoder's cross-attention ``x``) is refused by name rather than probed on a subset."""
    extra = [k for k in spec.kinds if k not in KINDS]
    if extra:
        raise NotImplementedError(
            f"probing subsets of i, h, f, c on {spec.architecture}, whose decomposition also "
            f"has the term(s) {', '.join(extra)}, is not supported by tl_decomp"
        )


def subset_names(subsets: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical subset names (``"h+i"`` -> ``"i+h"``), in the paper's i, h, f, c order."""
    if subsets == "all":
        return SUBSETS
    out = []
    for s in [subsets] if isinstance(subsets, str) else subsets:
        parts = s.split("+")
        if any(p not in KINDS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"bad subset {s!r}: join distinct terms of i, h, f, c with '+'")
        out.append("+".join(sorted(parts, key=KINDS.index)))
    if not out:
        raise ValueError("no subsets given")
    return tuple(dict.fromkeys(out))


def selector(subsets: Sequence[str]) -> Float[Tensor, "subset factor"]:
    """0/1 rows: which of i, h, f, c each subset sums."""
    return torch.tensor([[float(k in s.split("+")) for k in KINDS] for s in subsets])


def split(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Occurrence indices for train / validation / test, 80/10/10, shuffled by `seed`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = round(0.8 * n), round(0.1 * n)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def fit_predict(probe, x_tr, y_tr, x_va, y_va, x_te, n_classes, seed, opts) -> Tensor:
    """Test predictions ``[subset n_test]``: each subset's probe, its hyper-parameters chosen
    on the validation split (scikit-learn; subsets in parallel with joblib)."""
    from joblib import Parallel, delayed

    arrays = [t.double().numpy() for t in (x_tr, x_va, x_te)]
    y_tr_np, y_va_np = y_tr.numpy(), y_va.numpy()
    jobs = (
        delayed(_one_subset)(probe, a[s], y_tr_np, b[s], y_va_np, c[s], seed, opts)
        for s, (a, b, c) in enumerate([arrays] * x_tr.shape[0])
    )
    preds = list(Parallel(n_jobs=opts.get("n_jobs", 1))(jobs))
    return torch.as_tensor(np.stack([np.asarray(p) for p in preds])).long()


def _one_subset(probe, x_tr, y_tr, x_va, y_va, x_te, seed, opts):
    """One subset: fit every candidate on train, keep the best on validation, predict test."""
    if len(np.unique(y_tr)) == 1:  # nothing to learn: every candidate predicts that class
        return np.full(len(x_te), y_tr[0])
    from sklearn.exceptions import ConvergenceWarning

    best, best_score = None, -np.inf
    for model in _candidates(probe, x_tr.shape[1], seed, opts):
        with warnings.catch_warnings():  # a budget of epochs, not convergence, ends the fit
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_tr, y_tr)
        score = _validation_score(model, x_va, y_va)
        if score > best_score:  # ties keep the earlier (more regularised) candidate
            best, best_score = model, score
    return best.predict(x_te)


def _validation_score(model, x_va, y_va) -> float:
    """Minus the validation log-loss where the probe gives probabilities (smoother than
    accuracy on a small split), else validation accuracy."""
    if len(y_va) == 0:
        return 0.0
    if not hasattr(model, "predict_proba") or len(model.classes_) < 2:
        return float((model.predict(x_va) == y_va).mean())
    proba = model.predict_proba(x_va)
    col = {c: i for i, c in enumerate(model.classes_)}
    p = np.array([proba[i, col[c]] if c in col else 0.0 for i, c in enumerate(y_va)])
    return float(np.log(np.clip(p, 1e-12, 1)).mean())


def _candidates(probe: str, d: int, seed: int, opts: dict) -> list:
    """The models tried on one subset, most regularised first."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if probe == "knn":  # raw features, cosine: the paper's
        return [KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute")]
    if probe == "linear":
        return [
            make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=opts["max_iter"]))
            for c in opts["C"]
        ]
    return [
        make_pipeline(
            StandardScaler(),
            MLPClassifier(
                (opts["hidden"] or d,),
                alpha=alpha,
                early_stopping=False,  # the validation split already picks alpha
                max_iter=opts["max_iter"],
                random_state=seed,
            ),
        )
        for alpha in opts["alpha"]
    ]


def macro_f1(pred: Int[Tensor, "subset n"], y: Int[Tensor, " n"], n_classes: int) -> Tensor:
    """Mean F1 over the classes that occur in the truth or the predictions (sklearn's)."""
    p, t = F.one_hot(pred, n_classes).bool(), F.one_hot(y, n_classes).bool()[None]
    tp, fp, fn = (p & t).sum(1), (p & ~t).sum(1), (~p & t).sum(1)
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp.double() / denom.clamp_min(1), 0.0)
    return f1.sum(1) / (denom > 0).sum(1)


def agreement(pred: Int[Tensor, "subset n"], n_classes: int) -> tuple[Tensor, Tensor]:
    """Two ``[subset subset]`` matrices between subsets' predictions on the same words: the
    share given the same label, and the macro-F1 of one against the other (the authors';
    per class ``2|A ∩ B| / (|A| + |B|)``, so symmetric; diagonal 1)."""
    same = (pred[:, None] == pred[None]).double().mean(-1)
    f1 = torch.stack([macro_f1(pred, truth, n_classes) for truth in pred], 1).double()
    return same, f1
