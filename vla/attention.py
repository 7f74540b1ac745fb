"""The block attention mask of the VLA token sequence (docs/architecture.md).

Every token carries a *block id* (prefix 0, plan 1, state 2, action 3, frame 4 in `vla.model`),
a *causal* flag and a *valid* flag (False for padding). One rule builds the whole mask:

    query q may attend to key k  iff  valid[k]
                                  and sees[block[q], block[k]]
                                  and (block[q] != block[k] or not causal[q] or k <= q)

``sees`` is a block-to-block visibility matrix. By default it is lower-triangular (a block sees
itself and every block to its left, never one to its right); callers edit single entries for the
switches (``frame`` must not see the noisy action block; with ``frame: condition`` the action
block may see the frame block). Every token also sees itself, so padding rows are never empty
(an all-False row would make ``scaled_dot_product_attention`` return NaN).

Example 1 — prefix of 3 tokens (the last is padding), a causal plan of 2, an action block of 2
(default ``sees``); rows are queries, columns keys, ``1`` = may attend::

    block   0 0 0 1 1 3 3          q\\k  p p _ P P a a
    causal  0 0 0 1 1 0 0           p   1 1 . . . . .
    valid   1 1 0 1 1 1 1           p   1 1 . . . . .
                                    _   1 1 1 . . . .     (padding query: output unused)
                                    P   1 1 . 1 . . .     (plan is causal)
                                    P   1 1 . 1 1 . .
                                    a   1 1 . 1 1 1 1     (actions: bidirectional, see left)
                                    a   1 1 . 1 1 1 1

Example 2 — prefix 1, state 1, actions 2, frame 2, with ``sees[frame, action] = False`` (the
frame sees the state but not the noisy actions) and ``sees[action, frame] = True``
(``frame: condition``)::

    block   0 2 3 3 4 4            q\\k  p s a a f f
                                    p   1 . . . . .
                                    s   1 1 . . . .
                                    a   1 1 1 1 1 1
                                    a   1 1 1 1 1 1
                                    f   1 1 . . 1 1
                                    f   1 1 . . 1 1

openpi's ``make_attn_mask`` (cumulative "ar" flags) is the model; explicit block ids make the
exceptions above one-line edits instead of sequence reorderings. `token_positions` derives the
rotary position of every token from the same block ids (see its docstring).
"""

from __future__ import annotations

import torch


def default_visibility(num_blocks: int) -> torch.Tensor:
    """Lower-triangular block visibility: ``sees[qb, kb] = kb <= qb``. bool[num_blocks, num_blocks]."""
    return torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()


def make_attn_mask(
    block_ids: torch.Tensor,
    causal: torch.Tensor,
    valid: torch.Tensor,
    sees: torch.Tensor,
    num_queries: int | None = None,
) -> torch.Tensor:
    """Build the boolean attention mask (True = may attend) for one token sequence.

    Args:
        block_ids: i64[N] block id of every token (same for every sample of the batch).
        causal: bool[N] whether the token's block is causal (autoregressive) at this token.
        valid: bool[B, N] False for padding tokens (masked out as keys).
        sees: bool[nb, nb] block visibility, ``sees[query_block, key_block]``.
        num_queries: when given, only the last ``num_queries`` tokens are queries (the rest are
            a KV cache); the mask then has shape [B, num_queries, N].

    Returns:
        bool[B, Q, N] with Q = ``num_queries`` or N; broadcast over heads by the caller.
    """
    n = block_ids.shape[0]
    if causal.shape != (n,) or valid.shape[-1] != n:
        raise ValueError(
            f"make_attn_mask: block_ids has {n} tokens but causal has shape {tuple(causal.shape)} "
            f"and valid has shape {tuple(valid.shape)}; expected [{n}] and [B, {n}]"
        )
    nb = sees.shape[0]
    if int(block_ids.max()) >= nb or int(block_ids.min()) < 0:
        raise ValueError(f"make_attn_mask: block ids must lie in [0, {nb}), got {block_ids.unique().tolist()}")
    q = n if num_queries is None else num_queries
    q_idx = torch.arange(n - q, n, device=block_ids.device)  # (Q,)
    k_idx = torch.arange(n, device=block_ids.device)  # (N,)
    qb, kb = block_ids[q_idx], block_ids  # (Q,), (N,)
    allowed = sees.to(block_ids.device)[qb[:, None], kb[None, :]]  # (Q, N)
    same = qb[:, None] == kb[None, :]  # (Q, N)
    ahead = k_idx[None, :] > q_idx[:, None]  # (Q, N)
    allowed = allowed & ~(same & causal[q_idx][:, None] & ahead)  # (Q, N)
    mask = allowed[None] & valid[:, None, :]  # (B, Q, N)
    diag = k_idx[None, :] == q_idx[:, None]  # (Q, N) every token sees itself
    return mask | diag[None]  # (B, Q, N)


def token_positions(
    block_ids: torch.Tensor, valid: torch.Tensor, sees: torch.Tensor, num_queries: int | None = None
) -> torch.Tensor:
    """Rotary position of each query token: valid tokens of the *other* blocks it sees, plus valid
    tokens of its own block before it. i64[B, Q].

    For a plain left-to-right sequence this is the running count of valid tokens (padding does not
    advance it). Blocks that cannot see each other (the action and frame blocks with ``frame: aux``)
    both start right after their shared context, so a block's positions do not depend on whether a
    sibling block was run in the same call (training) or separately against a KV cache (inference).
    """
    n = block_ids.shape[0]
    q = n if num_queries is None else num_queries
    q_idx = torch.arange(n - q, n, device=block_ids.device)  # (Q,)
    k_idx = torch.arange(n, device=block_ids.device)  # (N,)
    qb, kb = block_ids[q_idx], block_ids  # (Q,), (N,)
    same = qb[:, None] == kb[None, :]  # (Q, N)
    counted = (sees.to(block_ids.device)[qb[:, None], kb[None, :]] & ~same) | (same & (k_idx[None, :] < q_idx[:, None]))
    return (counted[None] & valid[:, None, :]).sum(-1)  # (B, Q)
