"""DeBERTa's position terms for the attention scores, by a relative shift of two matmuls instead of
a gather.

The math (`disentangled_bias_ref`, what the model means): with r = index[i, j] the table row of the
pair,

    c2p[b, h, i, j] = q[b, h, i] . pos_k[h, r] * scale   the query's content, the key's position
    p2c[b, h, i, j] = k[b, h, j] . pos_q[h, r] * scale   the key's content, that same position

The reference multiplies every query (key) with every row, (B, H, T, R), and gathers the T of them
each pair uses: a broadcast matmul that copies pos_k B times, a (B, H, T, T) gather of int64
indices, and in backward a zeroed (B, H, T, R) buffer and a scatter-add, the slowest of them on the
CPU.

Here the index is used for what it is: a function of i - j alone. Lay the rows out once per
distance, P[u] = the row of distance u - (T - 1), u = 0 .. 2T-2 (2T - 1 rows, repeats where
distances share a bucket), and multiply:

    Fp = k @ P.T           (T, 2T-1) per sequence and head: Fp[j, u] = k_j . P[u]
    p2c[i, j] = Fp[j, (T - 1) + i - j]

Row j of the result reads Fp's row j from column T - 1 - j on: in Fp's memory, element (j, i) sits
at j (2T - 2) + i + (T - 1), so p2c.T is a strided view of Fp (strides 2T - 2 and 1), no copy and no
index. c2p has the same shape of dependence with the roles of i and j swapped; with P in reverse
order (distance T - 1 first), c2p = view of q @ P_reversed.T the same way. Autograd takes the views
back with a strided copy into zeros, then the two matmuls' own backward.

Each row of Fp uses T of its 2T - 1 columns. Split the rows in halves and each half reaches only T +
T/2 - 1 of the distances: a quarter less to multiply, and products that fit the caches better. The
price is a copy of the halves into one (T, T) per term. The products are per head, over the B
sequences at once, so pos_k and pos_q are neither repeated nor expanded per sequence.

Per query the products span 1.5 T rows where the reference's span all R (DeBERTa-v3: 512, against
191 here at T = 128 and 767 at T = 512). No gather or scatter makes up for it. Per layer of
deberta-v3-base, forward and backward, on a quiet 2-core CPU, ms:

    B x T, dtype    halves   one product (no halves)   gather, per head   reference (all 512 rows)
    2 x 512, fp32        99            161                      117                 143
    2 x 512, bf16        47             59                       96                 107
    8 x 128, fp32        19             20                       24                  77
    8 x 128, bf16        11             11                       19                  67

`disentangled_bias` falls back to the reference where the index is not square (T, T). The reference
is the model's own math, `mlm.model.deberta.position_bias`; `install` puts this function in its
place. Shapes: B batch, H heads, T tokens, D head dim, R table rows."""

from __future__ import annotations

import torch
import torch.nn as nn

from mlm.model.deberta import DisentangledAttention
from mlm.model.deberta import position_bias as disentangled_bias_ref


def position_rows(T: int) -> int:
    """Table rows each query (key) is multiplied with per term here, at most: T + ceil(T/2) - 1 (for
    HFU)."""
    return T + (T + 1) // 2 - 1


def _relative_products(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[h, b, a, c] = x[b, h, a] . rows[h, T - 1 - a + c]: x (B, H, T, D), rows (H, 2T-1, D) ->
    (H, B, T, T).

    Per half of the a's: one product against the T + n - 1 rows those n reach, and the strided view
    of it."""
    B, H, T, D = x.shape
    half = (T + 1) // 2
    parts = []
    for a0 in range(0, T, half):
        n = min(half, T - a0)
        # rows first .. 2T-2-a0 are the ones x[a0 : a0+n] reach: T + n - 1 of them
        first = T - a0 - n
        xs = x[:, :, a0 : a0 + n].transpose(0, 1).reshape(H, B * n, D)  # (H, B*n, D)
        products = (xs @ rows[:, first : 2 * T - 1 - a0].transpose(-1, -2)).view(H, B, n, T + n - 1)
        # [a, c] sits at a (T + n - 1) + (n - 1 - a + c) = a (T + n - 2) + c + n - 1 in products'
        # memory (a fresh matmul output: contiguous, storage offset 0).
        parts.append(
            products.as_strided((H, B, n, T), (*products.stride()[:2], T + n - 2, 1), n - 1)
        )
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (H, B, T, T)


def disentangled_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_q: torch.Tensor | None,
    pos_k: torch.Tensor | None,
    index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """DeBERTa's position terms, c2p + p2c, to add to the attention scores: (B, H, T, T), maybe a
    strided view.

    q, k (B, H, T, D); pos_q, pos_k (H, R, D), or None for a term the config leaves out; index (T,
    T) of rows in [0, R), a function of i - j (as relative positions are); scale multiplies the
    products."""
    B, H, T, D = q.shape
    if index.shape != (T, T):
        return disentangled_bias_ref(q, k, pos_q, pos_k, index, scale)
    # Row of each distance, u = 0 .. 2T-2 for i - j = -(T-1) .. T-1: row 0 of the index holds -j,
    # column 0 holds i.
    by_distance = torch.cat([index[0].flip(0), index[1:, 0]])  # (2T-1,)

    bias = None
    if pos_k is not None:
        # (H, 2T-1, D), distance T-1 first
        rows = pos_k.index_select(1, by_distance.flip(0)) * scale
        bias = _relative_products(q, rows)  # (H, B, T, T): [i, j]
    if pos_q is not None:
        rows = pos_q.index_select(1, by_distance) * scale  # (H, 2T-1, D), distance -(T-1) first
        p2c = _relative_products(k, rows).transpose(-1, -2)  # (H, B, T, T): [i, j] from key j's row
        bias = p2c if bias is None else bias + p2c
    return bias.transpose(0, 1)  # (B, H, T, T)


def install(model: nn.Module) -> int:
    """The model's DeBERTa attention modules compute their position terms by `disentangled_bias`."""
    count = 0
    for module in model.modules():
        if isinstance(module, DisentangledAttention):
            # an instance attribute, in front of the class's reference
            module.position_bias = disentangled_bias
            count += 1
    return count
