"""The online-softmax pieces shared by all kernels (FlashAttention-2, Algorithm 1).

m_i is the running row max, l_i the running sum of exp(s - m_i), alpha the factor
that rescales the old accumulator and sum when the max grows: alpha = exp(m_old - m_new).
"""

from __future__ import annotations

import math

from numba import cuda


@cuda.jit(device=True, inline=True)
def is_visible(i, j, seqlen_q, seqlen_k, causal):
    """Key j is visible to query i: inside the keys and, if causal, on or left of the
    bottom-right-aligned diagonal (j <= i + seqlen_k - seqlen_q)."""
    if j >= seqlen_k:
        return False
    if causal:
        return j <= i + seqlen_k - seqlen_q
    return True


@cuda.jit(device=True, inline=True)
def last_visible_key_end(row_end, seqlen_q, seqlen_k, causal):
    """One past the last key any query row < row_end can see (0 when none)."""
    if not causal:
        return seqlen_k
    end = row_end + seqlen_k - seqlen_q
    return max(0, min(seqlen_k, end))


@cuda.jit(device=True, inline=True)
def rescale(m_old, m_new):
    """alpha = exp(m_old - m_new); 1 while the row has seen no key (m_new = -inf)."""
    if m_new == -math.inf:
        return 1.0
    return math.exp(m_old - m_new)


@cuda.jit(device=True, inline=True)
def finish_row(acc_value, l_i):
    """The normalized output element; 0 for a row that saw no key (never NaN)."""
    if l_i > 0:
        return acc_value / l_i
    return 0.0


@cuda.jit(device=True, inline=True)
def log_sum_exp(m_i, l_i):
    """lse = m_i + log(l_i), natural log; -inf for a row that saw no key."""
    if l_i > 0:
        return m_i + math.log(l_i)
    return -math.inf
