"""Exact fast attention for the image encoder's blocks (spec 2.2, "Speed note").

A windowed block of the official encoder zero-pads the 8^3 token grid to a 14^3 window and attends
over all 2,744 positions. Here only the real tokens are computed as queries, and the padding keys are
folded into one extra softmax column without approximation:

* every padding token has the same key k_b and value v_b (the qkv biases: the projection of zero),
  so a query's padding logits differ only through the relative-position terms;
* for query (qd, qh, qw) and key (kd, kh, kw) those terms are A[kw] + B[kd, kw] + C[kh, kw]
  (A depends on the query, B and C on its (qd, qh) row only: see `relative_position_terms`);
* the padding set is the disjoint union {kw >= rw} u {kw < rw, kd >= rd} u {kw < rw, kd < rd, kh >= rh}
  for a real box rd x rh x rw; on each part, for a fixed kw, the sum of exp over kd and kh factorises
  into (sum of exp(B) over its kd range) x (sum of exp(C) over its kh range).

So all padding keys together become one column whose logit is the log of their total softmax mass (a
log-sum-exp over kw of the per-kw masses) and whose value is v_b; one ordinary softmax over the real keys
and that column is exact up to float rounding. Global blocks are the same computation with no padding.
For the real keys, A[kw] enters through the matrix product (rw extra query and key channels) and B + C,
the same for the rw queries of a row, is added row by row: no add is broadcast over short innermost axes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .image_encoder import Attention

CPU_HEADS_PER_STEP = 4  # ~4 MB of full-size logits: within two cores' L2 here; the best of 2, 4, 6 and 12


def block_attention(attn: Attention, x: torch.Tensor, window_size: int, fused: bool = False) -> torch.Tensor:
    """Attention output of one encoder block, equal to the official computation.

    x: (B, D, H, W, dim) tokens after norm1; window_size 0 means global attention.
    fused: use `F.scaled_dot_product_attention` for the last step (see `attend`).
    Returns (B, D, H, W, dim), already through the output projection.
    """
    if window_size == 0:
        return attend(attn, x, x.shape[1], fused)
    return _over_windows(x, window_size, lambda window: attend(attn, window, window_size, fused))


def _over_windows(
    x: torch.Tensor, window_size: int, attend_one: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply `attend_one` to each window of the grid (the last ones may be partial) and reassemble.

    The official encoder pads at the high end only, so a partial window's real tokens are a box at the
    low corner of its window: exactly what `attend` expects.
    """
    if max(x.shape[1:4]) <= window_size:  # the usual case: the whole grid is one window
        return attend_one(x)
    planes = []
    for slab_d in x.split(window_size, dim=1):
        rows = []
        for slab_h in slab_d.split(window_size, dim=2):
            rows.append(torch.cat([attend_one(window) for window in slab_h.split(window_size, dim=3)], dim=3))
        planes.append(torch.cat(rows, dim=2))
    return torch.cat(planes, dim=1)


def attend(attn: Attention, x: torch.Tensor, size: int, fused: bool = False) -> torch.Tensor:
    """Attention of the real tokens of one size^3 window whose remaining positions are zero padding.

    x: (B, rd, rh, rw, dim) real tokens occupying the low corner of the window (all <= size).
    fused: use `F.scaled_dot_product_attention` for the last steps instead of explicit matrices.
    """
    b, rd, rh, rw, dim = x.shape
    qkv = attn.qkv(x.reshape(b, rd * rh * rw, dim))
    # The projections follow any autocast; the attention itself runs in float32: its products are small,
    # and reduced-precision element-wise work (the bias, the softmax) is slow on CPUs and less precise.
    with torch.autocast(x.device.type, enabled=False):
        out = _attend_float32(attn, qkv.float(), (rd, rh, rw), size, fused)
    return _merge_heads(attn, out.to(qkv.dtype), b, (rd, rh, rw))


def _attend_float32(
    attn: Attention, qkv: torch.Tensor, grid: tuple[int, int, int], size: int, fused: bool
) -> torch.Tensor:
    """qkv (B, n, 3*dim) of the real tokens of a `grid` box -> attention output (B*heads, n, head_dim)."""
    rd, rh, rw = grid
    q, keys, values = _split_heads(qkv, attn.num_heads)
    padded = grid != (size, size, size)
    q_pad = None
    if padded:
        q_pad, k_pad, v_pad = _padding_qkv(attn, qkv.shape[0], q)
    term_d, term_h, term_w = relative_position_terms(attn, q.view(-1, rd, rh, rw, q.shape[-1]), q_pad, size)
    padding_mass = padding_log_mass(term_d, term_h, term_w) if padded else None
    q, keys = _with_key_column_channels(q * attn.scale, keys, term_d[..., :rw])
    if padding_mass is not None:
        # The padding column's key and value: the padding token's (no key-column channel: the log-mass
        # already holds the relative-position terms).
        keys = torch.cat([keys, torch.cat([k_pad, k_pad.new_zeros(*k_pad.shape[:-1], rw)], dim=-1)], dim=1)
        values = torch.cat([values, v_pad], dim=1)
    # The rest of the bias depends on the query's (qd, qh) row only: (B*heads, rd, rh, rd*rh*rw).
    row_bias = (term_h[:, :, :, :rd, None, :rw] + term_w[:, :, :, None, :rh, :rw]).flatten(3)
    if not fused and not torch.is_grad_enabled() and q.device.type == "cpu":
        return _attend_cache_sized(q, keys, values, row_bias, padding_mass)
    bias = _bias_matrix(row_bias, padding_mass, rw)
    if fused:  # 4-D: PyTorch's fused kernels take (batch, heads, tokens, channels) only, else its plain one runs
        return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=bias[None], scale=1.0)[0]
    return torch.baddbmm(bias, q, keys.transpose(-2, -1)).softmax(dim=-1) @ values


def _with_key_column_channels(
    q: torch.Tensor, keys: torch.Tensor, column_terms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys with rw extra channels whose product is the term A[kw] of every real key.

    The query carries its A[0..rw-1], the key a one-hot of its kw, so the matrix product adds the only
    bias term that varies within a query row (an add broadcast over kd and kh is several times slower).
    q: (B*heads, n, c) scaled queries; keys: (B*heads, n, c) real keys, kw fastest;
    column_terms: (B*heads, rd, rh, rw, rw) A[kw] of each query. Returns (B*heads, n, c + rw) twice.
    """
    bh, n, _ = q.shape
    rw = column_terms.shape[-1]
    key_columns = torch.eye(rw, dtype=keys.dtype, device=keys.device).repeat(n // rw, 1)
    return (
        torch.cat([q, column_terms.reshape(bh, n, rw)], dim=-1),
        torch.cat([keys, key_columns.expand(bh, n, rw)], dim=-1),
    )


def _attend_cache_sized(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    row_bias: torch.Tensor,
    padding_mass: torch.Tensor | None,
) -> torch.Tensor:
    """The same attention, CPU inference only: a few heads at a time, so that each block of logits
    (about 1 MB a head at full size) is written, biased, softmaxed and read back while still in cache."""
    out = q.new_empty(q.shape[0], q.shape[1], values.shape[-1])
    for start in range(0, q.shape[0], CPU_HEADS_PER_STEP):
        heads = slice(start, start + CPU_HEADS_PER_STEP)
        logits = torch.bmm(q[heads], keys[heads].transpose(-2, -1))
        _add_bias_(logits, row_bias[heads], None if padding_mass is None else padding_mass[heads])
        torch.bmm(torch.softmax(logits, dim=-1, out=logits), values[heads], out=out[heads])
    return out


def _add_bias_(logits: torch.Tensor, row_bias: torch.Tensor, padding_mass: torch.Tensor | None) -> None:
    """In place: logits (h, n, n [+ 1]) += the row bias of the real keys and the padding log-mass."""
    h, rd, rh, n = row_bias.shape
    logits[:, :, :n].view(h, rd, rh, -1, n).add_(row_bias[:, :, :, None])
    if padding_mass is not None:
        logits[:, :, n:].add_(padding_mass)


def _bias_matrix(row_bias: torch.Tensor, padding_mass: torch.Tensor | None, rw: int) -> torch.Tensor:
    """(h, n, n [+ 1]): the row bias repeated over the rw queries of each row, then the padding log-mass."""
    h, rd, rh, n = row_bias.shape
    bias = row_bias[:, :, :, None].expand(h, rd, rh, rw, n).reshape(h, n, n)
    return bias if padding_mass is None else torch.cat([bias, padding_mass], dim=-1)


def relative_position_terms(
    attn: Attention, grid_q: torch.Tensor, q_pad: torch.Tensor | None, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three decomposed relative-position terms of real queries against every key of the window.

    grid_q: (B*heads, rd, rh, rw, c) unscaled real queries; q_pad: (B*heads, 1, c) query of a padding
    token (None when nothing is padded). With the official broadcast quirk the term for query
    (qd, qh, qw) and key (kd, kh, kw) is q(qd,qh,qw).Td[qd-kw] + q(qd,qh,kd).Th[qh-kw] + q(qd,qh,kh).Tw[kh-kw],
    where q(qd,qh,x) is a padding token's query once x >= rw. Returned:
      term_d (B*heads, rd, rh, rw, kw), term_h (B*heads, rd, rh, kd, kw), term_w (B*heads, rd, rh, kh, kw),
    with kd, kh, kw running over the whole window.
    """
    bh, rd, rh, rw, c = grid_q.shape
    # The query row along the last axis, continued by padding queries to the window's length.
    row_q = grid_q
    if rw < size:
        row_q = torch.cat([grid_q, q_pad.view(bh, 1, 1, 1, c).expand(bh, rd, rh, size - rw, c)], dim=3)
    # One product with all three tables (flipped); each term is then a view of it.
    rows = 2 * size - 1
    tables = torch.cat([attn.rel_pos_d.flip(0), attn.rel_pos_h.flip(0), attn.rel_pos_w.flip(0)]).to(row_q.dtype)
    products = (row_q @ tables.transpose(0, 1)).contiguous()  # (B*heads, rd, rh, size, 3 * rows)
    term_d = _offset_view(products[:, :, :, :rw, :rows], axis=1, size=size)
    term_h = _offset_view(products[..., rows : 2 * rows], axis=2, size=size)
    term_w = _offset_view(products[..., 2 * rows :], axis=3, size=size)
    return term_d, term_h, term_w


def _offset_view(products: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """View [..., i, ..., k] = products[..., size - 1 - i + k], with i the index along `axis`.

    products[..., r] holds q.T[2*size - 2 - r] (the table flipped), so the view is q.T[i - k + size - 1]:
    the table row of offset i - k, read without copying by stepping one element back per step of i
    (the "relative shift" of Transformer-XL).
    """
    shape = (*products.shape[:-1], size)
    strides = list(products.stride())
    strides[axis] -= 1
    return products.as_strided(shape, strides, products.storage_offset() + size - 1)


def padding_log_mass(term_d: torch.Tensor, term_h: torch.Tensor, term_w: torch.Tensor) -> torch.Tensor:
    """Log of the summed exp(relative terms) of all padding keys of each real query.

    The content logit q.k_b (the same for every padding key) is added by the caller.
    Returns (B*heads, rd*rh*rw, 1).
    """
    _, rd, rh, rw, size = term_d.shape
    # Per query row and kw, sums of exp over kd and over kh, each split into real and padding keys and
    # shifted by its maximum over the whole axis. A padding sum can only underflow when it is below
    # e^-87 of the largest key of its kw, which then outweighs it beyond float precision.
    h_real, h_pad, h_max = _split_exp_sums(term_h, rd)  # (B*heads, rd, rh, kw)
    w_real, w_pad, w_max = _split_exp_sums(term_w, rh)
    w_all = w_real + w_pad
    # For kw >= rw every (kd, kh) is padding; for kw < rw the padding keys are kd >= rd (any kh)
    # and kd < rd, kh >= rh. Only sums of positive terms, so nothing cancels.
    mass = torch.cat(
        [(h_pad * w_all + h_real * w_pad)[..., :rw], ((h_real + h_pad) * w_all)[..., rw:]],
        dim=-1,
    )
    # Floored at the smallest normal float: a vanished mass then gives a finite logit (no NaN gradient).
    row_log_mass = mass.clamp_min_(torch.finfo(mass.dtype).tiny).log_() + h_max + w_max
    return torch.logsumexp(term_d + row_log_mass[:, :, :, None, :], dim=-1, keepdim=True).flatten(1, 3)


def _split_exp_sums(terms: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of exp(terms - max) over dim 3 for indices < split and >= split, and the max.

    terms: (B*heads, rd, rh, L, kw); returns three (B*heads, rd, rh, kw) tensors.
    """
    top = terms.amax(dim=3, keepdim=True)
    shifted = (terms - top).exp_()
    return shifted[:, :, :, :split].sum(dim=3), shifted[:, :, :, split:].sum(dim=3), top.squeeze(3)


def _padding_qkv(attn: Attention, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B*heads, 1, head_dim) of a padding token, in `like`'s dtype and device.

    The official code projects a zero token, which gives exactly the projection's bias.
    """
    bias = attn.qkv.bias
    if bias is None:
        bias = like.new_zeros(attn.qkv.out_features)
    return _split_heads(bias.to(like.dtype).expand(batch, 1, -1), attn.num_heads)


def _split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, n, 3*dim) -> q, k, v each (B*heads, n, head_dim); channel layout [3][heads][head_dim]."""
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.reshape(3, b * heads, n, -1).unbind(0)


def _merge_heads(attn: Attention, out: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B*heads, n, head_dim) -> output projection of (B, rd, rh, rw, dim), head-major channels."""
    heads = attn.num_heads
    out = out.view(batch, heads, *grid, -1).permute(0, 2, 3, 4, 1, 5).reshape(batch, *grid, -1)
    return attn.proj(out)
