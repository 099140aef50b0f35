"""The peer of `deltatune train --model smollm2 --task code-summarization --method lora`: the same
job written the usual Hugging Face way, `transformers.Trainer` + `peft` LoRA.

Same model (SmolLM2-135M-Instruct, float32), data (deltatune's code-summarization split, the same
seed and caps), tokens (chat-template prompt, then target + EOS; the loss counts the target only;
truncation to max_len keeps the target and up to half of max_len of the prompt's end, as deltatune
does), LoRA (r 8, alpha 16, no dropout, q_proj and v_proj), AdamW at the same learning rate with
linear warmup over 10 % of the steps then linear decay, gradient clipping at 1.0, batch 32.
With --eval, greedy decoding (max_new_tokens 64, left padding) on the test split, scored with the
task's own metric (smoothed BLEU-4).

    .venv/bin/python bench/peers/trainer_peft_generation.py --max-steps 3 --max-train 256 --max-eval 8

Prints one JSON line: peak RSS (MB), seconds per optimizer step (each step's wall time), losses,
and with --eval the test metric and the whole job's wall time.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

T0 = time.perf_counter()  # the whole job, imports included (as `deltatune train` is timed from the shell)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

from deltatune.models import _smollm2_dir  # noqa: E402  (the plain safetensors copy of SmolLM2 deltatune caches)
from deltatune.tasks import load_task  # noqa: E402  (the same examples deltatune trains and scores on)


def tokenize(tok, row: dict, max_len: int) -> dict:
    text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    target = tok(row["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    target = target[: max_len - min(len(prompt), max_len // 2)]
    if len(prompt) + len(target) > max_len:
        prompt = prompt[len(prompt) - (max_len - len(target)):]
    return {"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) + len(target)),
            "labels": [-100] * len(prompt) + target}


class StepTimes(TrainerCallback):
    def __init__(self):
        self.seconds, self.t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.seconds.append(time.perf_counter() - self.t)


def generate(model, tok, rows, batch_size: int, max_len: int, max_new_tokens: int) -> list[str]:
    tok.padding_side = tok.truncation_side = "left"  # a long prompt keeps its end, next to the answer
    out = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                         add_generation_prompt=True) for r in rows[i:i + batch_size]]
        enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out += [t.strip() for t in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)  # deltatune's LoRA default
    p.add_argument("--max-train", type=int)
    p.add_argument("--max-eval", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="score the test split after training")
    p.add_argument("--out", default="runs/peer-trainer-peft")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    task = load_task("code-summarization", seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)
    path = _smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    train = Dataset.from_list([tokenize(tok, r, args.max_len) for r in task.train])
    times = StepTimes()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.out, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
                               learning_rate=args.lr, weight_decay=0.0, warmup_steps=int(0.1 * args.max_steps),
                               lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                               report_to="none", use_cpu=True, seed=args.seed, dataloader_pin_memory=False),
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[times],
    )
    t_train = time.perf_counter()
    trainer.train()
    result = {"library": "transformers.Trainer + peft", "train_seconds": time.perf_counter() - t_train,
              "step_seconds": times.seconds, "step_seconds_median": statistics.median(times.seconds),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if args.eval:
        predictions = generate(model, tok, task.test, args.batch_size, args.max_len, 64)
        result.update({f"test_{k}": v for k, v in task.score(predictions).items()})
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["wall_seconds"] = time.perf_counter() - T0
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
