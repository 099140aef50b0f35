"""Task objectives: how each task kind tokenises its examples, its loss, and the predictions its task scores.

One small class per kind (retrieval, classification, generation); the training loop (``train.py``) and
``evaluate`` use them through ``OBJECTIVES``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn import functional as F

from deltatune.lengths import forward_by_length, groups
from deltatune.models import format_prompt
from deltatune.tensors import to_device





def _traceable(row: dict) -> dict:
    """The identifying fields an example may carry (its source path, the function's name)."""
    return {k: row[k] for k in ("id", "path", "name") if isinstance(row.get(k), (str, int))}


CHARS_PER_TOKEN = 128  # above the longest token of a BPE or WordPiece vocabulary (a WordPiece word is cut at 100)


class _Objective:
    # Does the loss of a row depend on the other rows of the batch (in-batch negatives)? Data-parallel
    # training then gathers every rank's rows (distributed.backward).
    in_batch = False
    """Tokenising is shared: inputs longer than max_len are truncated and counted for one warning."""

    def __init__(self, tokenizer, cfg):
        self.tokenizer, self.max_len, self.cfg = tokenizer, cfg.max_len, cfg
        self.truncated = self.seen = 0

    def tokens(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """One dict of token lists per text (input_ids, attention_mask, and token_type_ids if used)."""
        if not texts:
            return []
        texts, pairs = [self.clip(t) for t in texts], (pairs and [self.clip(t) for t in pairs])
        encoded = self.tokenizer(texts, pairs, verbose=False)
        rows = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
        long = [i for i, row in enumerate(rows) if len(row["input_ids"]) > self.max_len]
        if long:  # tokenise those again with truncation, so that special tokens stay in place
            again = self.tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                                   truncation=True, max_length=self.max_len, verbose=False)
            for j, i in enumerate(long):
                rows[i] = {k: again[k][j] for k in again.keys()}
        self.count(len(long), len(rows))
        return rows

    def clip(self, text: str, keep_end: bool = False) -> str:
        """At most CHARS_PER_TOKEN x max_len characters: a text that long is over max_len tokens anyway, and
        the tokenizer's memory grows with the whole text (a 5 MB line alone took 2.3 GB)."""
        limit = CHARS_PER_TOKEN * self.max_len
        return text if len(text) <= limit else text[-limit:] if keep_end else text[:limit]

    def count(self, truncated: int, seen: int) -> None:
        self.truncated, self.seen = self.truncated + truncated, self.seen + seen

    def warn_truncated(self, stacklevel: int) -> None:
        if self.truncated:
            warnings.warn(f"{self.truncated} of {self.seen} inputs were longer than max_len={self.max_len} "
                          "tokens and were truncated; raise max_len to keep them whole", stacklevel=stacklevel + 1)
        self.truncated = self.seen = 0

    def units(self, model, examples: list) -> int:
        """What the loss is a mean over in ``examples``: one unit per example (generation: target tokens)."""
        return len(examples)

    def pad(self, rows: list[dict], left: bool = False) -> dict:
        """Stack token lists into (B, T) tensors, padding on the right (or the left, for generate)."""
        width = max(len(row["input_ids"]) for row in rows)
        fill = {"input_ids": self.tokenizer.pad_token_id, "labels": -100}
        out = {}
        for key in rows[0]:
            padded = [[fill.get(key, 0)] * (width - len(row[key])) for row in rows]
            out[key] = torch.tensor([p + row[key] if left else row[key] + p for p, row in zip(padded, rows)])
        return out


class Retrieval(_Objective):
    """In-batch negatives: each query's code is the positive, the other codes of the batch are negatives."""

    scale = 20.0  # cosine similarity x 20, MiniLM's own training temperature (0.05)
    in_batch = True

    def encode(self, rows, train):
        return list(zip(self.tokens([r["query"] for r in rows]), self.tokens([r["code"] for r in rows])))

    def collate(self, examples):
        return self.pad([q for q, _ in examples]), self.pad([c for _, c in examples])

    # Rows per forward in training: length-sorted groups, each cut to its longest row (deltatune.lengths);
    # None: the whole padded batch at once. Groups of 16 took 0.69x the padded batch's step time on a quiet
    # 2-core CPU (bench/jobs.py ab, docs/bench/jobs-ab.txt); the loss is the padded batch's to float rounding.
    group = 16

    def loss(self, model, batch):
        queries, codes = forward_by_length(model, batch[0], self.group), forward_by_length(model, batch[1], self.group)  # (B, d)
        logits = self.scale * queries @ codes.T  # (B, B): row i's positive is column i
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def predict(self, model, examples, batch_size, device):
        def embed(rows):  # batches of rows of similar length (no wasted padding), returned in the rows' order
            if not rows:
                return np.zeros((0, 0), dtype=np.float32)
            batches = groups([len(r["input_ids"]) for r in rows], batch_size)
            out = torch.cat([model(**to_device(self.pad([rows[i] for i in idx]), device)).float().cpu() for idx in batches])
            return out[torch.argsort(torch.tensor([i for idx in batches for i in idx]))].numpy()

        return embed([q for q, _ in examples]), embed([c for _, c in examples])

    def records(self, rows, predictions, task):
        """Per query: the code ranked first among all the split's codes, and the rank of the first
        right code among them (cosine similarity; ties count against; the codes of identical
        queries all count as right, as in the metric). ``candidates`` is that pool: the whole split,
        which is the metric's pool unless the split is larger than it."""
        q, c = (np.nan_to_num(np.asarray(x, dtype=np.float64)) for x in predictions)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        ids = {}
        group = np.array([ids.setdefault(r["query"], len(ids)) for r in rows], dtype=np.int64)
        out = []
        for start in range(0, len(q), 256):  # chunks keep memory at 256 x N
            sims = q[start:start + 256] @ c.T
            right = group[start:start + len(sims), None] == group[None, :]
            best = np.where(right, sims, -np.inf).max(axis=1)
            ranks, top = 1 + ((sims >= best[:, None]) & ~right).sum(axis=1), sims.argmax(axis=1)
            for j in range(len(sims)):
                row, best = rows[start + j], int(top[j])
                out.append({"index": start + j, **_traceable(row), "input": row["query"], "reference": row["code"],
                            "prediction": rows[best]["code"], "prediction_index": best,
                            "rank": int(ranks[j]), "candidates": len(c)})
        return out


class Classification(_Objective):
    def encode(self, rows, train):
        pairs = [r.get("text_pair", "") for r in rows] if any("text_pair" in r for r in rows) else None
        return list(zip(self.tokens([r["text"] for r in rows], pairs), [r["label"] for r in rows]))

    def collate(self, examples):
        return self.pad([x for x, _ in examples]), torch.tensor([y for _, y in examples])

    def loss(self, model, batch):
        inputs, labels = batch
        return F.cross_entropy(model(**inputs).float(), labels)

    def predict(self, model, examples, batch_size, device):
        rows = [x for x, _ in examples]
        return [int(i) for start in range(0, len(rows), batch_size)
                for i in model(**to_device(self.pad(rows[start:start + batch_size]), device)).argmax(-1).tolist()]

    def records(self, rows, predictions, task):
        names = task.labels or []

        def name(label):
            return names[label] if isinstance(label, int) and 0 <= label < len(names) else label

        return [{"index": i, **_traceable(row), "input": row["text"],
                 **({"input_pair": row["text_pair"]} if "text_pair" in row else {}),
                 "reference": name(row["label"]), "prediction": name(int(p))}
                for i, (row, p) in enumerate(zip(rows, predictions))]


class Generation(_Objective):
    """Prompt (see models.format_prompt) then target + EOS; the loss counts the target tokens only."""

    def units(self, model, examples: list) -> int:
        skip = 0 if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else 1  # causal LMs shift
        return sum(sum(1 for t in ex["labels"][skip:] if t != IGNORE) for ex in examples)

    def encode(self, rows, train):
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        prompts = [tok(self.prompt_text(r), add_special_tokens=False, verbose=False)["input_ids"] for r in rows]
        if not train:  # the prompt alone, keeping its end when it is too long
            self.count(sum(len(p) > self.max_len for p in prompts), len(prompts))
            return [{"input_ids": p[-self.max_len:], "attention_mask": [1] * len(p[-self.max_len:])} for p in prompts]
        out, truncated = [], 0
        for prompt, row in zip(prompts, rows):
            target = tok(self.clip(row["target"]), add_special_tokens=False, verbose=False)["input_ids"] + [eos]
            truncated += len(prompt) + len(target) > self.max_len
            # Over-long: the target keeps up to max_len minus (up to half of max_len) of the prompt's end.
            target = target[: self.max_len - min(len(prompt), self.max_len // 2)]
            prompt = prompt[len(prompt) - (self.max_len - len(target)):] if len(prompt) + len(target) > self.max_len else prompt
            out.append({"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
                        "labels": [-100] * len(prompt) + target})
        self.count(truncated, len(rows))
        return out

    def prompt_text(self, row: dict) -> str:
        """The text before the answer: the chat-formatted prompt, or the prompt itself for rows marked
        ``"prompt_format": "completion"`` (code the model continues, as HumanEval is evaluated)."""
        text = self.clip(row["prompt"], keep_end=True)
        return text if row.get("prompt_format") == "completion" else format_prompt(self.tokenizer, text)

    def collate(self, examples):
        return self.pad(examples)

    def loss(self, model, batch):
        if getattr(self.cfg, "full_logits", False) or not head_in_chunks(model):
            return model(**batch).loss  # logits (B, T, vocab) at every position
        return causal_lm_loss(model, batch)

    def predict(self, model, examples, batch_size, device):
        texts = []
        for start in range(0, len(examples), batch_size):
            batch = to_device(self.pad(examples[start:start + batch_size], left=True), device)
            out = model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
            texts += self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def records(self, rows, predictions, task):
        return [{"index": i, **_traceable(row), "input": row["prompt"], "reference": row["target"], "prediction": p}
                for i, (row, p) in enumerate(zip(rows, predictions))]


# ------------------------------------------------------------------ the LM head in chunks

IGNORE = -100  # a label that does not count (the prompt, padding), as in transformers
CHUNK_LOGITS = 2**23  # logits per chunk (rows x vocab): 32 MiB in float32, 170 rows of SmolLM2's 49152


def head_in_chunks(model) -> bool:
    """Whether ``model``'s training loss may be computed by :func:`causal_lm_loss`: a decoder-only
    causal LM (GPT-2 or Llama family) whose logits are a plain Linear head over its backbone's
    last hidden state, with no hook on the head or around the whole model that could change them."""
    from transformers import PreTrainedModel

    from deltatune.sites import FAMILY_OF

    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or getattr(config, "is_encoder_decoder", False):
        return False
    if FAMILY_OF.get(getattr(config, "model_type", None)) not in ("gpt2", "llama") or model.base_model is model:
        return False
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return False  # logits post-processed after the head
    head = model.get_output_embeddings()
    hooked = lambda m: m._forward_hooks or m._forward_pre_hooks  # noqa: E731
    return type(head) is torch.nn.Linear and not hooked(head) and not hooked(model) and not _functorch_transform()


def _functorch_transform() -> bool:
    """Inside vmap or grad (private training's per-example gradients): selecting positions by the
    labels' values has a data-dependent shape, which these transforms cannot batch."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def causal_lm_loss(model, batch: dict, chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """The causal-LM loss of ``model(**batch).loss`` (mean cross-entropy of each position's logits
    against the next position's label, labels of IGNORE left out) without the (B, T, vocab) logits:
    the backbone's last hidden states are taken only at the positions whose next label counts, and
    the head and the loss run over them ``chunk_logits`` logits at a time (see linear_cross_entropy).
    A batch with no label that counts gives 0 (the plain path: NaN)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs, use_cache=False)[0]  # (B, T, d): last_hidden_state
    counted = labels[:, 1:] != IGNORE  # position t predicts the label at t + 1
    head = model.get_output_embeddings()
    return linear_cross_entropy(hidden[:, :-1][counted], head.weight, head.bias, labels[:, 1:][counted], chunk_logits)


def linear_cross_entropy(hidden, weight, bias, targets, chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` for hidden (N, d), weight
    (V, d), bias (V,) or None, targets (N,), holding at most ``chunk_logits`` logits at a time."""
    rows = max(1, chunk_logits // weight.shape[0])
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, needs)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of a linear layer's logits, chunk by chunk of rows. The gradients with
    respect to hidden, weight and bias are computed in the forward pass, chunk by chunk (d loss /
    d logits = (softmax - one_hot) / N), so no chunk's logits outlive its turn; backward only scales
    them by the incoming gradient. Logits and softmax are float32, as transformers' loss upcasts
    them (float64 for a float64 model); the matrix products run in whatever dtype autocast gives them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, needs):
        need_h, need_w, need_b = needs
        n = hidden.shape[0]
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for a float64 model
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=dtype) if need_b else None
        total = hidden.new_zeros((), dtype=dtype)
        for start in range(0, n, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = F.linear(h, weight, bias).to(dtype)  # (rows, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not any(needs):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(t), device=t.device), t] -= 1.0
            g /= n
            if need_b:
                grad_b += g.sum(0)
            g = g if torch.is_autocast_enabled(g.device.type) else g.to(weight.dtype)  # autocast casts for itself
            if need_h:
                grad_h[start:start + rows] = g @ weight
            if need_w:
                grad_w += g.T @ h
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.needs, ctx.dtypes = needs, (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / max(n, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dtype) if need else None for need, dtype in zip(ctx.needs, ctx.dtypes)]
        return (*grads, None, None, None)


OBJECTIVES = {"retrieval": Retrieval, "classification": Classification, "generation": Generation}
