"""Chat-formatted batches and greedy decoding for a Hugging Face causal LM (ChatML turns)."""
from __future__ import annotations

import torch

IGNORE = -100


def user_turn(prompt: str) -> str:
    """A ChatML user turn followed by the opening of the assistant's turn (no system prompt)."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def chat_batch(tokenizer, pairs, *, end: str = "<|im_end|>") -> dict:
    """Right-padded training batch of ``(prompt, answer)`` pairs; the loss is on the answer
    tokens and the end-of-turn token only (labels are ``-100`` on the prompt and padding)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(user_turn(prompt), add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + end, add_special_tokens=False)["input_ids"]
        rows.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    n = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    lab = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def text_batches(tokenizer, text: str, *, n: int, length: int, batch: int) -> list[dict]:
    """``n`` consecutive ``length``-token windows of ``text`` as LM batches (loss on all tokens)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = min(n, ids.numel() // length)
    if n == 0:
        raise ValueError(f"the text holds fewer than {length} tokens")
    rows = ids[: n * length].view(n, length)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()}
            for r in rows.split(batch)]


@torch.no_grad()
def greedy(model, tokenizer, prompts, *, max_new_tokens: int, batch: int = 32,
           end: str = "<|im_end|>") -> list[str]:
    """Greedy answers to chat ``prompts``, cut at the end-of-turn token (left-padded, batched)."""
    device = next(model.parameters()).device
    end_id = tokenizer.convert_tokens_to_ids(end)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(prompts), batch):
            enc = [tokenizer(user_turn(p), add_special_tokens=False)["input_ids"]
                   for p in prompts[i:i + batch]]
            n = max(map(len, enc))
            ids = torch.tensor([[pad] * (n - len(e)) + e for e in enc], device=device)
            mask = torch.tensor([[0] * (n - len(e)) + [1] * len(e) for e in enc], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=end_id,
                                 pad_token_id=pad, top_p=None, top_k=None, temperature=None)
            for row in gen[:, n:].tolist():
                if end_id in row:
                    row = row[: row.index(end_id)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was)
    return out
