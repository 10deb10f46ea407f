"""The demo's table, its equal-target comparisons and its frontier plot, over seeds."""
from __future__ import annotations

import os

from .._files import atomic_path
from .metrics import forgetting_at, spread

METHOD_COLORS = {"ce": "#444444", "kl": "#1f77b4", "tmkl": "#d62728", "folora": "#2ca02c",
                 "tmkl+folora": "#9467bd"}
KEY_NAMES = {"target_loss": "target loss", "target_error": "task error (1 − exact match)"}


def run_name(r: dict) -> str:
    return r["method"] + ("" if r["kl_weight"] is None else f" λ={r['kl_weight']:g}")


def groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Successful runs grouped by ``(method, kl_weight)``, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("status") == "ok":
            out.setdefault((r["method"], r["kl_weight"]), []).append(r)
    return out


def _pm(values, fmt: str, width: int) -> str:
    s = spread(values)
    if s["mean"] is None:
        return f"{'-':>{width}}"
    text = format(s["mean"], fmt) + (f" ±{format(s['std'], fmt.lstrip('+'))}" if s["n"] > 1 else "")
    return f"{text:>{width}}"


def format_table(results: list[dict], base: dict, accuracy_name: str) -> str:
    """One row per (method, kl_weight): means over seeds, ± the standard deviation."""
    probe = "probe_preserved" in base
    head = (f"{'method':<13} {'kl_weight':>9} {'seeds':>5} {'target loss':>15} "
            f"{accuracy_name:>13} {'retention':>15} {'Δ vs base':>16}"
            + (f" {'probe kept':>12}" if probe else "") + f" {'tok/s':>7}")
    lines = [head, "-" * len(head),
             f"{'base model':<13} {'':>9} {'':>5} {base['target_loss']:>15.4f} "
             f"{base['target_accuracy']:>13.3f} {base['retention_loss']:>15.4f} {0:>+16.4f}"
             + (f" {base['probe_preserved']:>12.3f}" if probe else "") + f" {'':>7}"]
    for (method, w), runs in groups(results).items():
        col = lambda k: [r.get(k) for r in runs]  # noqa: E731
        lines.append(f"{method:<13} {'' if w is None else f'{w:g}':>9} {len(runs):>5} "
                     f"{_pm(col('target_loss'), '.4f', 15)} {_pm(col('target_accuracy'), '.3f', 13)} "
                     f"{_pm(col('retention_loss'), '.4f', 15)} {_pm(col('forgetting'), '+.4f', 16)}"
                     + (f" {_pm(col('probe_preserved'), '.3f', 12)}" if probe else "")
                     + f" {_pm(col('tokens_per_s'), '.0f', 7)}")
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"{run_name(r):<23} skipped: {r.get('note', '')}")
    return "\n".join(lines)


def format_breakdown(results: list[dict], base: dict) -> str:
    """Real-model runs: exact match per task and retention increase per source, mean over seeds
    (empty when the runs carry no per-task numbers)."""
    if "exact_match" not in base:
        return ""
    tasks, sources = list(base["exact_match"]), list(base["retention_by_source"])
    head = (f"{'method':<13} {'kl_weight':>9} " + " ".join(f"{'EM ' + t:>14}" for t in tasks)
            + " " + " ".join(f"{'Δ ' + s:>10}" for s in sources) + f" {'probe prefix':>12}")
    lines = [head, "-" * len(head),
             f"{'base model':<13} {'':>9} " + " ".join(f"{base['exact_match'][t]:>14.3f}" for t in tasks)
             + " " + " ".join(f"{0:>+10.4f}" for _ in sources) + f" {base['probe_prefix']:>12.3f}"]
    for (method, w), runs in groups(results).items():
        em = [spread([r["exact_match"][t] for r in runs])["mean"] for t in tasks]
        ret = [spread([r["retention_by_source"][s] - base["retention_by_source"][s] for r in runs])
               ["mean"] for s in sources]
        lines.append(f"{method:<13} {'' if w is None else f'{w:g}':>9} "
                     + " ".join(f"{e:>14.3f}" for e in em) + " "
                     + " ".join(f"{x:>+10.4f}" for x in ret)
                     + f" {spread([r['probe_prefix'] for r in runs])['mean']:>12.3f}")
    return "\n".join(lines)


def _vs_ce(results: list[dict], key: str):
    """Per regularized run, the forgetting of CE's own trajectory (same seed) at its ``key``."""
    ce = {r["seed"]: r for r in results if r["method"] == "ce" and r.get("status") == "ok"}
    out = []
    for r in results:
        if r["method"] == "ce" or r.get("status") != "ok" or r.get("seed") not in ce:
            continue
        out.append((r, forgetting_at(ce[r["seed"]]["curve"], r[key], key), ce[r["seed"]]))
    return out


def comparisons(results: list[dict], key: str = "target_loss") -> list[str]:
    """Forgetting of each regularized (method, kl_weight) against CE's curve at the same ``key``
    (CE stopped where it reached the same target), and TMKL against plain KL; over seeds, the
    mean ± standard deviation of the seeds where both are defined."""
    for r in results:
        r.setdefault("seed", 0)
    name = KEY_NAMES.get(key, key)
    pairs: dict[tuple, list] = {}
    for r, ref, ce in _vs_ce(results, key):
        pairs.setdefault((r["method"], r["kl_weight"]), []).append((r, ref, ce))
    out = []
    for (method, w), rows in pairs.items():
        label = run_name(rows[0][0])
        inside = [(r, ref) for r, ref, _ in rows if ref is not None]
        if len(rows) == 1:
            r, ref, ce = rows[0]
            if ref is None:
                out.append(f"{label}: {name} {r[key]:.3f} is outside CE's curve (CE reached "
                           f"{ce[key]:.3f}); no comparison at the same {name}")
            else:
                out.append(f"{label}: forgetting {r['forgetting']:+.4f} vs CE {ref:+.4f} at the "
                           f"same {name} {r[key]:.3f}")
        elif inside:
            mine = spread([r["forgetting"] for r, _ in inside])
            theirs = spread([ref for _, ref in inside])
            at = spread([r[key] for r, _ in inside])
            out.append(f"{label}: forgetting {mine['mean']:+.4f} ±{mine['std']:.4f} vs CE "
                       f"{theirs['mean']:+.4f} ±{theirs['std']:.4f} at the same {name} "
                       f"(mean {at['mean']:.3f}; {len(inside)} of {len(rows)} seeds inside CE's "
                       "curve)")
        else:
            out.append(f"{label}: outside CE's curve on every seed; no comparison at the same {name}")
        if method == "tmkl":
            out.extend(_vs_kl(results, w, key, label, name))
    return out


def _vs_kl(results, w, key, label, name) -> list[str]:
    """TMKL against plain KL at the same weight, seed and target (reached by both)."""
    kl = {r["seed"]: r for r in results if r["method"] == "kl" and r.get("status") == "ok"
          and r["kl_weight"] == w}
    mine, ref, ats = [], [], []
    for r in results:
        if r["method"] != "tmkl" or r.get("status") != "ok" or r["kl_weight"] != w:
            continue
        k = kl.get(r["seed"])
        if k is None:
            continue
        t = max(r[key], k[key])  # reached by both runs
        a, b = forgetting_at(r["curve"], t, key), forgetting_at(k["curve"], t, key)
        if a is not None and b is not None:
            mine.append(a)
            ref.append(b)
            ats.append(t)
    if not mine:
        return []
    if len(mine) == 1:
        return [f"{label}: forgetting {mine[0]:+.4f} vs plain KL {ref[0]:+.4f} at the same "
                f"{name} {ats[0]:.3f}"]
    a, b = spread(mine), spread(ref)
    return [f"{label}: forgetting {a['mean']:+.4f} ±{a['std']:.4f} vs plain KL {b['mean']:+.4f} "
            f"±{b['std']:.4f} at the same {name} ({len(mine)} seeds)"]


def write_plot(path: str, results: list[dict], title: str, key: str = "target_loss") -> bool:
    """PNG of the learning/forgetting frontier; ``False`` when matplotlib is missing.

    Left: every run's trajectory (``key`` against forgetting at the checkpoints), one colour
    per method, darker for larger ``kl_weight``, one line per seed. Right, with several seeds
    or a ``kl_weight`` sweep: the end points, mean ± standard deviation over seeds, joined
    across ``kl_weight`` per method, against CE's mean trajectory (CE stopped early is the
    baseline every regularizer has to beat at an equal target). Lower-left is better.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import to_rgb
    except ImportError:
        return False
    grouped = groups(results)
    weights: dict[str, list] = {}
    for method, w in grouped:
        weights.setdefault(method, []).append(w)
    seeds = {r.get("seed", 0) for runs in grouped.values() for r in runs}
    summary = len(seeds) > 1 or any(len(w) > 1 for w in weights.values())

    def colour(method, w):
        rgb = to_rgb(METHOD_COLORS.get(method, "#8c564b"))
        ws = sorted(x for x in weights[method] if x is not None)
        if w is None or len(ws) < 2:
            return rgb
        mix = 0.55 * (1 - ws.index(w) / (len(ws) - 1))  # small λ lighter
        return tuple(c + (1 - c) * mix for c in rgb)

    fig, axes = plt.subplots(1, 2 if summary else 1, figsize=(12.5 if summary else 7, 5),
                             squeeze=False)
    ax = axes[0, 0]
    for (method, w), runs in grouped.items():
        for i, r in enumerate(runs):
            ax.plot([c["forgetting"] for c in r["curve"]], [c[key] for c in r["curve"]],
                    marker="o", markersize=2.5, linewidth=1.0, alpha=0.85 if i == 0 else 0.45,
                    color=colour(method, w), label=run_name(r) if i == 0 else None)
    ax.set_title("trajectories during adaptation" if summary else title, fontsize=10)
    ax.legend(fontsize=7, ncol=2 if len(grouped) > 8 else 1)
    if summary:
        ax = axes[0, 1]
        ce = grouped.get(("ce", None))
        if ce:
            n = min(len(r["curve"]) for r in ce)
            xs = [spread([r["curve"][i]["forgetting"] for r in ce])["mean"] for i in range(n)]
            ys = [spread([r["curve"][i][key] for r in ce])["mean"] for i in range(n)]
            ax.plot(xs, ys, linestyle="--", color=METHOD_COLORS["ce"], linewidth=1.2,
                    label="ce (mean trajectory: stopped early)")
        for method, ws in weights.items():
            ws = sorted(ws, key=lambda w: -1.0 if w is None else w)
            pts = [(spread([r["forgetting"] for r in grouped[(method, w)]]),
                    spread([r[key] for r in grouped[(method, w)]]), w) for w in ws]
            c = colour(method, ws[-1])
            ax.errorbar([p[0]["mean"] for p in pts], [p[1]["mean"] for p in pts],
                        xerr=[p[0]["std"] for p in pts], yerr=[p[1]["std"] for p in pts],
                        marker="o", markersize=5, capsize=3, color=c,
                        label=f"{method} (end, mean ± sd" + (", λ swept)" if len(ws) > 1 else ")"))
            for fx, fy, w in pts:
                if w is not None and len(ws) > 1:
                    ax.annotate(f"{w:g}", (fx["mean"], fy["mean"]), fontsize=7, xytext=(4, 2),
                                textcoords="offset points", color=c)
        ax.set_title(f"end of adaptation ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
                     fontsize=10)
        ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=11)
    for ax in axes[0]:
        ax.set_xlabel("forgetting: retention loss − base model's (nats/token)")
        ax.set_ylabel(f"{KEY_NAMES.get(key, key)} (held out)")
        ax.grid(alpha=0.3)
        ax.text(0.02, 0.02, "lower-left is better", transform=ax.transAxes, fontsize=8,
                color="#555555", ha="left", va="bottom")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:  # whole or not at all (same suffix: the same format)
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
    return True
