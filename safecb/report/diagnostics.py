"""Codebook diagnostics for the report: how far codes moved, the Harmful Space's singular values, and
the patches the most-moved codes decode to. The math is pure torch; the readers take a RunStore."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safecb.training.harmful_space import aligned_differences, difference_gram


def code_movement(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(K,) distance each code moved as the decoder sees it (L2-normalised rows), codebooks (K, D)."""
    return (F.normalize(after.double(), dim=-1) - F.normalize(before.double(), dim=-1)).norm(dim=-1)


def difference_singular_values(codebook: torch.Tensor, harmful: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Singular values (D,), largest first, of D = [ĉ(z_h,i) − ĉ(z_s,i)] over the positions where the
    aligned pair grids (P, N) differ: the spectrum the Harmful Space was cut from (the square roots of
    the Gram matrix's eigenvalues; no SVD over stacked rows)."""
    codes_h, codes_s = aligned_differences(harmful, safe)
    gram = difference_gram(codebook, codes_h, codes_s)  # (D, D)
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def iteration_singular_values(store, iteration: int) -> list[float] | None:
    """The spectrum of iteration t's aligned (same-seed rewrite) pairs under its parent codebook v(t−1);
    None when the iteration has no manifest or no aligned pairs."""
    from safecb.schemas import PAIR_SCHEMA
    from safecb.stages import token_matrix

    if iteration < 1 or not store.has_manifest(iteration) or (iteration - 1) not in store.codebook_versions():
        return None
    manifest = store.read_manifest(iteration)
    if not manifest.shards.get("pairs"):
        return None
    table = store.read_table(manifest, "pairs", PAIR_SCHEMA, columns=["harmful_tokens", "safe_tokens", "counterpart"])
    aligned = [c == "rewrite" for c in table.column("counterpart").to_pylist()]
    if not any(aligned):
        return None
    width = len(table.column("harmful_tokens")[0])
    keep = torch.tensor(aligned)
    harmful = token_matrix(table.column("harmful_tokens"), width)[keep]
    safe = token_matrix(table.column("safe_tokens"), width)[keep]
    codebook = store.read_codebook(iteration - 1)[0]["codebook"]
    return [round(float(s), 5) for s in difference_singular_values(codebook, harmful, safe)]


@torch.no_grad()
def code_patches(model, codebook: torch.Tensor, codes: list[int], num_tokens: int) -> torch.Tensor:
    """(len(codes), 3, H, W): each code decoded alone, as a grid of num_tokens copies of it."""
    tokens = torch.tensor(codes, dtype=torch.long)[:, None].expand(-1, num_tokens)  # (n, N)
    return model.decode(tokens, codebook).float().cpu()
