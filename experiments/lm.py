"""Causal-LM tasks on decoders: tokenizing prompt + answer (or whole texts), the loss on the
answer tokens, and the scores: greedy-generation exact match, label-word likelihood, perplexity.

``task.objective=answer``: each example is ``prompt`` (``task.prompt`` with the text in it) and
an answer (the label's word, or a file's response), tokenized as ``prompt ids + answer ids +
eos``; the loss is the mean next-token cross-entropy over the answer tokens and eos only.
``task.objective=corpus``: each text (truncated to ``task.max_len``) + eos, every token scored.
Sequences are right-padded: with causal attention, padding after a token never changes it.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from .metrics import classification_metrics

IGNORE = -100                 # label of a position that is not scored (F.cross_entropy's default)


def special_ids(tok) -> tuple[int, int]:
    """(eos, pad) token ids; a BERT-style tokenizer (the tiny decoders') ends on [SEP]."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise ValueError("the tokenizer has neither an eos nor a sep token to end answers with")
    return eos, tok.pad_token_id if tok.pad_token_id is not None else eos


def label_words(task_cfg, label_names: List[str]) -> List[str]:
    words = list(task_cfg.label_words or label_names)
    if len(words) != len(label_names):
        raise ValueError(f"task.label_words has {len(words)} words for {len(label_names)} labels "
                         f"{label_names}; give one word per label, in that order")
    return words


def _ids(tok, text: str, limit: Optional[int] = None) -> List[int]:
    if not text:
        return []
    cut = {} if limit is None else {"truncation": True, "max_length": max(limit, 1)}
    return tok(text, add_special_tokens=False, **cut)["input_ids"]


def tokenize_lm(tok, examples, task_cfg, words: Optional[List[str]]) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (IGNORE off the scored
    tokens), ``prompt_len`` and ``class`` (the label id, -1 without label words), all rows
    ``task.max_len`` long. A long text is cut so that the template and the answer always fit."""
    eos, pad = special_ids(tok)
    L = task_cfg.max_len
    pre, post = task_cfg.prompt.split("{text}", 1)
    pre_ids, post_ids = _ids(tok, pre), _ids(tok, post)
    rows, labels, plen, cls = [], [], [], []
    for e in examples:
        if task_cfg.objective == "corpus":
            ids = _ids(tok, e.text, L - 1)[:L - 1] + [eos]
            rows.append(ids), labels.append(list(ids)), plen.append(0), cls.append(-1)
            continue
        answer = e.response if getattr(e, "response", None) is not None else words[e.label]
        ans = (_ids(tok, " " + answer.strip()) + [eos])[:max(1, L - len(pre_ids) - len(post_ids) - 1)]
        room = max(0, L - len(pre_ids) - len(post_ids) - len(ans))
        prompt = (pre_ids + _ids(tok, e.text, room)[:room] + post_ids)[-(L - len(ans)):]
        rows.append(prompt + ans), labels.append([IGNORE] * len(prompt) + ans)
        plen.append(len(prompt)), cls.append(e.label if words is not None else -1)
    n = len(rows)
    out = {"input_ids": torch.full((n, L), pad, dtype=torch.long),
           "attention_mask": torch.zeros((n, L), dtype=torch.long),
           "labels": torch.full((n, L), IGNORE, dtype=torch.long),
           "prompt_len": torch.tensor(plen, dtype=torch.long),
           "class": torch.tensor(cls, dtype=torch.long)}
    for i, (r, y) in enumerate(zip(rows, labels)):
        out["input_ids"][i, :len(r)] = torch.tensor(r)
        out["attention_mask"][i, :len(r)] = 1
        out["labels"][i, :len(y)] = torch.tensor(y)
    return out


def scored(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(select (B, L), targets (T,)): the positions whose next token is scored (position t
    predicts token t+1) and those tokens, in row-major order."""
    keep = labels[:, 1:] != IGNORE
    return F.pad(keep, (0, 1)), labels[:, 1:][keep]


def lm_loss(model, b: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored tokens of the batch."""
    select, targets = scored(b["labels"])
    return F.cross_entropy(model(b["input_ids"], b["attention_mask"], select).float(), targets)


def lm_loss_every_position(model, b: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``lm_loss`` with the output layer on every position and the unscored targets ignored: no
    boolean indexing, whose size the host must read, so a captured CUDA graph can hold it. The
    same mean; (B·L, V) logits instead of (T, V)."""
    targets = F.pad(b["labels"][:, 1:], (0, 1), value=IGNORE)            # (B, L): position t predicts t+1
    logits = model(b["input_ids"], b["attention_mask"], None)             # (B, L, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def row_sums(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """(B,) sums of the per-position ``values`` (T,) of each row of ``select`` (B, L)."""
    rows = select.nonzero()[:, 0]
    return torch.zeros(select.shape[0], dtype=values.dtype, device=values.device).index_add_(
        0, rows, values)


@torch.no_grad()
def greedy(model, b: Dict[str, torch.Tensor], steps: int, eos: int, pad: int) -> torch.Tensor:
    """(B, steps) greedy continuations of each row's prompt (its first prompt_len tokens), pad
    after eos. No cache: every step re-reads the right-padded rows, whose real positions and
    hence logits do not depend on the padding (causal attention)."""
    lens = b["prompt_len"].clone()
    B, dev = lens.shape[0], lens.device
    width0 = int(lens.max())
    ids = torch.full((B, width0 + steps), pad, dtype=torch.long, device=dev)
    prompt = torch.arange(width0, device=dev)[None] < lens[:, None]
    ids[:, :width0] = torch.where(prompt, b["input_ids"][:, :width0], pad)
    out = torch.full((B, steps), pad, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    for t in range(steps):
        width = int(lens.max())
        pos = torch.arange(width, device=dev)[None]
        last = pos == (lens - 1)[:, None]                       # one position per row
        nxt = model(ids[:, :width], (pos < lens[:, None]).long(), last).argmax(-1)
        nxt = torch.where(done, pad, nxt)
        out[:, t] = nxt
        ids[rows, lens] = torch.where(done, ids[rows, lens], nxt)
        lens = lens + (~done).long()
        done = done | (nxt == eos)
        if bool(done.all()):
            break
    return out


def choice_logprobs(model, b: Dict[str, torch.Tensor], word_ids: List[List[int]]) -> torch.Tensor:
    """(B, K): log p(word k | prompt), summed over the word's tokens (no eos), for each row."""
    lens, B = b["prompt_len"], b["prompt_len"].shape[0]
    dev, out = lens.device, []
    for w in word_ids:
        width = int(lens.max()) + len(w)
        ids = torch.zeros((B, width), dtype=torch.long, device=dev)
        keep = min(width, b["input_ids"].shape[1])
        ids[:, :keep] = b["input_ids"][:, :keep]
        pos = lens[:, None] + torch.arange(len(w), device=dev)[None]
        word = torch.tensor(w, device=dev).expand(B, -1)
        ids.scatter_(1, pos, word)
        labels = torch.full_like(ids, IGNORE).scatter_(1, pos, word)
        mask = (torch.arange(width, device=dev)[None] < (lens + len(w))[:, None]).long()
        select, targets = scored(labels)
        nll = F.cross_entropy(model(ids, mask, select).float(), targets, reduction="none")
        out.append(-row_sums(nll, select))
    return torch.stack(out, 1)


class CausalLMObjective:
    """Loss on the scored tokens. Scores: ``loss`` (mean per scored token), ``perplexity``
    (its exp); answer tasks add ``exact_match`` (greedy answer = reference, after strip and
    casefold), and with label words ``accuracy``, ``macro_f1``, ``mcc`` of the most likely
    word (summed log-probability of its tokens, as lm-eval-harness's acc)."""

    def __init__(self, tokenizer, kind: str, words: Optional[List[str]], every_position: bool = False):
        # every_position: the training loss in lm_loss_every_position's form (trainer.step_graph)
        self.tok, self.kind, self.words, self.every_position = tokenizer, kind, words, every_position
        self.eos, self.pad = special_ids(tokenizer)
        self.word_ids = None if words is None else [_ids(tokenizer, " " + w.strip()) for w in words]

    def loss(self, fwd, b: Dict[str, torch.Tensor]) -> torch.Tensor:
        return (lm_loss_every_position if self.every_position else lm_loss)(fwd, b)

    def _text(self, ids) -> str:
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(self.eos)] if self.eos in ids else ids
        return self.tok.decode(ids, skip_special_tokens=True).strip().casefold()

    def evaluate(self, model, batches: Iterable[Dict[str, torch.Tensor]],
                 autocast: Callable) -> Dict[str, float]:
        nll, count, hits, n, preds, truth = 0.0, 0, 0, 0, [], []
        for b in batches:
            select, targets = scored(b["labels"])
            with autocast():
                logits = model(b["input_ids"], b["attention_mask"], select)
            nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            count += targets.numel()
            n += b["labels"].shape[0]
            if self.kind != "answer":
                continue
            n_answer = (b["labels"] != IGNORE).sum(1)       # answer tokens + eos, per row
            with autocast():
                gen = greedy(model, b, int(n_answer.max()), self.eos, self.pad).cpu()
            for i in range(gen.shape[0]):       # each row sees as many tokens as its answer + 1
                ref = b["labels"][i][b["labels"][i] != IGNORE].cpu()
                hits += self._text(gen[i, :int(n_answer[i])]) == self._text(ref)
            if self.word_ids is not None:
                with autocast():
                    preds.append(choice_logprobs(model, b, self.word_ids).argmax(-1).cpu())
                truth.append(b["class"].cpu())
        loss = nll / max(count, 1)
        m = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        if self.kind == "answer":
            m["exact_match"] = hits / max(n, 1)
        if preds:
            m.update(classification_metrics(torch.cat(truth).numpy(), torch.cat(preds).numpy(),
                                            len(self.words)))
        return m
