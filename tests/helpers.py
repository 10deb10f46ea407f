"""Shared test utilities: an independent fp64 TMKL oracle, dtype-aware tolerances, the option grid,
the input makers and the backends of each op (with the CUDA kernels' host emulation standing in for
the device on a machine without a GPU)."""
from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

HALF = (torch.float16, torch.bfloat16)
HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"

# ------------------------------------------------------------------------------------------------
# the option grid every TMKL test file runs: direction x mask_target x temperature (T = 1 takes the
# kernels' shared-normalizer path, T != 1 the separate-CE path)
# ------------------------------------------------------------------------------------------------
DIRECTIONS = ("forward", "reverse")
OPTION_NAMES = "direction,mask_target,temperature"
OPTIONS = list(itertools.product(DIRECTIONS, (True, False), (1.0, 2.0)))
OPTION_IDS = [f"{d}-{'masked' if m else 'full'}-T{t:g}" for d, m, t in OPTIONS]


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------
def backend_skip_reason(op: str, backend: str) -> str | None:
    """Why ``backend`` cannot run ``op`` in this test process (``None``: it can). Without a GPU the
    ``cuda`` backend runs as the host emulation of its kernels when the extension is built."""
    from forgetkern import _backend, _cuda

    if backend == "cuda" and not HAS_GPU:
        return None if _cuda.available() else f"forgetkern._C is not available: {_cuda.load_error()}"
    return _backend.why_unavailable(backend, op, torch.device(DEVICE))


def backends(op: str) -> list:
    """Every backend of ``op`` in the implementation table, as pytest params that skip, with the
    reason, where the backend cannot run here."""
    from forgetkern import _backend

    out = []
    for name in _backend.OP_BACKENDS[op]:
        reason = backend_skip_reason(op, name)
        marks = () if reason is None else pytest.mark.skip(reason=f"{name}: {reason}")
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def cuda_backend_on_cpu(monkeypatch, op: str = "tmkl", *, threads: int = 0) -> None:
    """Make ``backend="cuda"`` run ``op``'s CUDA kernels in host emulation on CPU tensors.

    On a GPU this does nothing (the tensors go to the device). Without one it needs the built
    extension (the calling test skips otherwise), accepts ``("cuda", op, cpu)`` in
    ``_backend.why_unavailable`` and puts the emulation (:func:`forgetkern._cuda_emulated.emulated`, with
    ``threads`` per emulated block, ``0``: the device's launch setting) into the implementation
    table, so the public functions run it through their usual validate -> resolve -> Function path.
    A fused-linear op (``linear_tmkl``) gets the chunked driver over the emulated logits op.
    """
    if HAS_GPU:
        return
    from forgetkern import _backend, _cuda, _cuda_emulated

    if not _cuda.available():
        pytest.skip(f"forgetkern._C is not available: {_cuda.load_error()}")
    rows_op = _backend.CHUNKED.get(op, op)
    emu = _cuda_emulated.emulated(rows_op, threads=threads)
    real = _backend.why_unavailable

    def why_unavailable(backend, op_, device):
        if backend == "cuda" and op_ in (op, rows_op) and device.type == "cpu":
            return None
        return real(backend, op_, device)

    monkeypatch.setattr(_backend, "why_unavailable", why_unavailable)
    fns = {name: getattr(emu, name) for name in _backend.INTERFACES[rows_op]}
    rows = dataclasses.replace(_backend.implementation(rows_op, "cuda"), **fns)
    monkeypatch.setitem(_backend._LOADED, (rows_op, "cuda"), rows)
    if op != rows_op:
        monkeypatch.setitem(_backend._LOADED, (op, "cuda"), _backend.chunked(op, rows))


# ------------------------------------------------------------------------------------------------
# input makers
# ------------------------------------------------------------------------------------------------
def tmkl_inputs(n, v, dtype=torch.float32, *, scale=2.0, ignore=(1,), offsets=None,
                device=DEVICE, generator=None):
    """Random ``(n, v)`` logits and base logits (drawn in fp64, then rounded to ``dtype``) and
    ``(n,)`` labels with the rows in ``ignore`` set to -100.

    ``offsets=(oz, ob)`` gives views with unit column stride that start ``oz`` / ``ob`` elements into
    rows ``v + 5`` wide (non-contiguous rows, misaligned for vector loads when the offset is not a
    multiple of the vector width); ``None`` gives contiguous tensors.
    """
    def draw(offset):
        width = v if offsets is None else v + 5
        x = (torch.randn(n, width, dtype=torch.float64, generator=generator) * scale).to(dtype)
        x = x.to(device)
        return x if offsets is None else x[:, offset:offset + v]

    oz, ob = (0, 0) if offsets is None else offsets
    z, b = draw(oz), draw(ob)
    y = torch.randint(0, v, (n,), generator=generator).to(device)
    for i in ignore:
        if i < n:
            y[i] = -100
    return z, b, y


def linear_tmkl_inputs(shape=(6,), d=19, v=45, dtype=torch.float64, *, bias=False,
                       distinct_base=False, train_weight=True, train_bias=True, ignore=(1,),
                       scale=1.0, device=DEVICE):
    """Fresh random fused-linear inputs (never zeros) as a dict: ``hidden``, ``base_hidden``
    ``shape + (d,)``, ``weight`` ``(v, d)``, ``labels`` ``shape`` (flat positions in ``ignore`` set to
    -100), and with ``bias`` / ``distinct_base`` a ``bias`` ``(v,)``, ``base_weight``, ``base_bias``."""
    g = dict(dtype=torch.float64)
    t = {
        "hidden": (torch.randn(*shape, d, **g) * scale).to(dtype).to(device),
        "base_hidden": (torch.randn(*shape, d, **g) * scale).to(dtype).to(device),
        "weight": (torch.randn(v, d, **g) / d**0.5 * 3).to(dtype).to(device),
        "labels": torch.randint(0, v, shape, device=device),
    }
    flat = t["labels"].view(-1)
    for i in ignore:
        if i < flat.numel():
            flat[i] = -100
    t["weight"].requires_grad_(train_weight)
    if bias:
        t["bias"] = torch.randn(v, **g).to(dtype).to(device).requires_grad_(train_bias)
    if distinct_base:
        t["base_weight"] = (torch.randn(v, d, **g) / d**0.5 * 3).to(dtype).to(device)
        if bias:
            t["base_bias"] = torch.randn(v, **g).to(dtype).to(device)
    return t


# ------------------------------------------------------------------------------------------------
# the oracle and plain torch's own computation
# ------------------------------------------------------------------------------------------------
def oracle_tmkl(z, b, y, *, temperature=1.0, direction="forward", mask_target=True,
                ignore_index=-100, kl_weight=1.0, ce_weight=1.0):
    """Per-row (loss, ce, kl) in float64, written independently of forgetkern.

    Gathers the non-target columns of each row explicitly and normalizes over them; differentiable
    with autograd with respect to ``z``. ``z``/``b``: (N, V); ``y``: (N,).
    """
    z = z.double()
    b = b.double().detach()
    n, v = z.shape
    losses, ces, kls = [], [], []
    for i in range(n):
        yi = int(y[i])
        if yi == ignore_index:
            zero = z[i].sum() * 0.0
            losses.append(zero), ces.append(zero), kls.append(zero)
            continue
        keep = torch.ones(v, dtype=torch.bool)
        if mask_target:
            keep[yi] = False
        idx = torch.nonzero(keep).flatten().to(z.device)
        zs = z[i, idx] / temperature
        bs = b[i, idx] / temperature
        lq = zs - torch.logsumexp(zs, 0)
        lp = bs - torch.logsumexp(bs, 0)
        if direction == "forward":
            w = lp.exp()
            kl = (w * (lp - lq)).where(w > 0, torch.zeros_like(w)).sum()
        else:
            w = lq.exp()
            kl = (w * (lq - lp)).where(w > 0, torch.zeros_like(w)).sum()
        ce = torch.logsumexp(z[i], 0) - z[i, yi]
        losses.append(ce_weight * ce + kl_weight * temperature**2 * kl)
        ces.append(ce)
        kls.append(kl)
    return torch.stack(losses), torch.stack(ces), torch.stack(kls)


def naive_tmkl_in_dtype(z, b, y, *, temperature=1.0, direction="forward", mask_target=True,
                        ignore_index=-100):
    """What plain torch computes in the input dtype itself (the error baseline for half types)."""
    valid = y != ignore_index
    ys = torch.where(valid, y, torch.zeros_like(y))
    ce = torch.nn.functional.cross_entropy(z, ys, reduction="none")
    x, u = z / temperature, b / temperature
    if mask_target:
        hit = torch.nn.functional.one_hot(ys, z.shape[-1]).bool()
        x = x.masked_fill(hit, float("-inf"))
        u = u.masked_fill(hit, float("-inf"))
    lq, lp = x.log_softmax(-1), u.log_softmax(-1)
    if direction == "forward":
        kl = (lp.exp() * (lp - lq)).nan_to_num(0.0).sum(-1)
    else:
        kl = (lq.exp() * (lq - lp)).nan_to_num(0.0).sum(-1)
    return ce.where(valid, 0), kl.where(valid, 0)


def rel_err(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute when ``expected`` is 0)."""
    a = actual.double()
    e = expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_to_ref(actual, expected, dtype, baseline=None, factor=4.0, what="value"):
    """Kernel error vs the fp64 reference must be within ``factor`` times plain torch's own error
    in ``dtype`` (``baseline``), or within the dtype's plain tolerance when no baseline is given
    (a non-finite baseline, where plain torch fails outright, grants nothing beyond that)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    floor = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}[dtype]
    limit = floor
    if baseline is not None:
        base_err = rel_err(baseline, expected)
        if base_err != float("inf"):
            limit = max(floor, factor * base_err)
    assert err <= limit, f"{what}: relative error {err:.3e} exceeds {limit:.3e} ({dtype})"


# ------------------------------------------------------------------------------------------------
# running tmkl_loss and checking it against the oracle
# ------------------------------------------------------------------------------------------------
def run_tmkl(z, b, y, backend, g=None, grad_dtype=torch.float32, **kw):
    """Per-row ``(loss, ce, kl)`` of ``tmkl_loss`` and the gradient for upstream grads ``g``.

    ``g`` defaults to three fresh random row vectors (``grad_dtype``); returns ``(outs, grad, g)``.
    """
    import forgetkern

    x = z.detach().clone().requires_grad_()
    outs = forgetkern.tmkl_loss(x, b, y, reduction="none", return_components=True, backend=backend, **kw)
    if g is None:
        g = [torch.randn(y.shape, dtype=grad_dtype, device=z.device) for _ in range(3)]
    torch.autograd.backward(list(outs), [gi.to(outs[0].dtype) for gi in g])
    return [o.detach() for o in outs], x.grad, g


_NAIVE_OPTIONS = ("temperature", "direction", "mask_target", "ignore_index")


def oracle_tmkl_grad(z, b, y, g, **kw):
    """fp64 oracle ``(loss, ce, kl)`` on CPU of the same (rounded) inputs, and its gradient with
    respect to ``z`` for the upstream gradients ``g`` (one per output)."""
    zo = z.detach().double().cpu().requires_grad_()
    outs = oracle_tmkl(zo, b.detach().double().cpu(), y.cpu(), **kw)
    torch.autograd.backward(list(outs), [gi.double().cpu() for gi in g])
    return [o.detach() for o in outs], zo.grad


def naive_tmkl_grad(z, b, y, g, *, kl_weight=1.0, ce_weight=1.0, temperature=1.0, **kw):
    """Plain torch in ``z``'s dtype (the error baseline): ``(loss, ce, kl)`` and the gradient."""
    zn = z.detach().clone().requires_grad_()
    ce, kl = naive_tmkl_in_dtype(zn, b.detach(), y, temperature=temperature,
                                 **{k: v for k, v in kw.items() if k in _NAIVE_OPTIONS})
    loss = ce_weight * ce + kl_weight * temperature**2 * kl
    outs = (loss, ce, kl)
    torch.autograd.backward(list(outs), [gi.to(z.dtype) for gi in g])
    return [o.detach().cpu() for o in outs], zn.grad.cpu()


def assert_tmkl_matches(outs, grad, want, want_grad, dtype, baseline=None, baseline_grad=None,
                        what=""):
    """``outs = (loss, ce, kl)`` and ``grad`` against the fp64 oracle's ``want`` / ``want_grad``.

    The per-row outputs accumulate in fp32 (fp64 for fp64 inputs), so they are held to that dtype's
    tolerance, or ``4x`` plain torch's own error (``baseline``) where that is larger; the gradient is
    held to ``4x`` plain torch's error in ``dtype`` (``baseline_grad``), and a 16-bit gradient to
    ``1.5x`` the error of rounding the exact gradient to ``dtype``.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, e, base in zip(("loss", "ce", "kl"), outs, want, baseline or (None,) * 3):
        assert a.dtype == acc, f"{what}{name}: dtype {a.dtype}, expected {acc}"
        assert_close_to_ref(a.cpu(), e, acc, baseline=None if dtype in HALF else base,
                            what=f"{what}{name}")
    assert grad.dtype == dtype, f"{what}grad: dtype {grad.dtype}, expected {dtype}"
    if dtype in HALF:
        assert_close_to_ref(grad.cpu(), want_grad, dtype, baseline=want_grad.to(dtype), factor=1.5,
                            what=f"{what}grad")
    else:
        assert_close_to_ref(grad.cpu(), want_grad, dtype, baseline=baseline_grad, what=f"{what}grad")


def check_tmkl(z, b, y, backend, g=None, *, what="", **kw):
    """Run ``tmkl_loss`` (per row, all three outputs, random upstream gradients ``g`` unless given)
    and check outputs and gradient against the fp64 oracle, within a small multiple of plain
    torch's own error in the input dtype. Returns ``(outs, grad, g)``."""
    outs, grad, g = run_tmkl(z, b, y, backend, g=g, **kw)
    want, want_grad = oracle_tmkl_grad(z, b, y, g, **kw)
    base, base_grad = naive_tmkl_grad(z, b, y, g, **kw)
    assert_tmkl_matches(outs, grad, want, want_grad, z.dtype, base, base_grad, what=what)
    return outs, grad, g


def aot_compile_env(tmp_path) -> dict:
    """Environment of a subprocess that compiles Triton kernels for a real GPU target (no
    interpreter, a fresh cache under ``tmp_path``, none left behind); skips the calling test when
    Triton's NVIDIA backend is not installed."""
    from triton.backends import backends as triton_backends

    if "nvidia" not in triton_backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def tiny_tokenizer(vocab_size: int):
    """A word-level HF fast tokenizer over ``<pad> <eos> w2 ... w{vocab_size-1}`` (no download)."""
    import tokenizers
    import transformers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>")


def tiny_texts(n: int, vocab_size: int, seed: int = 0, lengths=(5, 12)) -> list:
    """``n`` random word sequences of the :func:`tiny_tokenizer` vocabulary, lengths varying."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        words = torch.randint(2, vocab_size, (length,), generator=g).tolist()
        out.append(" ".join(f"w{i}" for i in words))
    return out


# ------------------------------------------------------------------------------------------------
# a tiny Hugging Face Llama (transformers imported when called: not every test file needs it)
# ------------------------------------------------------------------------------------------------
def tiny_llama(vocab_size: int, seed: int = 0, **config):
    """A randomly initialized 2-layer ``LlamaForCausalLM`` (hidden 32, 4 heads, 2 KV heads), seeded
    by ``seed``; ``config`` overrides or adds ``LlamaConfig`` fields (e.g. token ids)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{"vocab_size": vocab_size, "hidden_size": 32,
                                      "intermediate_size": 48, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "max_position_embeddings": 64, **config})
    return transformers.LlamaForCausalLM(cfg)

