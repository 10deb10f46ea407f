"""The demo's table, its equal-target comparisons and its frontier plot, over seeds."""
from __future__ import annotations

import os

from .._files import atomic_path
from .config import ADAPTERS, adapter_of, loss_name, reference_of
from .metrics import forgetting_at, spread

METHOD_COLORS = {"ce": "#444444", "kl": "#1f77b4", "tmkl": "#d62728", "folora": "#2ca02c",
                 "tmkl+folora": "#9467bd", "dora": "#ff7f0e", "dora+tmkl": "#a04c00",
                 "randlora": "#bcbd22", "randlora+tmkl": "#6b6b00", "corda": "#e377c2",
                 "osf": "#17becf"}
KEY_NAMES = {"target_loss": "target loss", "target_error": "task error (1 − exact match)"}
IF = "instruction_following"


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
    probe, follow = "probe_preserved" in base, IF in base
    head = (f"{'method':<13} {'kl_weight':>9} {'seeds':>5} {'target loss':>15} "
            f"{accuracy_name:>13} {'retention':>15} {'Δ vs base':>16}"
            + (f" {'probe kept':>12}" if probe else "")
            + (f" {'instr. follow':>13}" if follow else "") + f" {'tok/s':>7}")
    lines = [head, "-" * len(head),
             f"{'base model':<13} {'':>9} {'':>5} {base['target_loss']:>15.4f} "
             f"{base['target_accuracy']:>13.3f} {base['retention_loss']:>15.4f} {0:>+16.4f}"
             + (f" {base['probe_preserved']:>12.3f}" if probe else "")
             + (f" {base[IF]:>13.3f}" if follow else "") + f" {'':>7}"]
    for (method, w), runs in groups(results).items():
        col = lambda k: [r.get(k) for r in runs]  # noqa: E731
        lines.append(f"{method:<13} {'' if w is None else f'{w:g}':>9} {len(runs):>5} "
                     f"{_pm(col('target_loss'), '.4f', 15)} {_pm(col('target_accuracy'), '.3f', 13)} "
                     f"{_pm(col('retention_loss'), '.4f', 15)} {_pm(col('forgetting'), '+.4f', 16)}"
                     + (f" {_pm(col('probe_preserved'), '.3f', 12)}" if probe else "")
                     + (f" {_pm(col(IF), '.3f', 13)}" if follow else "")
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


def format_adapters(results: list[dict], key: str = "target_error") -> str:
    """Real-model runs, one row per adapter and TMKL weight: the adapter trained with CE and
    with TMKL (exact match, forgetting, instruction following: means ± sd over seeds), and the
    CE run of the same adapter at the TMKL run's task error (empty when no PEFT adapter ran)."""
    grouped = groups(results)
    if not any(adapter_of(m) != "lora" for m, _ in grouped):
        return ""
    at = {}
    for r, ref, ref_if, _ in _vs_reference(results, key):
        at.setdefault((r["method"], r["kl_weight"]), []).append((ref, ref_if))
    cell = lambda runs, k, fmt: _pm([r.get(k) for r in runs], fmt, 13)  # noqa: E731
    head = (f"{'adapter':<9} {'params':>8} | {'CE: exact m.':>13} {'Δ':>13} {'instr.':>13} | "
            f"{'λ':>3} {'TMKL: exact m.':>14} {'Δ':>13} {'instr.':>13} | {'CE at its error: Δ':>19} "
            f"{'instr.':>13}")
    lines = [head, "-" * len(head)]
    for adapter in ADAPTERS:
        ce = grouped.get(("ce" if adapter == "lora" else adapter, None))
        if not ce:
            continue
        tm = [(w, runs) for (m, w), runs in grouped.items()
              if adapter_of(m) == adapter and loss_name(m) == "tmkl" and "folora" not in m]
        params = f"{ce[0].get('trainable_parameters', 0) / 1e3:.0f}k"
        left = (f"{adapter:<9} {params:>8} | {cell(ce, 'target_accuracy', '.3f')} "
                f"{cell(ce, 'forgetting', '+.3f')} {cell(ce, IF, '.3f')} |")
        for w, runs in tm or [(None, [])]:
            if not runs:
                lines.append(left)
                continue
            pairs = at.get((runs[0]["method"], w), [])
            ref = _pm([f for f, _ in pairs], "+.3f", 19)
            ref_if = _pm([i for f, i in pairs if f is not None], ".3f", 13)
            lines.append(f"{left} {w:>3g} {_pm([r['target_accuracy'] for r in runs], '.3f', 14)} "
                         f"{cell(runs, 'forgetting', '+.3f')} {cell(runs, IF, '.3f')} | "
                         f"{ref} {ref_if}")
    return "\n".join(lines)


def format_instructions(results: list[dict], base: dict) -> str:
    """Instruction following per instruction (share of prompts followed), means over seeds
    (empty when the runs carry none)."""
    if IF not in base:
        return ""
    names = list(base[IF + "_by"])
    short = [n[:12] for n in names]
    head = f"{'method':<13} {'kl_weight':>9} " + " ".join(f"{n:>12}" for n in short)
    lines = [head, "-" * len(head), f"{'base model':<13} {'':>9} "
             + " ".join(f"{base[IF + '_by'][n]:>12.3f}" for n in names)]
    for (method, w), runs in groups(results).items():
        lines.append(f"{method:<13} {'' if w is None else f'{w:g}':>9} " + " ".join(
            f"{spread([r[IF + '_by'][n] for r in runs])['mean']:>12.3f}" for n in names))
    return "\n".join(lines)


def _reference_name(method: str) -> str:
    return "CE" if method == "ce" else method


def _vs_reference(results: list[dict], key: str):
    """Per run but ``ce``, the run of its reference method (:func:`config.reference_of`, same
    seed) and that run's forgetting and instruction following interpolated at the run's ``key``:
    ``(run, forgetting, instruction following, reference run)``."""
    ok = {(r["method"], r.get("seed")): r for r in results if r.get("status") == "ok"}
    out = []
    for r in results:
        ref = ok.get((reference_of(r["method"]), r.get("seed"))) if r["method"] != "ce" else None
        if r.get("status") != "ok" or ref is None or ref is r:
            continue
        out.append((r, forgetting_at(ref["curve"], r[key], key),
                    forgetting_at(ref["curve"], r[key], key, value=IF), ref))
    return out


def _if_text(mine, theirs) -> str:
    """``; instruction following a vs b`` over seeds (empty without instruction following)."""
    a, b = spread(mine), spread(theirs)
    if a["mean"] is None or b["mean"] is None:
        return ""
    pm = lambda x: f" ±{x['std']:.3f}" if x["n"] > 1 else ""  # noqa: E731
    return f"; instruction following {a['mean']:.3f}{pm(a)} vs {b['mean']:.3f}{pm(b)}"


def comparisons(results: list[dict], key: str = "target_loss") -> list[str]:
    """Forgetting of each (method, kl_weight) against its reference CE run's curve at the same
    ``key`` (the reference stopped where it reached the same target: LoRA's ``ce``, or the same
    adapter trained with CE), with instruction following when measured, and TMKL against plain
    KL; over seeds, the mean ± standard deviation of the seeds where both are defined."""
    for r in results:
        r.setdefault("seed", 0)
    name = KEY_NAMES.get(key, key)
    pairs: dict[tuple, list] = {}
    for r, ref, ref_if, ce in _vs_reference(results, key):
        pairs.setdefault((r["method"], r["kl_weight"]), []).append((r, ref, ref_if, ce))
    out = []
    for (method, w), rows in pairs.items():
        label = run_name(rows[0][0])
        other = _reference_name(rows[0][3]["method"])
        inside = [(r, ref, ref_if) for r, ref, ref_if, _ in rows if ref is not None]
        follow = _if_text([r.get(IF) for r, _, ri in inside if ri is not None],
                          [ri for _, _, ri in inside if ri is not None])
        if len(rows) == 1:
            r, ref, _, ce = rows[0]
            if ref is None:
                out.append(f"{label}: {name} {r[key]:.3f} is outside {other}'s curve ({other} "
                           f"reached {ce[key]:.3f}); no comparison at the same {name}")
            else:
                out.append(f"{label}: forgetting {r['forgetting']:+.4f} vs {other} {ref:+.4f}"
                           f"{follow} at the same {name} {r[key]:.3f}")
        elif inside:
            mine = spread([r["forgetting"] for r, _, _ in inside])
            theirs = spread([ref for _, ref, _ in inside])
            at = spread([r[key] for r, _, _ in inside])
            out.append(f"{label}: forgetting {mine['mean']:+.4f} ±{mine['std']:.4f} vs {other} "
                       f"{theirs['mean']:+.4f} ±{theirs['std']:.4f}{follow} at the same {name} "
                       f"(mean {at['mean']:.3f}; {len(inside)} of {len(rows)} seeds inside "
                       f"{other}'s curve)")
        else:
            out.append(f"{label}: outside {other}'s curve on every seed; no comparison at the "
                       f"same {name}")
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
    per method, darker for larger ``kl_weight``, one line per seed. Middle, with several seeds
    or a ``kl_weight`` sweep: the end points, mean ± standard deviation over seeds, joined
    across ``kl_weight`` per method, against the mean trajectory of each CE reference run (CE
    stopped early is the baseline every regularizer has to beat at an equal target). Right, when
    the runs measure instruction following: the same end points against its loss (the base
    model's rate minus the run's). Lower-left is better.
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
    follow = summary and all(r.get(IF) is not None for runs in grouped.values() for r in runs)
    base_if = next((r["curve"][0].get(IF) for runs in grouped.values() for r in runs), None)
    xs = {"forgetting": ("forgetting", "forgetting: retention loss − base model's (nats/token)")}
    if follow and base_if is not None:
        xs[IF] = (IF, "instruction following lost: base model's rate − run's")

    def colour(method, w):
        rgb = to_rgb(METHOD_COLORS.get(method, "#8c564b"))
        ws = sorted(x for x in weights[method] if x is not None)
        if w is None or len(ws) < 2:
            return rgb
        mix = 0.55 * (1 - ws.index(w) / (len(ws) - 1))  # small λ lighter
        return tuple(c + (1 - c) * mix for c in rgb)

    def x_of(point: dict, which: str) -> float:
        return point["forgetting"] if which == "forgetting" else base_if - point[IF]

    panels = 1 + (len(xs) if summary else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels + 0.5, 5), squeeze=False)
    ax = axes[0, 0]
    for (method, w), runs in grouped.items():
        for i, r in enumerate(runs):
            ax.plot([c["forgetting"] for c in r["curve"]], [c[key] for c in r["curve"]],
                    marker="o", markersize=2.5, linewidth=1.0, alpha=0.85 if i == 0 else 0.45,
                    color=colour(method, w), label=run_name(r) if i == 0 else None)
    ax.set_title("trajectories during adaptation" if summary else title, fontsize=10)
    ax.legend(fontsize=7, ncol=2 if len(grouped) > 8 else 1)
    ax.set_xlabel(xs["forgetting"][1])
    references = [m for m in dict.fromkeys(reference_of(m) or m for m, _ in grouped)
                  if (m, None) in grouped]
    for ax, which in zip(axes[0, 1:], xs if summary else ()):
        for ref in references:
            runs = grouped[(ref, None)]
            n = min(len(r["curve"]) for r in runs)
            ax.plot([spread([x_of(r["curve"][i], which) for r in runs])["mean"] for i in range(n)],
                    [spread([r["curve"][i][key] for r in runs])["mean"] for i in range(n)],
                    linestyle="--", color=METHOD_COLORS.get(ref, "#444444"), linewidth=1.1,
                    label=f"{ref} (mean trajectory: stopped early)")
        for method, ws in weights.items():
            ws = sorted(ws, key=lambda w: -1.0 if w is None else w)
            pts = [(spread([x_of(r, which) for r in grouped[(method, w)]]),
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
        ax.set_xlabel(xs[which][1])
        ax.legend(fontsize=6 if len(weights) > 6 else 7)
    if summary:
        fig.suptitle(title, fontsize=11)
    for ax in axes[0]:
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
