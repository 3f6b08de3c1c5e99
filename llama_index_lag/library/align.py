"""Offline spectral alignment of LoRA adapters (LAG / SpectR).

For one module and adapter i with ``delta_i = s_i B_i A_i`` (B_i: [m, r], A_i: [r, n]):

    B_i = Q_B R_B,  A_i^T = Q_A R_A                      (thin QR, never form the m x n delta)
    s_i R_B R_A^T = U_c S V_c^T                         (SVD of an r x r core)
    B*_i = Q_B U_c S   [m, r]      A*_i = (Q_A V_c)^T   [r, n]  (orthonormal rows)

so ``B*_i A*_i == s_i B_i A_i``. The Arrow prototype is ``A*_i[0]``, the top right singular vector.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def spectral_align(
    A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, ranks: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align a batch of adapters of one module.

    Args:
        A: [N, r, n] lora_A, zero-padded beyond each adapter's rank.
        B: [N, m, r] lora_B, zero-padded likewise.
        scaling: [N] LoRA scaling s_i.
        ranks: [N] true ranks (rows/columns beyond are zeroed in the output); default all r.
        dtype: precision of the QRs and the factors (the r x r core is always float64). The library
            compiler uses float32 (what it stores at most): half the memory traffic of float64.

    Returns:
        (A_star [N, r, n], B_star [N, m, r], S [N, r]) in ``dtype``, singular values descending. Each
        singular pair's sign is fixed so the largest-magnitude entry of its A* row is positive
        (deterministic output).
    """
    qb, rb = torch.linalg.qr(B.to(dtype))  # [N, m, r], [N, r, r]
    qa, ra = torch.linalg.qr(A.to(dtype).transpose(1, 2))  # [N, n, r], [N, r, r]
    core = scaling.double()[:, None, None] * (rb.double() @ ra.double().transpose(1, 2))  # [N, r, r]
    uc, s, vch = torch.linalg.svd(core)  # [N, r, r], [N, r], [N, r, r]
    uc, s, vch = uc.to(dtype), s.to(dtype), vch.to(dtype)
    if ranks is not None:  # singular pairs beyond an adapter's rank are zeroed
        keep = torch.arange(A.shape[1])[None, :] < ranks[:, None]  # [N, r]
        s = s * keep
        vch = vch * keep[..., None]
    a_star = vch @ qa.transpose(1, 2)  # [N, r, n]  = V^T
    # Canonical signs: flip pair j so that argmax_k |A*[j, k]| is positive (B* column flips with it).
    pivot = a_star.abs().argmax(dim=-1, keepdim=True)  # [N, r, 1]
    sign = torch.sign(a_star.gather(-1, pivot)).squeeze(-1)  # [N, r]
    sign[sign == 0] = 1
    a_star.mul_(sign[..., None])
    b_star = qb @ (uc * (s * sign)[:, None, :])  # [N, m, r]  = U S (signs folded into the r x r factor)
    return a_star, b_star, s
