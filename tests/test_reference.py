"""What is specific to the reference path (forgetkern.reference): its row chunking, which bounds
its memory, and the reference eigensolver. Its results on every option and shape are checked with
the other backends' against the fp64 oracle in tests/test_tmkl.py (fused-linear: test_linear_tmkl.py)."""
import pytest
import torch

import forgetkern
from forgetkern import reference
from forgetkern._params import TMKLParams, accumulation_dtype

from .helpers import oracle_tmkl, tmkl_inputs


@pytest.mark.parametrize("params", [TMKLParams(direction="reverse", temperature=1.5),
                                    TMKLParams(mask_target=False)], ids=["reverse-T1.5", "full-T1"])
def test_chunking_does_not_change_results(params):
    z, b, y = tmkl_inputs(23, 50, torch.float64, scale=3.0, ignore=(2,), device="cpu")
    whole = reference.tmkl_forward(z, b, y, params)
    tiny = reference.tmkl_forward(z, b, y, params, chunk_bytes=1)  # one row per chunk
    assert reference.chunk_rows(50, torch.float64, 1) == 1
    for a, c in zip(whole, tiny):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    o = oracle_tmkl(z, b, y, direction=params.direction, temperature=params.temperature,
                    mask_target=params.mask_target)
    for a, r in zip(tiny, o):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    coef = torch.randn(23, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    g1 = reference.tmkl_backward(z, b, y, whole[3], *coef, params, torch.empty_like(z))
    g2 = reference.tmkl_backward(z, b, y, whole[3], *coef, params, torch.empty_like(z), chunk_bytes=1)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1, 50, 128256])
def test_chunk_temporaries_fit_the_budget(dtype, v):
    """A chunk's ``rows x V`` temporaries (counted per row in the accumulation dtype) fit the byte
    budget whenever one row does; the default budget is ``REFERENCE_CHUNK_BYTES``."""
    per_row = v * torch.finfo(accumulation_dtype(dtype)).bits // 8 * reference.tmkl._TEMPS_PER_CHUNK
    for budget in (1, per_row - 1, per_row, 3 * per_row + 1, 2**20, None):
        rows = reference.chunk_rows(v, dtype, budget)
        limit = reference.REFERENCE_CHUNK_BYTES if budget is None else budget
        assert rows >= 1
        if per_row <= limit:
            assert rows * per_row <= limit < (rows + 1) * per_row
        else:
            assert rows == 1


def test_chunked_forward_allocates_per_chunk_not_per_batch(monkeypatch):
    """With a budget of one row, the reference never builds a temporary of more than one row."""
    z, b, y = tmkl_inputs(12, 40, torch.float64, ignore=(), device="cpu")
    seen = []
    real = reference.tmkl._shifted

    def spy(x):
        seen.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(reference.tmkl, "_shifted", spy)
    reference.tmkl_forward(z, b, y, TMKLParams(temperature=2.0), chunk_bytes=1)
    assert seen and max(seen) == 1


def test_generalized_eigh_reference():
    n = 6
    a = torch.randn(3, n, n, dtype=torch.float64)
    a = a + a.mT
    m = torch.randn(3, n, n, dtype=torch.float64)
    bm = m @ m.mT + 0.1 * torch.eye(n, dtype=torch.float64)
    w, vecs, status = reference.generalized_eigh(a, bm, eps=1e-3)
    assert (status == 0).all()
    bd = bm + 1e-3 * torch.eye(n, dtype=torch.float64)
    assert (w[:, 1:] >= w[:, :-1]).all()
    torch.testing.assert_close(vecs.mT @ bd @ vecs, torch.eye(n, dtype=torch.float64).expand(3, n, n),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(a @ vecs, bd @ vecs * w[:, None, :], atol=1e-9, rtol=0)
    _, _, status = reference.generalized_eigh(a, -bm)
    assert (status > 0).all()
    with pytest.raises(ValueError, match="not positive definite"):
        forgetkern.generalized_eigh(a, -bm, backend="reference")
