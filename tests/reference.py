"""An independent float64 CTC written from Graves et al. (2006), one sequence at a time.

Plain loops over frames and lattice states, with -inf as log 0 and no renormalisation: slow,
but a different way of computing the same numbers than ctc_multi's recursion, so agreement
between the two means something. Used only by the tests and the accuracy benchmark.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


def sequence_alpha_beta(log_probs: np.ndarray, label: list[int], blank_id: int):
    """Eq. 5-10 of the paper for one sequence: log alpha and log beta, both (T, S), S = 2L + 1.

    Both include the emission of their own frame (the paper's convention), so
    alpha_t(s) + beta_t(s) - log y_t(l'_s) is log P(path through s at t).
    """
    frames = log_probs.shape[0]
    extended = [blank_id]
    for symbol in label:
        extended += [symbol, blank_id]
    states = len(extended)
    alpha = np.full((frames, states), -np.inf)
    beta = np.full((frames, states), -np.inf)
    alpha[0, 0] = log_probs[0, blank_id]
    if states > 1:
        alpha[0, 1] = log_probs[0, extended[1]]
    for t in range(1, frames):
        for s in range(states):
            terms = [alpha[t - 1, s]]
            if s >= 1:
                terms.append(alpha[t - 1, s - 1])
            if s >= 2 and extended[s] != blank_id and extended[s] != extended[s - 2]:
                terms.append(alpha[t - 1, s - 2])
            alpha[t, s] = np.logaddexp.reduce(terms) + log_probs[t, extended[s]]
    beta[frames - 1, states - 1] = log_probs[frames - 1, extended[states - 1]]
    if states > 1:
        beta[frames - 1, states - 2] = log_probs[frames - 1, extended[states - 2]]
    for t in range(frames - 2, -1, -1):
        for s in range(states):
            terms = [beta[t + 1, s]]
            if s + 1 < states:
                terms.append(beta[t + 1, s + 1])
            if s + 2 < states and extended[s] != blank_id and extended[s] != extended[s + 2]:
                terms.append(beta[t + 1, s + 2])
            beta[t, s] = np.logaddexp.reduce(terms) + log_probs[t, extended[s]]
    return alpha, beta, extended


def ctc_reference(logits, logit_paddings, labels, label_paddings, blank_id: int = 0):
    """float64 loss (B,) and gradient d loss / d logits (B, T, K).

    Padded frames are removed before the recursion (their gradient is zero); an infeasible
    sequence gets loss +inf and a NaN-free gradient equal to the softmax.
    """
    logits = np.asarray(logits, dtype=np.float64)
    batch, _, num_classes = logits.shape
    losses = np.zeros(batch)
    grads = np.zeros_like(logits)
    for b in range(batch):
        valid = np.asarray(logit_paddings[b]) == 0
        label = [int(v) for v, p in zip(labels[b], label_paddings[b]) if p == 0]
        log_probs = _log_softmax(logits[b][valid])
        if log_probs.shape[0] == 0:
            losses[b] = 0.0 if not label else np.inf
            continue
        alpha, beta, extended = sequence_alpha_beta(log_probs, label, blank_id)
        tail = alpha[-1, -2:] if len(extended) > 1 else alpha[-1, -1:]
        log_likelihood = np.logaddexp.reduce(tail)
        losses[b] = -log_likelihood
        occupancy = np.zeros_like(log_probs)
        if np.isfinite(log_likelihood):
            for s, symbol in enumerate(extended):
                occupancy[:, symbol] += np.exp(alpha[:, s] + beta[:, s] - log_probs[:, symbol] - log_likelihood)
        grads[b][valid] = np.exp(log_probs) - occupancy
    return losses, grads
