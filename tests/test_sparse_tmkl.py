"""Sparse-base TMKL (a top-k record of the base logits, docs/base_cache.md): every backend against
an independent fp64 implementation of the same coarse-grained math, which is written here from the
full base logits (explicit sets of support and tail tokens, gradients by autograd)."""
import zlib

import pytest
import torch

import forgetkern
from forgetkern import TopKBase, topk_base
from tests.helpers import (OPTION_IDS, OPTION_NAMES, OPTIONS, assert_close_to_ref, backends,
                           naive_tmkl_in_dtype, oracle_tmkl, run_tmkl)

V = 37


def oracle_sparse(z, b, y, k, *, temperature=1.0, direction="forward", mask_target=True,
                  ignore_index=-100, kl_weight=1.0, ce_weight=1.0, dtype=torch.float64):
    """Per-row (loss, ce, kl) in fp64: the KL over the bins {support token} + {tail}, where the
    support is the k largest base logits (target removed when masked, added when not). With
    ``dtype=torch.float32``: the same math as plain fp32 torch would compute it."""
    z, b = z.to(dtype), b.to(dtype).detach()
    n, v = z.shape
    losses, ces, kls = [], [], []
    for i in range(n):
        yi = int(y[i])
        if yi == ignore_index:
            zero = z[i].sum() * 0.0
            losses.append(zero), ces.append(zero), kls.append(zero)
            continue
        top = set(b[i].topk(k).indices.tolist())
        kept = [u for u in range(v) if not (mask_target and u == yi)]
        support = [u for u in kept if u in top or u == yi]
        tail = [u for u in kept if u not in support]
        pos = {u: j for j, u in enumerate(kept)}
        lq = torch.log_softmax(z[i, kept] / temperature, 0)
        lp = torch.log_softmax(b[i, kept] / temperature, 0)
        qs = [lq[pos[u]].exp() for u in support]
        ps = [lp[pos[u]].exp() for u in support]
        if tail:
            qs.append(lq[[pos[u] for u in tail]].exp().sum())
            ps.append(lp[[pos[u] for u in tail]].exp().sum())
        Q, P = torch.stack(qs), torch.stack(ps)
        w, a, o = (P, P, Q) if direction == "forward" else (Q, Q, P)
        on = w > 0  # an empty bin adds nothing (masked before the log: no 0 * inf in the grad)
        one = torch.ones_like(w)
        kl = torch.where(on, w * (torch.where(on, a, one).log() - torch.where(on, o, one).log()),
                         torch.zeros_like(w)).sum()
        ce = torch.logsumexp(z[i], 0) - z[i, yi]
        losses.append(ce_weight * ce + kl_weight * temperature**2 * kl)
        ces.append(ce)
        kls.append(kl)
    return torch.stack(losses), torch.stack(ces), torch.stack(kls)


def _inputs(n=6, v=V, dtype=torch.float64, seed=0, ignore=(1,)):
    """Logits, base logits and labels with the target the base's top token (rows 0, 2: inside any
    top-k) or its last token (row 3: outside), the others random."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    b = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    for r in (0, 2):
        if r < n:
            y[r] = b[r].argmax()
    if n > 3:
        y[3] = b[3].argmin()
    for r in ignore:
        if r < n:
            y[r] = -100
    return z, b, y


def _check(z, b, y, k, backend, **kw):
    rec = topk_base(b, y, k, temperature=kw.get("temperature", 1.0))
    outs, grad, g = run_tmkl(z, rec, y, backend, grad_dtype=torch.float64, **kw)
    zo = z.detach().double().requires_grad_()
    want = oracle_sparse(zo, b, y, k, **kw)
    torch.autograd.backward(list(want), [gi.double() for gi in g])
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    for name, a, e in zip(("loss", "ce", "kl"), outs, want):
        assert_close_to_ref(a, e.detach(), acc, what=name)
    assert_close_to_ref(grad, zo.grad, z.dtype, what="grad")
    return outs, grad


@pytest.mark.parametrize("backend", backends("sparse_tmkl"))
@pytest.mark.parametrize(OPTION_NAMES, OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("k", [1, 5, V - 1])
def test_matches_oracle(backend, direction, mask_target, temperature, k):
    z, b, y = _inputs()
    _check(z, b, y, k, backend, direction=direction, mask_target=mask_target,
           temperature=temperature, kl_weight=0.7, ce_weight=1.3)


@pytest.mark.parametrize("backend", backends("sparse_tmkl"))
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_float32_and_strided_rows(backend, direction):
    z, b, y = _inputs(n=5, v=70, dtype=torch.float32, seed=3)
    wide = torch.randn(5, 75)
    wide[:, 3:73] = z
    _check(wide[:, 3:73], b, y, 9, backend, direction=direction, temperature=2.0)


@pytest.mark.parametrize("backend", backends("sparse_tmkl"))
@pytest.mark.parametrize(OPTION_NAMES, OPTIONS, ids=OPTION_IDS)
def test_full_support_is_the_exact_tmkl(backend, direction, mask_target, temperature):
    """k = V - 1 (and V) leaves at most one token in the tail: the exact (masked) TMKL."""
    z, b, y = _inputs(seed=5)
    kw = dict(direction=direction, mask_target=mask_target, temperature=temperature)
    want = oracle_tmkl(z, b, y, **kw)
    for k in (V - 1, V):
        rec = topk_base(b, y, k, temperature=temperature)
        outs = forgetkern.tmkl_loss(z, rec, y, reduction="none", return_components=True,
                                    backend=backend, **kw)
        for a, e in zip(outs, want):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_target", [True, False])
def test_lower_bound_and_gap(direction, mask_target):
    """exact KL - P_t * 2 max_tail |log p~/q~| <= sparse KL <= exact KL (forward; reverse with Q_t)."""
    z, b, y = _inputs(n=8, v=300, seed=7, ignore=())
    z = b + 0.5 * torch.randn_like(b)  # an adapted model near its base, as in LoRA
    kw = dict(direction=direction, mask_target=mask_target, temperature=1.5)
    exact = oracle_tmkl(z, b, y, **kw)[2]
    for k in (4, 32):
        rec = topk_base(b, y, k, temperature=1.5)
        sparse = forgetkern.tmkl_loss(z, rec, y, reduction="none", return_components=True,
                                      backend="reference", **kw)[2]
        assert (sparse <= exact + 1e-12).all()
        for i in range(len(y)):
            top = set(rec.indices[i].tolist())
            yi = int(y[i])
            kept = [u for u in range(300) if not (mask_target and u == yi)]
            tail = [j for j, u in enumerate(kept) if u not in top and u != yi]
            lp = torch.log_softmax(b[i, kept] / 1.5, 0)[tail]
            lq = torch.log_softmax(z[i, kept] / 1.5, 0)[tail]
            lam = (lp - lq).abs().max()
            mass = (lp if direction == "forward" else lq).exp().sum()
            assert exact[i] - sparse[i] <= 2 * lam * mass + 1e-12
    assert (exact - sparse).max() > 0  # the bound is not vacuous: the tail carries KL


@pytest.mark.parametrize("backend", backends("sparse_tmkl"))
@pytest.mark.parametrize("n", [1, 3])
def test_all_ignored_and_single_row(backend, n):
    z, b, y = _inputs(n=n, ignore=range(n))
    rec = topk_base(b, y, 4)
    x = z.clone().requires_grad_()
    loss = forgetkern.tmkl_loss(x, rec, y, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(z))
    if n == 1:
        z, b, y = _inputs(n=1, ignore=())
        _check(z, b, y, 3, backend, direction="reverse")


@pytest.mark.parametrize("backend", backends("sparse_tmkl"))
def test_inplace_backward(backend):
    z, b, y = _inputs(seed=11)
    rec = topk_base(b, y, 6)
    g = torch.randn(len(y), dtype=torch.float64)
    x = z.clone().requires_grad_()
    forgetkern.tmkl_loss(x, rec, y, reduction="none", backend=backend).backward(g)
    leaf = z.clone().requires_grad_()
    w = leaf * 1.0  # a non-leaf whose storage the backward overwrites
    forgetkern.tmkl_loss(w, rec, y, reduction="none", inplace_backward=True,
                         backend=backend).backward(g)
    torch.testing.assert_close(leaf.grad, x.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", backends("linear_sparse_tmkl"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_linear_form_matches_logits_form(reduction, direction, backend):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    w = torch.randn(V, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (2, 5), generator=g)
    y[0, 1] = -100
    kw = dict(direction=direction, temperature=1.5, kl_weight=0.8, reduction=reduction,
              return_components=True)
    rec = topk_base(b, y, 7, temperature=1.5)
    leaves = [t.clone().requires_grad_() for t in (h, w, bias)]
    outs = forgetkern.linear_tmkl_loss(leaves[0], leaves[1], rec, y, bias=leaves[2], chunk_size=3,
                                       num_items_in_batch=13 if reduction == "mean" else None,
                                       backend=backend, **kw)
    ref_leaves = [t.clone().requires_grad_() for t in (h, w, bias)]
    logits = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
    ref = forgetkern.tmkl_loss(logits, rec, y, backend="reference",
                               num_items_in_batch=13 if reduction == "mean" else None, **kw)
    ups = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in outs]
    torch.autograd.backward(list(outs), ups)
    torch.autograd.backward(list(ref), ups)
    for a, e in zip(outs, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-9, atol=1e-11)
    # the usual loss.backward() of a mean: the forward's precomputed gradients
    if reduction == "mean":
        leaves[0].grad = None
        forgetkern.linear_tmkl_loss(leaves[0], w, rec, y, bias=bias, temperature=1.5,
                                    direction=direction, backend=backend).backward()
        ref_leaves[0].grad = None
        forgetkern.tmkl_loss(ref_leaves[0] @ w.T + bias, rec, y, temperature=1.5,
                             direction=direction).backward()
        torch.testing.assert_close(leaves[0].grad, ref_leaves[0].grad, rtol=1e-9, atol=1e-11)


def test_topk_record_fields():
    z, b, y = _inputs(n=4, ignore=())
    rec = topk_base(b, y, 5, temperature=2.0)
    assert rec.indices.dtype == torch.int32 and rec.values.shape == (4, 5)
    torch.testing.assert_close(rec.values, b.topk(5).values)
    u = (b / 2).scatter(1, y[:, None], float("-inf"))
    torch.testing.assert_close(rec.lse, u.logsumexp(1))
    torch.testing.assert_close(rec.tail_lse, u.scatter(1, rec.indices.long(), float("-inf")).logsumexp(1))
    torch.testing.assert_close(rec.target, b.gather(1, y[:, None]).squeeze(1))


def _bad(rec, **changes):
    return rec._replace(**changes)


@pytest.mark.parametrize("case,match", [
    ("temperature", "recorded at temperature"),
    ("values_shape", "values must have shape"),
    ("indices_dtype", "indices must be an integer"),
    ("indices_range", r"indices must be token ids in \[0, 37\)"),
    ("duplicate", "distinct"),
    ("lse_shape", "lse must have the same shape"),
    ("k_too_large", "1 <= k <= V"),
    ("labels_missing", "labels is None: a record must name the labels"),
    ("labels_dtype", "labels must be an integer"),
    ("labels_other", r"recorded for other labels: base_logits.labels != labels at \d+ row"),
    ("base_weight", "base_weight/base_bias must be None"),
])
def test_errors_name_the_argument(case, match):
    z, b, y = _inputs()
    rec = topk_base(b, y, 4)
    kw = {}
    if case == "temperature":
        rec = _bad(rec, temperature=2.0)
    elif case == "values_shape":
        rec = _bad(rec, values=rec.values[:-1])
    elif case == "indices_dtype":
        rec = _bad(rec, indices=rec.indices.double())
    elif case == "indices_range":
        rec = _bad(rec, indices=rec.indices + V)
    elif case == "duplicate":
        idx = rec.indices.clone()
        idx[2, 1] = idx[2, 0]
        rec = _bad(rec, indices=idx)
    elif case == "lse_shape":
        rec = _bad(rec, lse=rec.lse[:, None])
    elif case == "k_too_large":
        y = y.clamp(max=5)
        rec = TopKBase(*(torch.cat([t, t], 1) if t.dim() == 2 else t for t in rec[:5]), labels=y)
        z = z[:, :6]
    elif case == "labels_missing":
        rec = _bad(rec, labels=None)
    elif case == "labels_dtype":
        rec = _bad(rec, labels=rec.labels.float())
    elif case == "labels_other":  # a record paired with other labels
        y = torch.where(y == -100, y, (y + 1) % V)
    with pytest.raises((ValueError, TypeError), match=match):
        if case == "base_weight":
            h = torch.randn(6, 4, dtype=torch.float64)
            w = torch.randn(V, 4, dtype=torch.float64)
            forgetkern.linear_tmkl_loss(h, w, rec, y, base_weight=w)
        else:
            forgetkern.tmkl_loss(z, rec, y, backend="reference", **kw)


@pytest.mark.parametrize("backend", backends("sparse_tmkl"))
@pytest.mark.parametrize("regime", ["offset", "large", "peaked"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_target", [True, False])
def test_fp32_error_within_four_times_plain_torch(backend, regime, direction, mask_target):
    """Shift invariance and nearly certain rows, as for the dense loss (test_tmkl_contract): with
    every logit offset by 1e3, with |logits| up to 1e3, and where both models put > 1 - 1e-6 on
    the target, the fp32 loss and gradient errors against fp64 stay within 4x plain fp32 torch's
    own on the same sparse math, plus a floor of 8 eps of fp32 rounding."""
    n, v, k = 6, 97, 5
    g = torch.Generator().manual_seed(zlib.crc32(f"{regime}-{direction}-{mask_target}".encode()))
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    b = z + 0.3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    if regime == "offset":
        z, b = z + 1000, b + 1000
    elif regime == "large":
        z = z * 400
        b = z + torch.randn(n, v, generator=g, dtype=torch.float64)
    else:
        z[torch.arange(n), y] = 25.0
        b[torch.arange(n), y] = 24.0
    z32, b32 = z.float(), b.float()
    up = torch.randn(n, generator=g, dtype=torch.float64)
    kw = dict(direction=direction, mask_target=mask_target)
    z64 = z32.double().requires_grad_()
    want = oracle_sparse(z64, b32.double(), y, k, **kw)[0]
    (want * up).sum().backward()
    zp = z32.clone().requires_grad_()
    plain = oracle_sparse(zp, b32, y, k, dtype=torch.float32, **kw)[0]
    (plain * up.float()).sum().backward()
    x = z32.clone().requires_grad_()
    got = forgetkern.tmkl_loss(x, topk_base(b32, y, k), y, reduction="none", backend=backend,
                               **kw)
    (got * up.float()).sum().backward()
    eps = torch.finfo(torch.float32).eps

    def err(a, e):
        return float((a.double() - e).norm())

    err_l, err_g = err(got.detach(), want.detach()), err(x.grad, z64.grad)
    base_l, base_g = err(plain.detach(), want.detach()), err(zp.grad, z64.grad)
    assert err_l <= 4 * base_l + 8 * eps * n**0.5, f"loss error {err_l:.2e} vs torch {base_l:.2e}"
    assert err_g <= 4 * base_g + 8 * eps * float(up.norm()), \
        f"grad error {err_g:.2e} vs torch {base_g:.2e}"


def _linear_inputs(n=10, d=12, dtype=torch.float64, seed=4):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2).to(dtype)
    w = (torch.randn(V, d, generator=g, dtype=torch.float64) / d**0.5 * 3).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, V, (n,), generator=g)
    y[1] = -100
    return h, w, bias, b, y


@pytest.mark.parametrize("backend", backends("linear_sparse_tmkl"))
def test_linear_form_transforms_the_adapted_side(backend):
    """``logit_scale``/``logit_softcap`` transform the adapted logits only: the record holds the
    base logits as they are. Equal to ``tmkl_loss`` on the transformed logits, forward and
    backward (hidden, head, bias)."""
    h, w, bias, b, y = _linear_inputs()
    kw = dict(temperature=1.5, direction="reverse", reduction="none", return_components=True)
    rec = topk_base(b, y, 7, temperature=1.5)
    leaves = [t.clone().requires_grad_() for t in (h, w, bias)]
    outs = forgetkern.linear_tmkl_loss(leaves[0], leaves[1], rec, y, bias=leaves[2], chunk_size=3,
                                       logit_scale=0.7, logit_softcap=6.0, backend=backend, **kw)
    ref_leaves = [t.clone().requires_grad_() for t in (h, w, bias)]
    logits = 6.0 * torch.tanh(0.7 * (ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]) / 6.0)
    ref = forgetkern.tmkl_loss(logits, rec, y, backend="reference", **kw)
    ups = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    torch.autograd.backward(list(outs), ups)
    torch.autograd.backward(list(ref), ups)
    for a, e in zip(outs, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", backends("linear_sparse_tmkl"))
def test_linear_form_from_bf16_at_fp32_precision(backend):
    """From bf16 hidden states and head the chunk's logits are fp32, as plain fp32 torch's on the
    same inputs: with k = V (the exact TMKL) the loss error against fp64 stays within 4x plain fp32
    torch's, and the top-k form's CE equals the dense form's."""
    h, w, bias, b, y = _linear_inputs(dtype=torch.bfloat16)
    rec = topk_base(b.float(), y, V)
    got = forgetkern.linear_tmkl_loss(h, w, rec, y, bias=bias, reduction="none", backend=backend,
                                      return_components=True)
    z64 = h.double() @ w.double().T + bias.double()
    want = oracle_tmkl(z64, b.float().double(), y)
    z32 = h.float() @ w.float().T + bias.float()
    ce32, kl32 = naive_tmkl_in_dtype(z32, b.float(), y)
    assert_close_to_ref(got[0], want[0].detach(), torch.float32, baseline=ce32 + kl32, what="loss")
    assert_close_to_ref(got[1], want[1].detach(), torch.float32, baseline=ce32, what="ce")
