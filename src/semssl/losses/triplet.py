"""SCD's semantic discrimination: the foreground/background triplet loss (SCD paper Eq. 5)."""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from semssl.losses import compute_dtype


class TripletTerms(NamedTuple):
    """``loss`` = L_d of Eq. 5 (scalar); ``fg`` / ``bg`` = the batch means of its two hinge terms (before the
    0.5 factor, whether switched on or not, for logging); ``sims`` = the batch means of the four cosines
    ``(fg1.fg2, fg1.bg2, bg1.fg2, bg1.bg2)``."""

    loss: Tensor
    fg: Tensor
    bg: Tensor
    sims: tuple[Tensor, Tensor, Tensor, Tensor]


def fg_bg_triplet(z1_fg: Tensor, z1_bg: Tensor, z2_fg: Tensor, z2_bg: Tensor, margin: float = 1.0,
                  fg_term: bool = True, bg_term: bool = True, eps: float = 1e-12) -> TripletTerms:
    """SCD's L_d (Eq. 5), with ``f_s`` the cosine similarity::

        L_d = 0.5 * ( max{f_s(z1_fg, z2_bg) - f_s(z1_fg, z2_fg) + alpha, 0}      # "FG": anchor z1_fg
                    + max{f_s(z1_bg, z2_fg) - f_s(z1_bg, z2_bg), 0} )            # "BG": anchor z1_bg

    averaged over the batch. The margin ``alpha`` is on the foreground term **only** (the paper: a strict
    constraint on the foreground pair, a loose one on the background pair). The printed equation's stray double
    "+" is read as one plus (docs/methods/scd.md §Losses).

    Args:
        z1_fg, z1_bg: ``[N, D]`` foreground / background embeddings ``H^s(h^fg)``, ``H^s(h^bg)`` of view 1 (the
            anchors; in semssl the online network's, gradient flows).
        z2_fg, z2_bg: ``[N, D]`` those of view 2 for the same images in the same (crop-major) order (in semssl
            the target network's; not detached here: the caller decides).
        margin: alpha (1.0 in the paper; Fig. 3 varies it over [0, 1.4]).
        fg_term, bg_term: keep the first / second term (Table 3's "FG" and "BG" columns). Decision: a term
            switched off is dropped from the bracket and the 0.5 factor stays, so "FG only" is
            ``0.5 * FG`` (the literal reading of removing a term of Eq. 5).
        eps: lower bound on the norms in the cosine (``F.normalize``).

    Returns:
        :class:`TripletTerms` (``loss`` is 0 with both terms off).
    """
    shapes = {tuple(t.shape) for t in (z1_fg, z1_bg, z2_fg, z2_bg)}
    if len(shapes) != 1 or z1_fg.dim() != 2:
        raise ValueError(f"fg_bg_triplet: the four embeddings must be equal [N, D] shapes, got {sorted(shapes)}")
    dtype = compute_dtype(z1_fg, z1_bg, z2_fg, z2_bg)
    a_fg, a_bg, p_fg, p_bg = (F.normalize(t.to(dtype), dim=1, eps=eps) for t in (z1_fg, z1_bg, z2_fg, z2_bg))
    s_fg_fg = (a_fg * p_fg).sum(1)
    s_fg_bg = (a_fg * p_bg).sum(1)
    s_bg_fg = (a_bg * p_fg).sum(1)
    s_bg_bg = (a_bg * p_bg).sum(1)
    fg = F.relu(s_fg_bg - s_fg_fg + margin).mean()
    bg = F.relu(s_bg_fg - s_bg_bg).mean()
    loss = fg.new_zeros(())
    for term, on in ((fg, fg_term), (bg, bg_term)):
        if on:
            loss = loss + term
    loss = 0.5 * loss
    return TripletTerms(loss, fg, bg, (s_fg_fg.mean(), s_fg_bg.mean(), s_bg_fg.mean(), s_bg_bg.mean()))
