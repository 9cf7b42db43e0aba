"""Causal-LM glue for prompt/response data: tokenization, batches, response-only loss, generation.

Every example is `prompt + response + EOS`; the loss is the mean cross-entropy over the
response tokens (EOS included) only, for training and for the reported eval loss.

Batches are *left*-padded with explicit position ids (cumulative attention mask), the
layout generation uses too. Every row then ends at the last position, so the response
tokens of all rows sit in the last K positions (K = longest response + 1), and the output
head runs only there (`logits_to_keep=K`): with a 49k-token vocabulary, the head and its
softmax over the prompt positions would otherwise be a large share of the step.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    id: str
    prompt_ids: list[int]
    response_ids: list[int]  # includes EOS

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def encode_records(tokenizer, records: Sequence[dict], max_length: int) -> list[Encoded]:
    """Tokenize prompt and response separately (so the boundary is exact); fail on over-long rows."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; responses need one to end")
    out = []
    for rec in records:
        prompt_ids = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        enc = Encoded(rec["id"], prompt_ids, response_ids)
        if enc.length > max_length:
            raise DataError(f"example {rec['id']!r} is {enc.length} tokens long, over data.max_length={max_length}")
        out.append(enc)
    return out


def collate(examples: Sequence[Encoded], pad_id: int, with_labels: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded batch: input_ids, attention_mask, position_ids (and labels on response tokens)."""
    length = max(e.length for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        ids[row, length - len(seq):] = torch.tensor(seq)
        mask[row, length - len(seq):] = 1
        labels[row, length - len(e.response_ids):] = torch.tensor(e.response_ids)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if with_labels:
        batch["labels"] = labels
    return batch


def prompt_batch(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts only (for generation)."""
    prompts = [Encoded(e.id, e.prompt_ids, []) for e in examples]
    batch = collate(prompts, pad_id, with_labels=False)
    del batch["position_ids"]  # generate() derives them from the mask
    return batch


def training_batches(examples: Sequence[Encoded], batch_size: int, steps: int, seed: int, pad_id: int
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches, reshuffled every epoch with a seeded RNG (the same order for every variant)."""
    if len(examples) < batch_size:
        raise DataError(f"train split has {len(examples)} examples, fewer than train.batch_size={batch_size}")
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        take, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in take], pad_id)


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def response_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over response tokens, with the output head only on the last K positions."""
    labels = batch["labels"]
    has_target = (labels != IGNORE).any(0)
    if not bool(has_target.any()):
        raise DataError("a batch without response tokens")
    first = int(has_target.nonzero()[0])  # first position holding a target token
    keep = labels.shape[1] - first + 1     # logits at position p predict token p + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, -keep:]
    targets = torch.cat([labels[:, -keep + 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def mean_response_loss(model, examples: Sequence[Encoded], batch_size: int, pad_id: int, device) -> float:
    """Token-weighted mean response loss over `examples` (eval mode)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        n = int((batch["labels"] != IGNORE).sum())
        total += float(response_loss(model, batch)) * n
        count += n
    return total / count


@torch.no_grad()
def generate(model, tokenizer, examples: Sequence[Encoded], batch_size: int, max_new_tokens: int, device,
             progress=None) -> list[str]:
    """Greedy generations (decoded, special tokens dropped) for every example's prompt."""
    outputs: list[str] = []
    pad_id = tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in prompt_batch(chunk, pad_id).items()}
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(outputs))
    return outputs
