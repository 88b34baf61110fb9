"""How the Fastfood "blocks" and "pow2" layouts cut a segment (one projected tensor) into pieces.

Part of P's definition (`idlab.subspace.fastfood.BlockFastfoodProjection`): each piece of D_p rows is a
stack of q Fastfood blocks of n = next_pow2(D_p) rows, so a piece that is not a power of two transforms
padding. "blocks" cuts a segment into pieces of ``block_size`` rows and one shorter last piece; "pow2"
also cuts that last piece into powers of two wherever this transforms fewer coordinates.
"""

from __future__ import annotations

from idlab.subspace.base import next_pow2


def piece_cost(length: int, d: int) -> int:
    """Coordinates a piece of ``length`` rows transforms for theta_d of length d: q blocks of n = next_pow2(length)
    (q = ceil(d / c), c = min(n, next_pow2(d)): a piece shorter than theta_d reads it in chunks)."""
    n = next_pow2(length)
    return -(-d // min(n, next_pow2(d))) * n


def cut_segment(length: int, block_size: int, d: int, pow2: bool = False) -> list[tuple[int, int]]:
    """The pieces (start, length) of one segment, in order: part of P's definition.

    Layout "blocks": pieces of ``block_size`` rows and a last, shorter one (padded to a power of two
    inside its block). Layout "pow2": the same, but a last piece that is not a power of two is cut
    into its largest power of two and the rest (again and again) as long as that, with the rest cut the
    same way at its best, costs fewer transformed coordinates (`piece_cost`): a tensor of 147,456 = 2^17 + 2^14 entries becomes two
    exact pieces (147,456 coordinates) instead of one padded to 262,144. Small remainders, whose
    blocks cost about d anyway, stay one padded piece.
    """
    def best(ln: int) -> int:  # the least cost of ``ln`` rows under the rule (cut or not, recursively)
        if not ln & (ln - 1):
            return piece_cost(ln, d)
        top = 1 << (ln.bit_length() - 1)
        return min(piece_cost(ln, d), piece_cost(top, d) + best(ln - top))

    out: list[tuple[int, int]] = []
    start = 0
    while start < length:
        ln = min(block_size, length - start)
        if pow2 and ln & (ln - 1):
            top = 1 << (ln.bit_length() - 1)
            if piece_cost(top, d) + best(ln - top) < piece_cost(ln, d):
                ln = top
        out.append((start, ln))
        start += ln
    return out


__all__ = ["cut_segment", "piece_cost"]
