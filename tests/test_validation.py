"""Bad input raises a clear error before any kernel runs."""
import pytest
import torch

import forgetkern

from .helpers import backends, cuda_backend_on_cpu, tmkl_inputs


def _ok(n=4, v=10):
    return tmkl_inputs(n, v, ignore=(), device="cpu")


@pytest.fixture(params=backends("tmkl"))
def backend(request, monkeypatch):
    if request.param == "cuda":
        cuda_backend_on_cpu(monkeypatch)
    return request.param


def test_bad_inputs(backend):
    """Every backend: the one boundary raises before the backend is even chosen."""
    z, b, y = _ok()
    cases = [
        (dict(base_logits=torch.randn(4, 11)), ValueError, "base_logits must have the same shape"),
        (dict(labels=torch.randint(0, 10, (5,))), ValueError, r"labels must have shape \(4,\)"),
        (dict(labels=y.float()), TypeError, "labels must be an integer tensor"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, r"labels must be in \[0, 10\)"),
        (dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, "ignore_index=-100"),
        (dict(direction="backward"), ValueError, "direction must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
        (dict(logits=z.long()), TypeError, "logits must be float16, bfloat16, float32 or float64"),
        (dict(base_logits=b.double()), TypeError, "base_logits dtype torch.float64 does not match"),
        (dict(logits=torch.randn(4, 0), base_logits=torch.randn(4, 0)), ValueError, "V > 0"),
        (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0"),
        (dict(kl_weight=float("nan")), ValueError, "kl_weight must be finite"),
        (dict(labels=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
    ]
    for override, exc, msg in cases:
        kw = dict(logits=z, base_logits=b, labels=y)
        opts = {}
        for k, val in override.items():
            (kw if k in kw else opts)[k] = val
        with pytest.raises(exc, match=msg):
            forgetkern.tmkl_loss(kw["logits"], kw["base_logits"], kw["labels"], backend=backend, **opts)


def test_mismatched_devices():
    z, b, y = _ok()
    meta = torch.randn(4, 10, device="meta")
    with pytest.raises(ValueError, match="base_logits is on meta but logits is on cpu"):
        forgetkern.tmkl_loss(z, meta, y)


def test_ignore_index_accepts_custom_value():
    z, b, y = _ok()
    y[0] = -1
    loss = forgetkern.tmkl_loss(z, b, y, ignore_index=-1, reduction="none")
    assert loss[0].item() == 0.0 and (loss[1:] > 0).all()


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="direction"):
        forgetkern.TMKLLoss(direction="sideways")
    with pytest.raises(ValueError, match="reduction"):
        forgetkern.TMKLLoss(reduction="max")
    mod = forgetkern.TMKLLoss(kl_weight=0.5, temperature=2.0, return_components=True)
    z, b, y = _ok()
    loss, ce, kl = mod(z, b, y)
    expected = forgetkern.tmkl_loss(z, b, y, kl_weight=0.5, temperature=2.0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, ce + 0.5 * 4.0 * kl)
    assert "kl_weight=0.5" in repr(mod)


def _dense_and_topk():
    """The same valid inputs for the dense and the top-k base form of both losses."""
    h, hb, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8)
    z, b, y = _ok()
    return h, hb, w, z, b, y, forgetkern.topk_base(b, y, 3)


LINEAR_BAD = [  # override of (hidden, weight, labels, bias), error type, message pattern
    (dict(bias=torch.randn(10).double()), TypeError,
     r"^bias dtype torch.float64 does not match hidden dtype torch.float32; cast one of them$"),
    (dict(bias=torch.randn(9)), ValueError, r"^bias must have shape \(10,\) \(weight.shape\[0\]\), got \(9,\)$"),
    (dict(weight=torch.randn(10, 8).half()), TypeError,
     r"^weight dtype torch.float16 does not match hidden dtype torch.float32"),
    (dict(weight=torch.randn(10, 7)), ValueError, r"^weight must have D=8 columns"),
    (dict(weight=torch.randn(80)), ValueError, r"^weight must be a \(V, D\) matrix"),
    (dict(hidden=torch.randn(4, 8).long()), TypeError, r"^hidden must be float16"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError,
     r"^labels must have shape \(4,\) \(hidden.shape\[:-1\]\), got \(5,\)$"),
    (dict(labels=torch.zeros(4)), TypeError, r"^labels must be an integer tensor"),
]


@pytest.mark.parametrize("override, exc, pattern", LINEAR_BAD)
def test_linear_dense_and_topk_raise_alike(override, exc, pattern):
    """One validator per concept: the dense and the top-k form of ``linear_tmkl_loss`` reject the
    same bad input with the same exception type and message."""
    h, hb, w, _, _, y, rec = _dense_and_topk()
    kw = dict(hidden=h, weight=w, labels=y, bias=None) | override
    for base in (hb, rec):
        with pytest.raises(exc, match=pattern):
            forgetkern.linear_tmkl_loss(kw["hidden"], kw["weight"], base, kw["labels"],
                                        bias=kw["bias"], backend="reference")


LOGITS_BAD = [  # override of (logits, labels) or an option, error type, message pattern
    (dict(logits=torch.randn(4, 10).long()), TypeError, r"^logits must be float16"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError,
     r"^labels must have shape \(4,\) \(logits.shape\[:-1\]\), got \(5,\)$"),
    (dict(labels=torch.zeros(4)), TypeError, r"^labels must be an integer tensor"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, r"^labels must be in \[0, 10\)"),
    (dict(reduction="avg"), ValueError, r"^reduction must be one of"),
    (dict(num_items_in_batch=0), ValueError, r"^num_items_in_batch must be > 0"),
]


@pytest.mark.parametrize("override, exc, pattern", LOGITS_BAD)
def test_logits_dense_and_topk_raise_alike(override, exc, pattern):
    """The same for ``tmkl_loss``: dense base logits and a top-k record of them."""
    _, _, _, z, b, y, rec = _dense_and_topk()
    kw = dict(logits=z, labels=y) | override
    logits, labels = kw.pop("logits"), kw.pop("labels")
    for base in (b.to(logits.dtype) if logits.is_floating_point() else b, rec):
        with pytest.raises(exc, match=pattern):
            forgetkern.tmkl_loss(logits, base, labels, backend="reference", **kw)
