"""Saved runs of ``forgetkern demo`` (the ``--json`` files): reading one, resuming one
(``--resume``), and joining runs of other seeds into one (``--from-json A,B,...``)."""
from __future__ import annotations

import json
from dataclasses import asdict

from .._args import UsageError
from .config import DemoConfig


def load(path: str, flag: str) -> dict:
    """The saved run at ``path`` (written by ``--json``); a usage error naming ``flag`` when it
    cannot be read or is not a demo result."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag}: cannot read {path}: {e}") from None
    if not isinstance(payload, dict):
        raise UsageError(f"{flag}: {path} is not a demo result (not a JSON object)")
    missing = [k for k in ("config", "base", "results") if k not in payload]
    if missing:
        raise UsageError(f"{flag}: {path} is not a demo result (missing {', '.join(missing)})")
    return payload


def resumed(path: str, cfg: DemoConfig) -> tuple[dict, list, float, float]:
    """``(bases, finished runs, elapsed wall seconds, CPU seconds)`` of a saved run whose
    settings equal ``cfg``'s."""
    saved = load(path, "--resume")
    differ = [k for k, v in json.loads(json.dumps(asdict(cfg))).items()
              if saved["config"].get(k) != v]
    if differ:
        raise UsageError(f"--resume {path}: the saved run has other settings "
                         f"({', '.join(differ)}); run with the same options")
    finished = [r for r in saved["results"] if r.get("status") == "ok"]
    config = saved["config"]
    return (dict(saved.get("bases", {})), finished, float(config.get("elapsed_s", 0.0)),
            float(config.get("cpu_s", 0.0)))


#: config fields that differ between runs of the same options on other seeds
_PER_RUN = ("seeds", "elapsed_s", "cpu_s", "joined_from")


def joined(payloads: list[dict], paths: list[str]) -> dict:
    """One saved run from runs of the same options on disjoint seeds (e.g. seeds run in parallel
    processes): seeds, bases and results in order, wall and CPU seconds summed (the CPU time
    the experiment took, not the wall time of the parallel run). Refuses runs whose options differ
    or whose seeds overlap, naming the file and the field."""
    first = payloads[0]
    config = dict(first["config"])
    bases, results, seen = dict(first.get("bases", {})), list(first["results"]), list(config["seeds"])
    for path, other in zip(paths[1:], payloads[1:]):
        cfg = other["config"]
        for key in sorted(set(config) | set(cfg)):
            if key not in _PER_RUN and config.get(key) != cfg.get(key):
                raise UsageError(f"--from-json {path}: option {key!r} differs from {paths[0]}'s "
                                 f"({cfg.get(key)!r} vs {config.get(key)!r}): only runs of the same "
                                 "options on other seeds can be joined")
        overlap = sorted(set(seen) & set(cfg["seeds"]))
        if overlap:
            raise UsageError(f"--from-json {path}: seeds {overlap} are also in an earlier file")
        seen += list(cfg["seeds"])
        bases.update(other.get("bases", {}))
        results += other["results"]
        for key in ("elapsed_s", "cpu_s"):
            if config.get(key) is not None and cfg.get(key) is not None:
                config[key] += cfg[key]
    config["seeds"] = seen
    config["joined_from"] = sum(p["config"].get("joined_from", 1) for p in payloads)
    return {"config": config, "base": first["base"], "bases": bases, "results": results,
            "complete": all(p.get("complete", False) for p in payloads)}
