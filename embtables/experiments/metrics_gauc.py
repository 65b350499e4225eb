"""Group AUC (DIN paper, eq. 10): per-user AUC averaged with weights.

``GAUC = sum_u w_u * AUC_u / sum_u w_u`` with ``w_u`` the user's number of impressions
(rows) in the evaluated set, as in the DIN paper. Users whose rows are all positive or
all negative have no AUC and are skipped (they count in neither sum). Ties in the
predictions count one half (the Mann-Whitney form, equal to sklearn's roc_auc_score).
Vectorised: one global sort, ranks within (user, prediction) groups, no loop per user.
"""

from __future__ import annotations

import numpy as np


def gauc(user_ids, labels, preds, weight: str = "impressions") -> float | None:
    """Impression-weighted group AUC; ``weight="uniform"`` averages users equally.
    Returns None when no user has both classes."""
    u = np.asarray(user_ids).astype(np.int64).ravel()
    y = np.asarray(labels).astype(np.float64).ravel() > 0.5
    p = np.asarray(preds).astype(np.float64).ravel()
    if not (len(u) == len(y) == len(p)):
        raise ValueError(f"gauc: lengths differ (users {len(u)}, labels {len(y)}, preds {len(p)})")
    if len(u) == 0:
        return None
    # Sort by (user, pred); average ranks of tied predictions within a user.
    order = np.lexsort((p, u))
    u, y, p = u[order], y[order], p[order]
    n = len(u)
    new_user = np.r_[True, u[1:] != u[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    new_tie = new_user | np.r_[True, p[1:] != p[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    tie_start = np.flatnonzero(new_tie)
    tie_end = np.r_[tie_start[1:], n]
    # 1-based rank within the user, averaged over ties
    avg_rank = (tie_start + tie_end - 1) / 2.0 - user_start[tie_start] + 1.0
    rank = avg_rank[tie_id]
    uid = np.cumsum(new_user) - 1
    n_users = int(uid[-1]) + 1
    n_pos = np.bincount(uid, weights=y, minlength=n_users)
    n_all = np.bincount(uid, minlength=n_users).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(uid, weights=rank * y, minlength=n_users)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return None
    auc = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    w = n_all[ok] if weight == "impressions" else np.ones(int(ok.sum()))
    return float((w * auc).sum() / w.sum())
