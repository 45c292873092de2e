"""Classification metrics from a confusion matrix (no sklearn): accuracy, macro-F1, MCC."""
from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    c = np.zeros((num_labels, num_labels), dtype=np.int64)           # rows: true, cols: predicted
    np.add.at(c, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return c


def classification_metrics(y_true, y_pred, num_labels: int) -> dict:
    c = confusion(y_true, y_pred, num_labels).astype(np.float64)
    n = c.sum()
    tp = np.diag(c)
    pred, true = c.sum(0), c.sum(1)
    # F1 of a class that is never predicted nor present is 0 (sklearn's zero_division=0).
    denom = pred + true
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    # Multi-class Matthews correlation (Gorodkin 2004), equal to the binary MCC for 2 classes.
    cov_ytyp = tp.sum() * n - (pred * true).sum()
    cov_ypyp = n * n - (pred * pred).sum()
    cov_ytyt = n * n - (true * true).sum()
    mcc = 0.0 if cov_ypyp * cov_ytyt == 0 else cov_ytyp / np.sqrt(cov_ypyp * cov_ytyt)
    return {"accuracy": float(tp.sum() / max(n, 1)), "macro_f1": float(f1.mean()),
            "mcc": float(mcc)}
