"""Proxy data: token sequences sampled from the pretrained model itself (adapters disabled)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm as progress_bar

from ..lora import disable_adapters
from ..lora.discovery import logits_of


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _config_value(model: nn.Module, key: str):
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(holder, key, None) if holder is not None else None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def _is_hf_generator(model: nn.Module) -> bool:
    """An HF causal LM (or a PEFT model wrapping one), whose KV cache the sampling loop uses."""
    if not callable(getattr(model, "generate", None)) or getattr(model, "config", None) is None:
        return False
    try:
        from transformers import PreTrainedModel
    except Exception:
        return False
    if isinstance(model, PreTrainedModel):
        return True
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return isinstance(inner, PreTrainedModel)


def _prompt_list(prompts, bos_token_id, tokenizer, model) -> list[list[int]]:
    if prompts is None:
        bos = bos_token_id if bos_token_id is not None else _config_value(model, "bos_token_id")
        if bos is None:
            raise ValueError(
                "sample_proxy_data needs seed prompts: the model has no bos_token_id in its config; "
                "pass prompts= (token ids, or strings with tokenizer=) or bos_token_id="
            )
        return [[int(bos)]]
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype.is_floating_point or prompts.dim() not in (1, 2) or prompts.numel() == 0:
            raise ValueError(
                f"prompts must be a non-empty (P, L) or (L,) integer tensor, got {prompts.dtype} "
                f"of shape {tuple(prompts.shape)}"
            )
        rows = prompts.reshape(-1, prompts.shape[-1]) if prompts.dim() == 2 else prompts[None]
        return [[int(t) for t in row] for row in rows.tolist()]
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, item in enumerate(prompts):
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("prompts given as strings need tokenizer=")
            ids = tokenizer(item, add_special_tokens=True)["input_ids"]
        elif isinstance(item, torch.Tensor):
            ids = item.reshape(-1).tolist()
        else:
            ids = list(item)
        if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"prompts[{i}] must be a non-empty sequence of non-negative token ids, got {item!r}")
        out.append([int(t) for t in ids])
    if not out:
        raise ValueError("prompts must not be empty")
    return out


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float,
                      top_p: float) -> torch.Tensor:
    """Sample one token per row from ``(N, V)`` logits with temperature and nucleus (top-p).

    ``temperature == 0`` is greedy (argmax). Top-p keeps the smallest set of most likely tokens
    whose probability reaches ``top_p`` (always at least the most likely one). Returns ``(N,)``
    int64.
    """
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # mass before this token already enough
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sample_loop(model, ids, new_tokens, generator, temperature, top_p):
    """KV-free fallback: recompute the whole prefix for every new token."""
    for _ in range(new_tokens):
        logits = logits_of(model(ids))
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(
                "sample_proxy_data: the model must map token ids (B, T) to logits (B, T, V) "
                f"(or an output with .logits); got {tuple(logits.shape)} for input {tuple(ids.shape)}"
            )
        tok = sample_next_token(logits[:, -1, :], generator, temperature, top_p)
        ids = torch.cat([ids, tok[:, None].to(ids.dtype)], dim=1)
    return ids


def _sample_cached(model, ids, new_tokens, generator, temperature, top_p):
    """HF causal LMs: the same loop over the model's KV cache. Not ``generate``, which stops a
    sequence at the end-of-sequence token of the model's generation config."""
    out = model(input_ids=ids, use_cache=True)
    for i in range(new_tokens):
        tok = sample_next_token(logits_of(out)[:, -1, :], generator, temperature, top_p)
        tok = tok[:, None].to(ids.dtype)
        ids = torch.cat([ids, tok], dim=1)
        if i + 1 < new_tokens:
            with warnings.catch_warnings():  # newer transformers rename it `cache`, older lack that
                warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated",
                                        category=FutureWarning)
                out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
    return ids


@torch.no_grad()
def sample_proxy_data(
    model: nn.Module,
    *,
    n_samples: int,
    length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompts=None,
    seed: int = 0,
    batch_size: int = 8,
    bos_token_id: int | None = None,
    tokenizer=None,
    use_generate: bool | None = None,
    progress: bool = True,
    process_group=None,
    gather: bool = False,
) -> list[torch.Tensor]:
    """Sample token sequences from the pretrained model (adapters disabled) as proxy data.

    In plain torch, per sequence::

        ids = prompt                                  # a short seed, e.g. [bos]
        while len(ids) < length:
            p = softmax(model(ids)[-1] / temperature)   # nucleus-truncated to top_p
            ids.append(multinomial(p))

    HF causal LMs (and PEFT models wrapping one) run the same loop with their KV cache (not
    ``generate``, which would stop at the generation config's end-of-sequence token);
    any other module mapping token ids ``(B, T)`` to logits ``(B, T, V)`` (or an output with
    ``.logits``) runs the plain loop above without a cache. Sampling uses a local
    ``torch.Generator`` seeded with ``seed``, so results are reproducible and the global RNG is
    untouched. End-of-sequence tokens do not stop sampling: every sequence has exactly
    ``length`` tokens (a base model continues as if a new document started).

    Seed prompts: by default the model's BOS token (``config.bos_token_id`` or
    ``generation_config.bos_token_id``), or ``bos_token_id``. Pass ``prompts`` as token ids
    (a ``(P, L)`` tensor or lists of ids) or, with ``tokenizer``, as strings, e.g. a few common
    words (``["The", "In", "A", "I"]``) for models without a BOS token. Sample ``i`` uses prompt
    ``i % P``; the prompt tokens are included in the returned sequences.

    Args:
        model: the model to sample from; LoRA adapters (forgetkern or PEFT) are disabled while
            sampling, and the model runs in eval mode (restored afterwards).
        n_samples: number of sequences (>= 1).
        length: tokens per sequence, prompt included (longer than every prompt).
        temperature: softmax temperature (>= 0; 0 is greedy).
        top_p: nucleus probability in ``(0, 1]`` (1 keeps the whole vocabulary).
        prompts: seed prompts (see above).
        seed: generator seed.
        batch_size: sequences per forward batch (samples are batched with those of the same
            prompt length; the returned tensors hold ``batch_size`` rows each, in sample order).
        bos_token_id: BOS token used when ``prompts`` is ``None`` and the config has none.
        tokenizer: HF tokenizer for string prompts.
        use_generate: force (``True``) or forbid (``False``) the HF KV-cache path; default:
            use it for HF models.
        progress: show a progress bar (tqdm, on stderr).
        process_group: data parallel: each rank of this ``torch.distributed`` group samples its
            share, a contiguous block of the ``n_samples`` (the first ``n_samples % world`` ranks
            one more), with prompt ``i % P`` for global sample ``i`` and its own generator seeded
            with ``seed + rank * 2**32`` (rank 0 samples its share as one process asked for that
            many samples would).
        gather: with ``process_group``, also gather every rank's samples (one ``all_gather`` of
            the padded blocks) so each rank returns all ``n_samples`` in rank order.

    Returns:
        A list of ``(b, length)`` int64 CPU tensors with ``n_samples`` rows in total (with
        ``process_group`` and not ``gather``: this rank's share), in sample order.
    """
    for name, value in (("n_samples", n_samples), ("length", length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    seeds = _prompt_list(prompts, bos_token_id, tokenizer, model)
    longest = max(len(s) for s in seeds)
    if length <= longest:
        raise ValueError(f"length={length} must exceed the longest prompt ({longest} tokens)")
    hf = _is_hf_generator(model) if use_generate is None else bool(use_generate)
    device = _model_device(model)
    lo, hi, rank = 0, n_samples, 0
    if process_group is not None:
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        share, extra = divmod(n_samples, world)
        lo = rank * share + min(rank, extra)
        hi = lo + share + (rank < extra)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) + rank * 2**32)

    # samples grouped by prompt length (in order of first appearance), batch_size per batch
    groups: dict[int, list[int]] = {}
    for i in range(lo, hi):
        groups.setdefault(len(seeds[i % len(seeds)]), []).append(i)
    batches = [g[j:j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]

    rows_of: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with disable_adapters(model, require=False), progress_bar(total=hi - lo, desc="proxy samples", unit="seq",
                                                   disable=not progress) as bar:
            for rows in batches:
                ids = torch.tensor([seeds[i % len(seeds)] for i in rows], dtype=torch.long, device=device)
                new = length - ids.shape[1]
                if hf:
                    seqs = _sample_cached(model, ids, new, generator, float(temperature), float(top_p))
                else:
                    seqs = _sample_loop(model, ids, new, generator, float(temperature), float(top_p))
                if seqs.shape != (len(rows), length):
                    raise RuntimeError(
                        f"sampling returned shape {tuple(seqs.shape)}, expected {(len(rows), length)}"
                    )
                rows_of.update(zip(rows, seqs.to("cpu", torch.long)))
                bar.update(len(rows))
    finally:
        model.train(was_training)
    order = [rows_of[i] for i in range(lo, hi)]  # back in sample order
    out = [torch.stack(order[j:j + batch_size]) for j in range(0, len(order), batch_size)]
    if process_group is not None and gather:
        return _gather_samples(out, n_samples, length, process_group)
    return out


def _gather_samples(out, n_samples, length, group) -> list[torch.Tensor]:
    """Every rank's block of samples, in rank order: one ``all_gather`` of blocks padded to the
    largest share (on the group's device: the CPU for gloo, the current GPU for NCCL)."""
    world = dist.get_world_size(group)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    rows = -(-n_samples // world)
    mine = torch.cat(out) if out else torch.zeros(0, length, dtype=torch.long)
    block = torch.zeros(rows, length, dtype=torch.long, device=device)
    block[: mine.shape[0]] = mine
    blocks = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(blocks, block, group=group)
    share, extra = divmod(n_samples, world)
    return [b[: share + (r < extra)].cpu() for r, b in enumerate(blocks) if share + (r < extra)]
