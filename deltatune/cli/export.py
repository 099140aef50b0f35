"""`deltatune export`: an adapter in a form other tools load without deltatune.

The adapter (a run folder's best/ adapter, or an adapter folder in deltatune's or the PEFT format) is loaded
onto the plain Hugging Face model it was trained from, which deltatune's adapter files allow whatever task
wrapper trained them, and written from there:

* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` for ``peft.PeftModel.from_pretrained``
  (lora, ia3, prompt, prefix; deltatune.formats.peft says what converts exactly and what is refused);
* ``sentence-transformers``: the merged encoder, mean pooling and normalisation, as deltatune's bi-encoder
  computes them, for ``SentenceTransformer(DIR)``;
* ``merged``: the model with the adapter folded into its weights and its tokenizer, for
  ``AutoModel.from_pretrained(DIR)`` (or the model's own class).

A classifier's head is refused by each: deltatune's Classifier pools the hidden states its own way (mean
over the tokens on encoders, the last real token on decoders) and adds a biased linear layer, which no
Hugging Face ``*ForSequenceClassification`` class computes, so neither peft's ``modules_to_save`` (modules
of the Hugging Face model) nor a plain model folder can carry it.
"""
from __future__ import annotations

from pathlib import Path

from deltatune.errors import ConfigError

NAME, HELP = "export", "write an adapter for peft, sentence-transformers, or merged into a plain model folder"

FORMATS = {
    "peft": "a PEFT adapter folder: PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), DIR)",
    "sentence-transformers": "a sentence-transformers model, the adapter merged: SentenceTransformer(DIR)",
    "merged": "the model with the adapter folded into its weights, and its tokenizer: AutoModel.from_pretrained(DIR)",
}


def add_arguments(p) -> None:
    p.add_argument("adapter", metavar="ADAPTER", help="the --out of `deltatune train` (its best/ adapter), or an "
                   "adapter folder in deltatune's or the PEFT format")
    p.add_argument("--format", required=True, choices=list(FORMATS),
                   help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument("--out", required=True, metavar="DIR", help="the new folder to write (refused if it holds files)")
    p.add_argument("--model", help="the model the adapter was trained on (default: the run's, from its run.json; "
                   "needed for an adapter folder outside a run)")
    p.add_argument("--max-seq-length", type=int, metavar="N", help="sentence-transformers: truncate inputs to N "
                   "tokens (default: the model's own configured maximum, e.g. 256 for minilm, else its positions)")


def run(args) -> int:
    import deltatune as dt
    from deltatune.models import configured_max_len, load_backbone
    from deltatune.training.runs import find_run_json, read_run_json, resolve_adapter

    adapter = resolve_adapter(args.adapter)
    run_json = find_run_json(adapter)
    model_name = args.model or (read_run_json(run_json).get("model") if run_json else None)
    if not model_name:
        raise ConfigError(f"{args.adapter} is not a run folder of `deltatune train` (no run.json in it or its parents), "
                          "so the model it was trained on is unknown: pass --model NAME")
    from deltatune.interop.sbert import check_new

    out = check_new(args.out, "--out")
    _refuse_head(adapter, args.format)
    model, tokenizer = load_backbone(model_name, "base" if args.format == "sentence-transformers" else None)
    dt.load_adapter(model, adapter)  # onto the plain model: the file's names are relative to the backbone
    if args.format == "peft":
        dt.save_adapter(model, out, format="peft")
    elif args.format == "merged":
        from deltatune.interop.sbert import export_merged
        export_merged(model, tokenizer, out)
    else:
        from deltatune.interop.sbert import export_sentence_transformer
        length = args.max_seq_length or configured_max_len(model_name)
        export_sentence_transformer(model, tokenizer, out, max_seq_length=length)
    print(f"wrote {out} ({args.format}) from {adapter} on {model_name}: {FORMATS[args.format].split(': ', 1)[1]}")
    return 0


def _refuse_head(adapter: Path, fmt: str) -> None:
    """A classifier's head has no place in any of the formats (see the module docstring): refused, saying why."""
    import deltatune as dt

    if dt.formats.format_of(adapter) != "deltatune":
        return  # a PEFT folder: its modules_to_save already belong to a Hugging Face model
    config, tensors = dt.read_adapter(adapter)
    head = {k[len("head."):]: tuple(t.shape) for k, t in tensors.items() if k.startswith("head.")}
    if not head:
        return
    shown = ", ".join(f"{k} {list(s)}" for k, s in sorted(head.items()))
    where = config["base"].get("model_class") or "a task model"
    raise ConfigError(
        f"{adapter} carries the classification head of {where} ({shown}): deltatune pools the hidden states its "
        "own way (mean over the tokens on encoders, the last real token on decoders) and adds a linear layer with "
        f"a bias, which no Hugging Face *ForSequenceClassification class computes, so a {fmt} export has no module "
        "to carry it (peft's modules_to_save names modules of the Hugging Face model). Keep the adapter folder "
        "itself (deltatune's format, head included) and load it with dt.load_adapter onto "
        "deltatune.tasks.kinds.build_task_model(MODEL, 'classification', NUM_LABELS)[0]")
