"""FoLoRA: proxy sampling, activation statistics, gates and the gated Adam optimizer."""
import copy
import io

import pytest
import torch
from torch import nn

from forgetkern import _backend
from forgetkern._params import EIGH_MAX_N, triton_interpret
from forgetkern.lora import disable_adapters, inject_lora
from forgetkern.lora.discovery import lora_modules
from forgetkern.optim import ActivationStats, FoLoRA, calibrate, sample_proxy_data
from forgetkern.optim.gating import gate_values

HAS_TRITON_RUN = _backend.triton_installed() and (torch.cuda.is_available() or triton_interpret())


def _step_device(backend):
    """Where a backend's tensors live: the Triton step runs on a GPU, or on the CPU interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


STEP_BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON_RUN, reason="Triton needs a GPU or TRITON_INTERPRET=1"))]


# ---- tiny models ------------------------------------------------------------------------------
class Toy(nn.Module):
    """Embedding, q/k/v reading the same input, o reading another, a head: ids -> logits."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, vocab)

    def mixed(self, h):
        return torch.tanh(self.q(h) + self.k(h) * self.v(h))

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.o(self.mixed(self.emb(input_ids))))


def lora_toy(seed=0):
    torch.manual_seed(seed)
    model = inject_lora(Toy(), ["q", "k", "v", "o"], rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the function
    return model


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


# ---- sample_proxy_data ------------------------------------------------------------------------
class ConstLogits(nn.Module):
    def __init__(self, z):
        super().__init__()
        self.z = nn.Parameter(z)

    def forward(self, ids):
        return self.z.expand(ids.shape[0], ids.shape[1], -1)


class Bigram(nn.Module):
    def __init__(self, vocab=9, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.lin(self.emb(ids))


def _cat(batches):
    return torch.cat(batches)


def test_sample_proxy_deterministic_and_length():
    torch.manual_seed(0)
    model = Bigram()
    kw = dict(n_samples=5, length=7, prompts=[[3], [4, 5]], batch_size=2, progress=False)
    a = sample_proxy_data(model, seed=1, **kw)
    b = sample_proxy_data(model, seed=1, **kw)
    c = sample_proxy_data(model, seed=2, **kw)
    assert all(t.dtype == torch.long and t.shape[1] == 7 for t in a)
    assert torch.equal(_cat(a), _cat(b)) and not torch.equal(_cat(a), _cat(c))
    rows = _cat(a)
    assert rows.shape == (5, 7)
    # sample i uses prompt i % P, kept as the sequence's prefix
    assert rows[0, 0] == 3 and rows[2, 0] == 3 and rows[1, :2].tolist() == [4, 5]


def test_sample_proxy_temperature_and_top_p():
    z = torch.tensor([0.0, 1.0, 2.0, 3.0])
    model = ConstLogits(z)
    for temp in (0.5, 2.0):
        toks = _cat(sample_proxy_data(model, n_samples=64, length=33, temperature=temp, prompts=[[0]],
                                      batch_size=64, progress=False))[:, 1:]
        freq = torch.bincount(toks.flatten(), minlength=4).float() / toks.numel()
        expect = torch.softmax(z / temp, -1)
        assert float((freq - expect).abs().max()) < 0.05, (temp, freq, expect)
    # greedy
    toks = _cat(sample_proxy_data(model, n_samples=2, length=5, temperature=0.0, prompts=[[0]], progress=False))
    assert bool((toks[:, 1:] == 3).all())
    # nucleus: softmax(z) = [.03, .09, .24, .64]: top_p=0.5 keeps only token 3
    toks = _cat(sample_proxy_data(model, n_samples=4, length=6, top_p=0.5, prompts=[[0]], progress=False))
    assert bool((toks[:, 1:] == 3).all())


def test_sample_proxy_disables_adapters():
    torch.manual_seed(0)
    base = Bigram()
    adapted = inject_lora(copy.deepcopy(base), ["lin"], rank=2, alpha=2.0)
    with torch.no_grad():
        adapted.lin.lora_B.normal_()
    ids = torch.tensor([[1, 2, 3]])
    assert not torch.allclose(adapted(ids), base(ids))
    kw = dict(n_samples=3, length=6, prompts=[[1]], seed=3, progress=False)
    assert torch.equal(_cat(sample_proxy_data(adapted, **kw)), _cat(sample_proxy_data(base, **kw)))
    assert adapted.lin.adapters_enabled


def test_sample_proxy_hf_generate_matches_plain_loop():
    model = tiny_llama()
    kw = dict(n_samples=3, length=6, seed=0, batch_size=2, progress=False)
    a = sample_proxy_data(model, **kw)
    b = sample_proxy_data(model, **kw)
    loop = sample_proxy_data(model, use_generate=False, **kw)
    rows = _cat(a)
    assert rows.shape == (3, 6) and bool((rows[:, 0] == 1).all())  # BOS seed from the config
    assert torch.equal(rows, _cat(b))
    assert torch.equal(rows, _cat(loop))  # same distribution, same draws: cache or no cache


def test_sample_proxy_batches_prompts_of_equal_length_together():
    torch.manual_seed(0)
    model = Bigram()
    batch_rows = []
    model.register_forward_pre_hook(lambda m, args: batch_rows.append(args[0].shape[0]))
    out = sample_proxy_data(model, n_samples=6, length=5, prompts=[[1], [2, 3]], batch_size=4,
                            seed=0, progress=False)
    assert [b.shape for b in out] == [(4, 5), (2, 5)]  # batch_size rows each, in sample order
    rows = _cat(out)
    assert rows[0::2, 0].eq(1).all() and rows[1::2, :2].eq(torch.tensor([2, 3])).all()
    assert set(batch_rows) == {3}  # the 3 short-prompt samples together, then the 3 long ones


def test_sample_proxy_runs_past_the_end_of_sequence_token():
    """An HF model whose generation config names an EOS token still yields full-length samples
    (generate() would stop there), and the draws equal the plain loop's."""
    model = tiny_llama()
    eos = 5
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    kw = dict(n_samples=8, length=40, seed=1, batch_size=8, progress=False)
    rows = _cat(sample_proxy_data(model, **kw))
    assert rows.shape == (8, 40)
    assert bool((rows[:, 1:-1] == eos).any()), "no EOS drawn: the test would not test anything"
    assert torch.equal(rows, _cat(sample_proxy_data(model, use_generate=False, **kw)))


def test_progress_bars(capsys):
    model = lora_toy()
    proxy = sample_proxy_data(model, n_samples=3, length=4, prompts=[[1]], batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "proxy samples" in err and "3/3" in err
    calibrate(model, proxy, proxy, progress=True)
    err = capsys.readouterr().err
    assert "proxy statistics" in err and "task statistics" in err and "2/2" in err
    sample_proxy_data(model, n_samples=3, length=4, prompts=[[1]], progress=False)
    calibrate(model, proxy, proxy, progress=False)
    assert capsys.readouterr().err == ""


def test_sample_proxy_errors():
    model = Bigram()
    with pytest.raises(ValueError, match="length"):
        sample_proxy_data(model, n_samples=1, length=2, prompts=[[1, 2]], progress=False)
    with pytest.raises(ValueError, match="bos_token_id"):
        sample_proxy_data(model, n_samples=1, length=4, progress=False)
    with pytest.raises(ValueError, match="top_p"):
        sample_proxy_data(model, n_samples=1, length=4, prompts=[[1]], top_p=0.0, progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        sample_proxy_data(model, n_samples=0, length=4, prompts=[[1]], progress=False)


# ---- ActivationStats / calibrate --------------------------------------------------------------
def test_activation_stats_matches_hand_xtx_with_padding_and_shared_inputs():
    model = lora_toy()
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, :2] = 0
    with ActivationStats(model, dtype=torch.float64) as st:
        with torch.no_grad():
            model(ids, attention_mask=mask)
            model(ids[:1])  # no mask: every token
    keep = mask.bool()
    with torch.no_grad():
        h = model.emb(ids)
        mixed = model.mixed(h)
    xs = {"q": [h[keep], h[0]], "o": [mixed[keep], mixed[0]]}
    cov = st.covariances()
    sums = st.sums()
    for layer, parts in xs.items():
        X = torch.cat(parts).double()
        xtx, count = sums[layer]
        assert count == X.shape[0]
        torch.testing.assert_close(xtx, X.T @ X, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cov[layer], X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)
    # q, k, v read the same tensor: one accumulator, one covariance object
    assert cov["q"] is cov["k"] is cov["v"] and cov["o"] is not cov["q"]
    assert sorted(map(sorted, st.groups())) == [["k", "q", "v"], ["o"]]
    assert st.memory_bytes()["q"] == 6 * 6 * 8 and st.total_memory_bytes() == 2 * 6 * 6 * 8
    # the hooks are gone after the block
    with torch.no_grad():
        model(ids)
    assert st.sums()["q"][1] == sums["q"][1]


def test_activation_stats_explicit_modules_and_set_mask():
    model = lora_toy()
    ids = torch.randint(0, 11, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with ActivationStats(model, modules=["o"], share_inputs=False, dtype=torch.float64) as st:
        st.set_mask(mask)
        with torch.no_grad():
            model(ids)
    with torch.no_grad():
        X = model.mixed(model.emb(ids))[mask.bool()].double()
    assert list(st.sums()) == ["o"]
    torch.testing.assert_close(st.covariances()["o"], X.T @ X / 6)
    with pytest.raises(ValueError, match="not a submodule"):
        ActivationStats(model, modules=["nope"])
    with pytest.raises(ValueError, match="no LoRA-adapted"):
        ActivationStats(Toy())


def test_calibrate_proxy_pass_runs_the_base_model():
    model = lora_toy()
    proxy = [torch.randint(0, 11, (2, 5)) for _ in range(2)]
    task = [{"input_ids": torch.randint(0, 11, (2, 4)), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.zeros(2, 4, dtype=torch.long)}]
    stats = calibrate(model, proxy, task, dtype=torch.float64, progress=False)
    assert sorted(stats) == ["k", "o", "q", "v"]
    with torch.no_grad(), disable_adapters(model):
        X = torch.cat([model.mixed(model.emb(b)).reshape(-1, 6) for b in proxy]).double()
    torch.testing.assert_close(stats["o"][0], X.T @ X / X.shape[0])
    with torch.no_grad():
        Xt = model.mixed(model.emb(task[0]["input_ids"])).reshape(-1, 6).double()
    torch.testing.assert_close(stats["o"][1], Xt.T @ Xt / Xt.shape[0])
    assert stats["q"][0] is stats["v"][0]
    assert model.training  # restored


# ---- gates ------------------------------------------------------------------------------------
def test_gate_values():
    lam = torch.tensor([0.0, 0.5, 1.0, 4.0])
    torch.testing.assert_close(gate_values(lam, "soft", 1.0), lam / (lam + 1))
    torch.testing.assert_close(gate_values(lam, "sigmoid", 1.0, sharpness=1.0), lam / (lam + 1))
    torch.testing.assert_close(gate_values(lam, "sigmoid", 0.5, sharpness=4.0), lam**4 / (lam**4 + 0.5**4))
    assert gate_values(lam, "hard", 1.0).tolist() == [0, 0, 1, 1]
    assert gate_values(lam, "topk", 0.5).tolist() == [0, 0, 1, 1]
    # low-rank: the 2 stored ratios are the smallest of 8; keep the top 75% = 6 -> both closed
    assert gate_values(lam[:2], "topk", 0.75, dim=8).tolist() == [0, 0]
    assert gate_values(lam, "none", 1.0).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="gate must be one of"):
        gate_values(lam, "bogus", 1.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        gate_values(lam, "topk", 2.0)


# ---- the optimizer ----------------------------------------------------------------------------
def _run(params, make_opt, steps, seed=1, skip=None):
    gen = torch.Generator().manual_seed(seed)
    opt = make_opt(params)
    for t in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            p.grad = None if skip == (t, i) else g.to(device=p.device, dtype=p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_equals_adamw_exactly_with_equal_statistics_and_open_gates(backend):
    torch.manual_seed(0)
    init = [torch.randn(3, 5), torch.randn(2, 6), torch.randn(4, 3), torch.randn(7)]
    X = torch.randn(40, 6)
    S = X.T @ X  # arbitrary equal statistics (low-rank mode keeps AdamW's coordinates)
    opts = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)

    ref = [p.clone().requires_grad_() for p in init]
    _run(ref, lambda ps: torch.optim.AdamW(ps, foreach=False, **opts), 6, skip=(2, 1))

    def make(ps):
        dense = FoLoRA([ps[0], ps[2], ps[3]], gate="none", damping=0.0, backend=backend, **opts)
        dense.add_param_group({"params": [ps[1]], "basis": 2})
        # equal statistics; with damping 0 and the identity the spectral basis is exactly I
        dense.set_statistics(ps[0], 2 * torch.eye(5), 2 * torch.eye(5))
        dense.set_statistics(ps[1], S, S)
        return dense

    got = [p.clone().to(_step_device(backend)).requires_grad_() for p in init]
    opt = _run(got, make, 6, skip=(2, 1))
    assert opt.state[got[0]]["mode"] == "dense" and opt.state[got[1]]["mode"] == "lowrank"
    for a, b in zip(ref, [p.detach().cpu() for p in got]):
        if backend == "reference":  # the same torch operations as AdamW: bit for bit
            assert torch.equal(a, b)
        else:  # the fused kernel: equal up to rounding order (FMA contraction, scalar division)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _penalized_setup(basis, basis_norm="proxy", gate="soft"):
    torch.manual_seed(0)
    d = 6
    proxy = torch.eye(d)
    proxy[0, 0] = 100.0  # direction e0 carries a large proxy penalty
    task = torch.eye(d)
    return d, proxy, task, dict(lr=1e-2, gate=gate, tau=1.0, basis=basis, basis_norm=basis_norm)


@pytest.mark.parametrize("basis,basis_norm", [("dense", "proxy"), ("dense", "unit"), (1, "proxy")])
def test_penalized_direction_moves_less(basis, basis_norm):
    d, proxy, task, opts = _penalized_setup(basis, basis_norm)
    A0 = torch.randn(4, d)

    def moved(make):
        A = A0.clone().requires_grad_()
        _run([A], make, 20)
        delta = (A.detach() - A0).abs()
        return float(delta[:, 0].mean() / delta[:, 1:].mean())

    def folora(ps):
        opt = FoLoRA(ps, backend="reference", **opts)
        opt.set_statistics(ps[0], proxy, task)
        return opt

    ratio_folora = moved(folora)
    ratio_adamw = moved(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0))
    assert ratio_folora < 0.25, ratio_folora
    assert 0.5 < ratio_adamw < 2.0, ratio_adamw


def _lora_params(seed=0, pairs=3, r=2, d_in=5, d_out=4, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(pairs):
        A = torch.randn(r, d_in, generator=gen).to(device).requires_grad_()
        B = torch.randn(d_out, r, generator=gen).to(device).requires_grad_()
        out += [A, B]
    return out


def _stats(d, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(50, d, generator=gen) * torch.linspace(0.2, 3.0, d)
    y = torch.randn(50, d, generator=gen)
    return x.T @ x / 50, y.T @ y / 50


def test_pairs_refresh_in_one_batched_call(monkeypatch):
    import forgetkern.functional as functional

    params = _lora_params()
    opt = FoLoRA(params, lr=1e-2, refresh_every=3, eigh_backend="reference", backend="reference")
    for i in range(0, 6, 2):
        proxy, task = _stats(5, i)
        opt.set_statistics(params[i], proxy, task)
        opt.pair(params[i + 1], params[i])
    calls = []
    real = functional.generalized_eigh

    def counting(A, B, **kw):
        calls.append(A.shape)
        return real(A, B, **kw)

    monkeypatch.setattr(functional, "generalized_eigh", counting)
    gen = torch.Generator().manual_seed(0)
    for t in range(7):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        A_before = params[0].detach().clone()  # the refresh of a step sees A before its update
        opt.step()
        assert not torch.equal(A_before, params[0])
    assert calls == [(3, 2, 2)] * 3  # steps 1, 4, 7: all three pairs at once
    # the B basis is (A Σp Aᵀ + damping I)-orthonormal for the A of the last refresh (step 7)
    B = params[1]
    st = opt.state[B]
    assert st["mode"] == "pair" and st["gate"].shape == (2,)
    assert bool(((st["gate"] > 0) & (st["gate"] < 1)).all())
    proxy, task = _stats(5, 0)
    a = A_before.double()
    P, T = a @ proxy.double() @ a.T, a @ task.double() @ a.T
    P = P * 2 / P.trace() + 1e-3 * torch.eye(2, dtype=torch.float64)  # trace-normalized, damped
    T = T * 2 / T.trace()
    V, lam = st["V"].double(), st["lam"].double()
    torch.testing.assert_close(V.T @ P @ V, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(T @ V, P @ V * lam, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_state_dict_round_trip_continues_identically(backend):
    opts = dict(lr=1e-2, weight_decay=0.05, refresh_every=2, backend=backend,
                eigh_backend="triton" if backend == "triton" else "reference")

    def build(params):
        opt = FoLoRA(params[:4], **opts)
        opt.add_param_group({"params": params[4:6], "basis": 2, "gate": "topk", "tau": 0.5})
        opt.add_param_group({"params": params[6:]})
        return opt

    def wire(opt, params):
        for i in (0, 2):
            proxy, task = _stats(5, i)
            opt.set_statistics(params[i], proxy, task)
            opt.pair(params[i + 1], params[i])
        opt.set_statistics(params[4], *_stats(5, 9))  # low-rank A, its B paired through sketches
        opt.pair(params[5], params[4])
        return opt

    gen = torch.Generator().manual_seed(3)
    dev = _step_device(backend)
    params = _lora_params(pairs=3, device=dev) + [torch.randn(7, dtype=torch.bfloat16, device=dev).requires_grad_()]
    grads = [[torch.randn(p.shape, generator=gen).to(device=dev, dtype=p.dtype) for p in params] for _ in range(6)]
    opt = wire(build(params), params)

    def steps(opt, params, rng):
        for t in rng:
            for p, g in zip(params, grads[t]):
                p.grad = g.clone()
            opt.step()

    steps(opt, params, range(3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    snapshot = [p.detach().clone() for p in params]
    steps(opt, params, range(3, 6))

    resumed = [s.clone().requires_grad_() for s in snapshot]
    opt2 = build(resumed)  # no statistics given: everything comes from the state dict
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert opt2.state[resumed[6]]["exp_avg"].dtype == torch.float32
    steps(opt2, resumed, range(3, 6))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_nonfinite_gradient_skips_the_step_and_leaves_the_state_untouched(backend):
    """The policy, the same on every step backend: a NaN or inf gradient skips the whole step
    (counted, warned naming the parameters); the run then continues exactly as if the bad step
    had never happened."""
    dev = _step_device(backend)
    gen = torch.Generator().manual_seed(4)
    grads = [[torch.randn(p.shape, generator=gen) for p in _lora_params(pairs=2)] for _ in range(4)]

    def run(bad_step):
        params = _lora_params(pairs=2, device=dev)
        opt = FoLoRA(params, lr=1e-2, weight_decay=0.1, refresh_every=1, backend=backend,
                     eigh_backend="reference")
        for i in (0, 2):
            opt.set_statistics(params[i], *_stats(5, i))
            opt.pair(params[i + 1], params[i])
        for t in range(4):
            if t == bad_step:
                for p, g in zip(params, grads[t]):
                    p.grad = g.clone().to(dev)
                params[1].grad[0, 0] = float("nan")
                params[2].grad[1, 3] = float("-inf")
                before = [p.detach().clone() for p in params]
                moments = {i: {k: v.clone() for k, v in opt.state[p].items()
                               if isinstance(v, torch.Tensor)} for i, p in enumerate(params)}
                steps = [opt.state[p]["step"] for p in params]
                with pytest.warns(RuntimeWarning, match=r"step skipped.*param_groups\[0\]\['params'\]\[1\]"
                                  r".*param_groups\[0\]\['params'\]\[2\]"):
                    opt.step()
                assert opt.skipped_steps == 1
                assert all(torch.equal(a, b) for a, b in zip(before, params))
                for i, p in enumerate(params):
                    assert opt.state[p]["step"] == steps[i]
                    for k, v in moments[i].items():
                        assert torch.equal(opt.state[p][k], v), k
            for p, g in zip(params, grads[t]):
                p.grad = g.clone().to(dev)
            opt.step()
            assert all(bool(torch.isfinite(p).all()) for p in params)
        assert opt.state_dict()["skipped_steps"] == (bad_step is not None)
        return params

    for a, b in zip(run(None), run(2)):
        assert torch.equal(a, b)


def test_degenerate_statistics_and_pairs_name_the_layer():
    model = lora_toy()
    proxy = sample_proxy_data(model, n_samples=4, length=6, prompts=[[1], [2]], progress=False)
    stats = calibrate(model, proxy, [torch.randint(0, 11, (2, 5))], progress=False)
    nan = stats["o"][0].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^o\.lora_A: proxy_cov has non-finite entries"):
        FoLoRA.from_model(model, {**stats, "o": (nan, stats["o"][1])}, eigh_backend="reference")
    indefinite = torch.diag(torch.tensor([1.0, 1, 1, 1, 1, -0.5]))
    with pytest.raises(ValueError, match=r"^k\.lora_A: proxy_cov.*not positive definite"):
        FoLoRA.from_model(model, {**stats, "k": (indefinite, stats["k"][1])}, damping=0.0,
                          eigh_backend="reference")
    opt = FoLoRA.from_model(model, stats, eigh_backend="reference", backend="reference")
    with torch.no_grad():
        model.v.lora_A.zero_()
    with pytest.raises(ValueError, match=r"^v\.lora_B: A Σp Aᵀ has a non-positive trace"):
        opt.refresh(force=True)
    with torch.no_grad():
        model.v.lora_A.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"^v\.lora_B: A Σ Aᵀ .* non-finite"):
        opt.refresh(force=True)


@pytest.mark.skipif(not HAS_TRITON_RUN, reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("gate,tau", [("soft", 1.0), ("sigmoid", 0.7), ("hard", 0.8), ("topk", 0.5)])
def test_triton_step_matches_reference_with_gates(gate, tau):
    def make(backend):
        dev = _step_device(backend)
        params = _lora_params(pairs=3, device=dev) + [torch.linspace(-1, 1, 5, device=dev).requires_grad_()]
        opt = FoLoRA(params[:4] + params[6:], lr=1e-2, weight_decay=0.1, gate=gate, tau=tau,
                     backend=backend, eigh_backend="reference")
        opt.add_param_group({"params": params[4:6], "basis": 2})  # a low-rank pair
        for i in (0, 2, 4):
            opt.set_statistics(params[i], *_stats(5, i))
            opt.pair(params[i + 1], params[i])
        return params, opt

    (p_ref, o_ref), (p_tri, o_tri) = make("reference"), make("triton")
    gen = torch.Generator().manual_seed(0)
    for t in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in p_ref]
        for ps in (p_ref, p_tri):
            for p, g in zip(ps, grads):
                p.grad = None if (t == 1 and p is ps[3]) else g.to(p.device)
        o_ref.step()
        o_tri.step()
    # on a GPU the bases are solved by a different LAPACK: a little more slack there
    tol = dict(rtol=1e-4, atol=1e-5) if torch.cuda.is_available() else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(p_ref, p_tri):
        torch.testing.assert_close(a, b.detach().cpu(), **tol)


def test_validation_errors():
    A = torch.randn(2, 4, requires_grad=True)
    B = torch.randn(3, 2, requires_grad=True)
    C = torch.randn(3, 3, requires_grad=True)
    opt = FoLoRA([A, B, C])
    with pytest.raises(ValueError, match=r"proxy_cov must be \(d_in, d_in\) = \(4, 4\)"):
        opt.set_statistics(A, torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match=r"task_cov must be \(d_in, d_in\)"):
        opt.set_statistics(A, torch.eye(4), torch.eye(5))
    indefinite = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))
    with pytest.raises(ValueError, match="proxy_cov.*not positive definite.*damping"):
        opt.set_statistics(A, indefinite, torch.eye(4))
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.set_statistics(torch.randn(2, 4, requires_grad=True), torch.eye(4), torch.eye(4))
    with pytest.raises(ValueError, match="set_statistics"):
        opt.pair(B, A)
    with pytest.raises(ValueError, match="non-finite"):
        opt.set_statistics(A, torch.full((4, 4), float("nan")), torch.eye(4))
    opt.set_statistics(A, torch.eye(4), torch.eye(4))
    with pytest.raises(ValueError, match="share r"):
        opt.pair(C, A)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.pair(B, A.detach().clone())
    with pytest.raises(ValueError, match="gate must be one of"):
        FoLoRA([A], gate="cosine")
    with pytest.raises(ValueError, match="basis must be"):
        FoLoRA([A], basis=0)
    with pytest.raises(ValueError, match="refresh_every"):
        FoLoRA([A], refresh_every=0)
    with pytest.raises(ValueError, match="basis_norm"):
        FoLoRA([A], basis_norm="l2")


@pytest.mark.parametrize("basis", ["dense", 8])
def test_memory_dense_vs_lowrank_and_shared_bases(basis):
    """Two layers reading one input share V, W and the statistics: dense keeps four d x d
    float32 matrices, low-rank V_k, W_k and two rank-k sketches (docs/folora.md, Memory)."""
    d, r, k = 64, 4, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, d, generator=gen)
    proxy, task = x.T @ x / 200, torch.eye(d)
    A1, A2 = (torch.randn(r, d, generator=gen).requires_grad_() for _ in range(2))
    opt = FoLoRA([A1, A2], basis=basis, backend="reference", eigh_backend="reference")
    opt.set_statistics(A1, proxy, task)
    opt.set_statistics(A2, proxy, task)
    assert opt.state[A1]["V"] is opt.state[A2]["V"]
    kept = d if basis == "dense" else k
    gates = 2 * 4 * kept  # one gate vector per parameter
    assert opt.memory_bytes()["bases"] == 4 * (2 * d * kept + kept) + gates
    stats = 2 * 4 * d * d if basis == "dense" else 2 * 4 * (d * k + k + 1)
    assert opt.memory_bytes()["statistics"] == stats


def test_param_group_added_after_a_step_is_updated():
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    opt = FoLoRA([a], lr=0.1, backend="reference")
    a.grad = torch.randn(3, 4)
    opt.step()
    m_before = opt.state[a]["exp_avg"].clone()
    with pytest.raises(ValueError, match="gate must be one of"):
        opt.add_param_group({"params": [b], "gate": "cosine"})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b]})
    b0 = b.detach().clone()
    a.grad, b.grad = torch.zeros(3, 4), torch.randn(5)
    opt.step()
    assert not torch.equal(b0, b)
    torch.testing.assert_close(opt.state[a]["exp_avg"], 0.9 * m_before)  # moments carried over


def _check_wired(model, opt, stats):
    layers = lora_modules(model)
    assert sorted(stats) == sorted(layers)
    for name, layer in layers.items():
        assert opt.state[layer.A]["mode"] == "dense"
        assert opt._pairs[layer.B] is layer.A


def test_from_model_forgetkern_lora():
    model = lora_toy()
    proxy = sample_proxy_data(model, n_samples=4, length=6, prompts=[[1], [2]], progress=False)
    task = [torch.randint(0, 11, (2, 5))]
    stats = calibrate(model, proxy, task, progress=False)
    opt = FoLoRA.from_model(model, stats, lr=1e-3, eigh_backend="reference", backend="reference")
    _check_wired(model, opt, stats)
    # q/k/v read one input: one basis object
    assert opt.state[model.q.lora_A]["V"] is opt.state[model.k.lora_A]["V"]
    logits = model(task[0])
    logits.sum().backward()
    before = model.q.lora_A.detach().clone()
    opt.step()
    assert not torch.equal(before, model.q.lora_A)
    with pytest.raises(ValueError, match="not LoRA layers"):
        FoLoRA.from_model(model, {"nope": stats["q"]})


def test_from_model_peft_llama():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    base = copy.deepcopy(model)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        ids = torch.tensor([[1, 5, 9, 13]])
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
    proxy = sample_proxy_data(model, n_samples=2, length=6, progress=False)
    # sampled from the pretrained model: PEFT adapters are off while sampling
    assert torch.equal(_cat(proxy), _cat(sample_proxy_data(base, n_samples=2, length=6, progress=False)))
    task = [{"input_ids": torch.randint(3, 48, (2, 5)), "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2])}]
    stats = calibrate(model, proxy, task, progress=False)
    assert len(stats) == 7
    attn = [n for n in stats if n.endswith(("q_proj", "k_proj", "v_proj"))]
    assert stats[attn[0]][0] is stats[attn[1]][0]
    opt = FoLoRA.from_model(model, stats, lr=1e-3, eigh_backend="reference", backend="reference")
    _check_wired(model, opt, stats)
    out = model(**task[0], labels=task[0]["input_ids"])
    out.loss.backward()
    opt.step()
    assert opt.memory_bytes()["bases"] > 0


def test_docs_example_trains_a_tiny_llama():
    """The ten-line loop of docs/folora.md, executed as written on a tiny random Llama (its sizes
    are for a real model: the tiny one gets tiny ones, nothing else changes)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "folora.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "basis=256)" in b]
    for old, new in (("rank=16, alpha=32", "rank=2, alpha=4"), ("n_samples=256, length=256", "n_samples=4, length=6"),
                     ("basis=256)", "basis=4)"), ("lr=2e-4", "lr=1e-2")):
        assert old in code, old
        code = code.replace(old, new)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 48, (4, 2, 6), generator=gen)
    task_batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    model = tiny_llama()
    before = model(**task_batches[0]).loss.item()
    ns = {"model": model, "task_batches": task_batches * 3}
    exec(code, ns)
    model, opt = ns["model"], ns["opt"]
    assert model(**task_batches[0]).loss.item() < before
    assert len(opt._pairs) == 7 and all(opt.state[layer.lora_A]["mode"] == "lowrank"
                                         for layer in opt_layers(model))


def opt_layers(model):
    return [found.module for found in lora_modules(model).values()]


@pytest.mark.parametrize("basis", ["dense", 2])
def test_batched_rotations_match_one_parameter_at_a_time(basis):
    """Parameters of one shape and mode are rotated with one batched matmul: the same result as a
    FoLoRA holding each LoRA pair alone."""
    torch.manual_seed(5)
    d, r, pairs = 6, 3, 3
    init = []
    for _ in range(pairs):
        init += [torch.randn(r, d), torch.randn(d, r)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(4)]
    stats = [_stats(d, i) for i in range(pairs)]

    def wire(opt, params, pairs_idx):
        for j, k in pairs_idx:
            opt.set_statistics(params[2 * j], *stats[k])
            opt.pair(params[2 * j + 1], params[2 * j])
        return opt

    together = [p.clone().requires_grad_() for p in init]
    opt = wire(FoLoRA(together, lr=1e-2, basis=basis, refresh_every=2, backend="reference",
                      eigh_backend="reference"), together, [(k, k) for k in range(pairs)])
    alone = [p.clone().requires_grad_() for p in init]
    opts = [wire(FoLoRA(alone[2 * k: 2 * k + 2], lr=1e-2, basis=basis, refresh_every=2,
                        backend="reference", eigh_backend="reference"), alone[2 * k: 2 * k + 2], [(0, k)])
            for k in range(pairs)]
    for gs in grads:
        for p, q, gr in zip(together, alone, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, q in zip(together, alone):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(together[1], init[1])


# ---- the choice of the step's implementation (no Triton on import: tests/test_architecture.py) --------------------------------------
def _one_param_opt(**options):
    a = torch.randn(3, 4, requires_grad=True)
    opt = FoLoRA([a], lr=0.1, **options)
    a.grad = torch.randn(3, 4)
    return a, opt


def test_step_implementation_is_resolved_once_per_device(monkeypatch):
    calls = []
    real = _backend.resolve

    def counting(op, *tensors, **kw):
        calls.append(op)
        return real(op, *tensors, **kw)

    monkeypatch.setattr(_backend, "resolve", counting)
    a, opt = _one_param_opt(backend="reference")
    for _ in range(3):
        opt.step()
    assert calls.count("folora_step") == 1
    assert [flat.impl.backend for flat in opt._flat.values()] == ["reference"]
    opt.backend = None  # re-resolved for the buffers already built
    assert calls.count("folora_step") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a device Triton cannot serve")
def test_explicit_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, opt = _one_param_opt(backend="triton")
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="backend='triton' cannot run folora_step"):
        opt.step()
    assert torch.equal(a, before)
    a, opt = _one_param_opt()  # automatic: the reference serves
    opt.step()
    assert opt._flat[a.device].impl.backend == "reference"


def test_options_are_validated_the_same_in_init_and_add_param_group():
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    bad = [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1.0}, "eps"),
           ({"weight_decay": -0.1}, "weight_decay"), ({"damping": float("nan")}, "damping"),
           ({"basis": True}, "basis"), ({"refresh_every": 0}, "refresh_every"),
           ({"basis_norm": "l2"}, "basis_norm"), ({"gate": "sigmoid", "sharpness": 0.0}, "sharpness")]
    for options, name in bad:
        with pytest.raises(ValueError, match=name):
            FoLoRA([a], **options)
        opt = FoLoRA([a])
        with pytest.raises(ValueError, match=name):
            opt.add_param_group({"params": [b], **options})
        assert len(opt.param_groups) == 1
    for backend in ("cuda", "bogus"):
        with pytest.raises(ValueError, match="backend must be one of"):
            FoLoRA([a], backend=backend)


@pytest.mark.skipif(not HAS_TRITON_RUN, reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_large_layer_input_falls_back_to_the_reference_eigensolver():
    """``eigh_backend="triton"`` with ``d_in`` above the on-chip limit: the table hands the solve
    to the reference (no special case in the optimizer)."""
    d = EIGH_MAX_N + 1
    proxy, task = _stats(d, 0)
    A = torch.randn(2, d, requires_grad=True)
    opt = FoLoRA([A], eigh_backend="triton", backend="reference")
    opt.set_statistics(A, proxy, task)
    V, W = opt.state[A]["V"].double(), opt.state[A]["W"].double()
    torch.testing.assert_close(W.T @ V, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-4)
