"""Generation: write the target text after a prompt (CodeXGLUE code-to-text, code2seq naming, code bodies).

Rows ``{"prompt", "target"}``; a row with ``"prompt_format": "completion"`` is continued as plain
text, others go through the chat template (:func:`deltatune.models.format_prompt`). The model is
the causal LM itself; the loss counts the target tokens only (the LM head in chunks where it can,
:mod:`.lm_loss`); greedy decoding, the rows batched through one key/value cache, each leaving as it
ends (:mod:`deltatune.tasks.decoding`); exact match, smoothed BLEU-4 and code2seq subtoken F1.
"""
from __future__ import annotations

from deltatune.errors import ConfigError
from deltatune.metrics import exact_match, smoothed_bleu4, subtoken_prf
from deltatune.models import format_prompt, load_backbone
from deltatune.tensors import to_device

from ..decoding import greedy, greedy_differs
from .base import TaskKind, register_kind, traceable
from .lm_loss import IGNORE, causal_lm_loss, head_in_chunks


@register_kind
class Generation(TaskKind):
    """Prompt (see models.format_prompt) then target + EOS; the loss counts the target tokens only."""

    name = "generation"
    columns = (("prompt", "target"), ())
    columns_rank = 2
    text_fields = ("prompt", "target")
    metric, metrics = "bleu4", ("bleu4", "exact_match")
    text_field = "prompt"
    model_form = "lm"
    endpoints = ("generate",)
    fixed_inputs = False  # each decoding step feeds new tokens

    @classmethod
    def check_model(cls, model_name) -> None:
        """Refuse, before anything is loaded or written, a model known not to generate."""
        if model_name in ("minilm", "tiny-bert"):
            raise ConfigError(f"{model_name} is an encoder and cannot generate; use smollm2, tiny-llama or tiny-gpt2")

    @classmethod
    def model(cls, model_name, num_labels):
        cls.check_model(model_name)
        return load_backbone(model_name, cls.model_form)

    @classmethod
    def new_tokens(cls, cfg) -> int:
        return cfg.max_new_tokens

    @classmethod
    def score(cls, task, predictions, split):
        """``predictions``: N strings. Exact match always; BLEU-4 and subtoken P/R/F1 where the task reports them."""
        rows = task.split(split)
        cls.check_count(task, predictions, rows, split)
        gold = [r["target"] for r in rows]
        preds = [str(p) for p in predictions]
        out = {"exact_match": exact_match(gold, preds)}
        if "bleu4" in task.metrics or task.metric == "bleu4":
            out["bleu4"] = smoothed_bleu4(gold, preds)
        if "subtoken_f1" in task.metrics:
            out.update(subtoken_prf(gold, preds))
        return out

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
        """Greedy continuations of the prompts, in their order: at most ``score_rows`` rows in flight over one
        key/value cache (default 4 x ``batch_size``, at most 32: a decode step is bound by reading the weights,
        so more rows cost little more per step; on SmolLM2, 40 rows scored 40 prompts in half the time 8 did,
        the same tokens), longest prompts first, each row leaving as it ends and the next taking its place
        (:func:`deltatune.tasks.decoding.greedy`: each row's tokens are what ``generate`` gives it alone).
        A model that cannot be decoded that way is decoded by ``generate`` in fixed batches."""
        batch_size = getattr(self.cfg, "score_rows", None) or min(32, 4 * batch_size)
        if greedy_differs(model) is not None:
            return self.predict_in_batches(model, examples, batch_size, device)
        tok = self.tokenizer
        ends = tok.eos_token_id if tok.eos_token_id is not None else \
            getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ends = {e for e in (ends if isinstance(ends, (list, tuple)) else [ends]) if e is not None}
        made = greedy(model, [e["input_ids"] for e in examples], max_new_tokens=self.cfg.max_new_tokens, eos=ends,
                      rows=batch_size, device=device)
        return [t.strip() for t in tok.batch_decode(made, skip_special_tokens=True)]

    def predict_in_batches(self, model, examples, batch_size, device):
        """``generate`` on fixed batches in the examples' order, each padded on the left to its longest prompt
        and run until its longest output ends."""
        texts = []
        for start in range(0, len(examples), batch_size):
            batch = to_device(self.pad(examples[start:start + batch_size], left=True), device)
            out = model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
            texts += self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def records(self, rows, predictions, task):
        return [{"index": i, **traceable(row), "input": row["prompt"], "reference": row["target"], "prediction": p}
                for i, (row, p) in enumerate(zip(rows, predictions))]
