"""Offline spectral alignment of LoRA adapters (LAG / SpectR).

For one module and adapter i with ``delta_i = s_i B_i A_i`` (B_i: [m, r], A_i: [r, n]):

    B_i = Q_B R_B,  A_i^T = Q_A R_A                      (thin QRs; never form the m x n delta)
    s_i R_B R_A^T = U_c S V_c^T                         (SVD of the r x r core)
    A*_i = (Q_A V_c)^T   [r, n]  (orthonormal rows)
    B*_i = Q_B U_c S = s_i B_i A_i Q_A V_c = B_i (s_i R_A^T V_c)   [m, r]

so ``B*_i A*_i == s_i B_i A_i``. The Arrow prototype is ``A*_i[0]``, the top right singular vector.
Computed without Q_B (only R_B, for the core) and with the core's right singular vectors taken from
``eigh(core^T core)``: in PyTorch both are much cheaper than a full QR and a batched SVD of tiny matrices
(alignment was about a third of a library compile's CPU time). Both are exact identities. The singular
vectors of near-equal small singular values are less sharply determined than by an SVD (a rotation among
them of ~eps * s_1^2 / (s_j^2 - s_k^2)), which B* A*, SpectR's ||A* x|| over all rows and the prototype
(the top vector) do not see.
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
    B = B.to(dtype)
    rb = torch.linalg.qr(B, mode="r").R.double()  # [N, r, r]
    qa, ra = torch.linalg.qr(A.to(dtype).transpose(1, 2))  # [N, n, r], [N, r, r]
    s_i = scaling.double()[:, None, None]  # [N, 1, 1]
    core = s_i * (rb @ ra.double().transpose(1, 2))  # [N, r, r]
    v = torch.linalg.eigh(core.transpose(1, 2) @ core).eigenvectors.flip(-1)  # [N, r, r] = V_c, descending
    s = torch.linalg.vector_norm(core @ v, dim=1)  # [N, r]  column norms of U_c S = core V_c
    to_b = s_i * (ra.double().transpose(1, 2) @ v)  # [N, r, r]  B* = B to_b
    vch, to_b, s = v.transpose(1, 2).to(dtype), to_b.to(dtype), s.to(dtype)
    if ranks is not None:  # singular pairs beyond an adapter's rank are zeroed
        keep = torch.arange(A.shape[1])[None, :] < ranks[:, None]  # [N, r]
        s = s * keep
        to_b = to_b * keep[:, None, :]
        vch = vch * keep[..., None]
    a_star = vch @ qa.transpose(1, 2)  # [N, r, n]  = V^T
    # Canonical signs: flip pair j so that its largest-magnitude A* entry is positive (B*'s column flips
    # with it); from each row's max and min, no |A*| buffer (of +x and -x, the positive one counts).
    sign = torch.where(a_star.amax(dim=-1) >= -a_star.amin(dim=-1), 1.0, -1.0).to(dtype)  # [N, r]
    a_star.mul_(sign[..., None])
    b_star = B @ (to_b * sign[:, None, :])  # [N, m, r]  = U S
    return a_star, b_star, s
