"""Per-row statistics of a part of the vocabulary, and the one merge of such parts into whole rows.

A row's vocabulary may be cut into parts: the vocabulary splits of one row in the Triton forward
(several programs per row), or the vocabulary shards of a vocab-parallel group (one per rank,
:mod:`forgetkern.distributed`). Each part is summarized by a partial record
(:data:`forgetkern._params.PART_* <forgetkern._params.PART_M_Z>` columns): the maxima and log-sums
of the normalizers apart, the KL accumulator as an expectation under the part's own weight
distribution of offsets to the part's maxima, and the target logit where the part holds it
(docs/math.md, "Vocab-parallel form"). :func:`merge_partials` merges the parts of a row, the
parts along one tensor dimension and, optionally, further parts held by other processes through
two all-reduces; :func:`stats_to_part` forms a part's record from any backend's per-row statistics
of that part (``forgetkern._params.STAT_*``).

Plain torch, no Triton: the kernels' host code (``ops/``) and the vocab-parallel form share it.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._params import (NUM_PART, PART_KL, PART_LS_B, PART_LS_CE, PART_LS_Z, PART_M_B, PART_M_CE,
                      PART_M_Z, PART_ZY, STAT_KL, STAT_LS_B, STAT_LS_CE, STAT_LS_Z, STAT_M_B,
                      STAT_M_CE, STAT_M_Z, TMKLParams, row_outputs, with_target)

NEG_INF = float("-inf")
#: ``all_reduce(tensor, op)`` with ``op`` ``"max"`` or ``"sum"``, in place, over the processes that
#: hold the other parts of the same rows (:func:`merge_partials`).
AllReduce = Callable[[torch.Tensor, str], None]


def raw_max(m: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """A stored max as a reduction must see it: ``-inf`` where the part has no mass (``ls = -inf``;
    the stored max of an empty part is 0)."""
    return torch.where(ls == NEG_INF, torch.full_like(m, NEG_INF), m)


def stats_to_part(stats: torch.Tensor, z_y: torch.Tensor, params: TMKLParams) -> torch.Tensor:
    """The ``(N, NUM_PART)`` partial record of a part of the vocabulary from a TMKL forward's
    ``(N, NUM_STATS)`` statistics over that part's columns alone (any backend) and the target
    logits ``z_y`` (0 on rows whose target lies in another part).

    The statistics hold the part's KL, ``KL = E_w[(a - m_a) - (o - m_o)] - ls_w + ls_o``; the record
    holds the expectation ``E_w`` (0 where the part has no weight mass, ``inf`` where it has weight
    mass the other distribution lacks, as its KL)."""
    m_z, ls_z, m_b, ls_b = (stats[:, i] for i in (STAT_M_Z, STAT_LS_Z, STAT_M_B, STAT_LS_B))
    ls_w, ls_o = (ls_b, ls_z) if params.forward_kl else (ls_z, ls_b)
    expect = stats[:, STAT_KL] + ls_w - ls_o
    expect = torch.where(ls_w == NEG_INF, torch.zeros_like(expect), expect)
    if params.separate_ce:
        m_c, ls_c = stats[:, STAT_M_CE], stats[:, STAT_LS_CE]
    else:  # the CE normalizer follows from the kept columns' (and the target logit)
        m_c, ls_c = m_z, ls_z
    part = torch.empty(stats.shape[0], NUM_PART, dtype=stats.dtype, device=stats.device)
    for col, value in ((PART_M_Z, m_z), (PART_LS_Z, ls_z), (PART_M_B, m_b), (PART_LS_B, ls_b),
                       (PART_KL, expect), (PART_M_CE, m_c), (PART_LS_CE, ls_c),
                       (PART_ZY, z_y.to(stats.dtype))):
        part[:, col] = value
    return part


def merge_partials(part: torch.Tensor, labels: torch.Tensor, params: TMKLParams,
                   all_reduce: AllReduce | None = None):
    """Merge ``(N, parts, NUM_PART)`` partial records into per-row ``(loss, ce, kl, stats)``.

    1. the row maxima of ``z/T``, ``b/T`` and (``T != 1``) ``z``: the largest of the parts' maxima;
    2. each part's sums moved to the row maxima, and its KL expectation moved likewise (offsets
       shift by the change of the maxima) and weighted by its moved weight sum, then all summed
       with the target logits (one part holds the target, the others add 0);
    3. the row's log-sums, ``KL = E_w[(a - M_a) - (o - M_o)] - LS_w + LS_o`` and
       ``CE = (m_ce - z_y) + ls_ce``, the max and the log-sum of every normalizer apart.

    ``all_reduce``: when given, the rows have further parts in other processes; the maxima
    (2 or 3 per row) are all-reduced with ``"max"`` after step 1, the sums (4 or 5 per row) with
    ``"sum"`` after step 2, and every process returns the same rows (docs/math.md,
    "Vocab-parallel form"). ``labels``: the rows' labels against ``params.ignore_index``.
    """
    p = part.unbind(-1)
    pairs = [(p[PART_M_Z], p[PART_LS_Z]), (p[PART_M_B], p[PART_LS_B])]
    if params.separate_ce:
        pairs.append((p[PART_M_CE], p[PART_LS_CE]))
    top = torch.stack([raw_max(m, ls).amax(dim=1) for m, ls in pairs])
    if all_reduce is not None:
        all_reduce(top, "max")
    top = top.masked_fill(top == NEG_INF, 0.0)
    moved = [torch.where(ls == NEG_INF, torch.zeros_like(ls), ((m - t[:, None]) + ls).exp())
             for (m, ls), t in zip(pairs, top)]
    dz = p[PART_M_Z] - top[0][:, None]
    db = p[PART_M_B] - top[1][:, None]
    s_w, shift = (moved[1], db - dz) if params.forward_kl else (moved[0], dz - db)
    acc = torch.where(s_w > 0, s_w * (p[PART_KL] + shift), torch.zeros_like(s_w))
    sums = torch.stack([*(s.sum(dim=1) for s in moved), acc.sum(dim=1), p[PART_ZY].sum(dim=1)])
    if all_reduce is not None:
        all_reduce(sums, "sum")
    ls_z, ls_b = sums[0].log(), sums[1].log()
    acc, z_y = sums[-2], sums[-1]
    m_z, m_b = top[0], top[1]
    s_w, ls_w, ls_o = (sums[1], ls_b, ls_z) if params.forward_kl else (sums[0], ls_z, ls_b)
    kl = acc / s_w - ls_w + ls_o
    # no weight mass: KL 0; weight mass where the other distribution has none: infinite
    kl = torch.where(ls_o == NEG_INF, torch.full_like(kl, float("inf")), kl)
    kl = torch.where(ls_w == NEG_INF, torch.zeros_like(kl), kl)
    if params.separate_ce:
        m_c, ls_c = top[2], sums[2].log()
    elif params.mask_target:
        m_c, ls_c = with_target(m_z, ls_z, z_y)
    else:
        m_c, ls_c = m_z, ls_z
    ce = (m_c - z_y) + ls_c
    valid = labels.long() != params.ignore_index
    stats = torch.stack([m_z, ls_z, m_b, ls_b, m_c, ls_c, kl], dim=1)
    return row_outputs(ce, kl, stats, valid, params)
