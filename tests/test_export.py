"""Adapters trained by the CLI leave it: they load onto the plain Hugging Face model, and `deltatune export`
writes them for peft, sentence-transformers, or merged into a plain model folder (tiny-bert, trained by the
CLI inside its task wrappers, BiEncoder and Classifier)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import deltatune as dt
from deltatune.errors import AdapterFileError
from deltatune.formats import native
from deltatune.models import load_backbone
from deltatune.tasks.kinds import build_task_model
from tests.test_cli import run
from tests.test_train import write_task

TEXTS = ["read a file into a string", "def add(a, b):\n    return a + b"]


def _train(root, kind: str, name: str) -> str:
    from deltatune import cli

    out = root / name
    task = write_task(root / f"task-{kind}", kind)
    code = cli.main(["train", "--model", "tiny-bert", "--task", task, "--method", "lora", "--max-steps", "2",
                     "--batch-size", "4", "--max-len", "16", "--lr", "0.05", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {"retrieval": _train(root, "retrieval", "search"), "classification": _train(root, "classification", "cls")}


def _hidden(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _wrapped(run_dir):
    """The BiEncoder the run trained, with its best adapter, in eval mode: (model, tokenizer)."""
    model, tokenizer = build_task_model("tiny-bert", "retrieval")
    dt.load_adapter(model, run_dir / "best")
    return model.eval(), tokenizer


def test_a_cli_adapter_loads_onto_the_plain_hugging_face_model(runs):
    config, tensors = dt.read_adapter(runs["retrieval"] / "best")
    assert config["keys"] == "backbone" and config["base"]["backbone_path"] == "backbone"
    assert tensors and not [k for k in tensors if "backbone" in k]  # the wrapper's prefix is not in the names
    wrapped, tokenizer = _wrapped(runs["retrieval"])
    plain, _ = load_backbone("tiny-bert")
    dt.load_adapter(plain, runs["retrieval"] / "best")
    assert not torch.equal(_hidden(plain.eval(), tokenizer), _hidden(load_backbone("tiny-bert")[0].eval(), tokenizer))
    torch.testing.assert_close(_hidden(plain, tokenizer), _hidden(wrapped.backbone, tokenizer), rtol=0, atol=0)
    # and back: saved from the plain model, loaded into the wrapper
    dt.save_adapter(plain, runs["retrieval"].parent / "from-plain")
    again, _ = build_task_model("tiny-bert", "retrieval")
    dt.load_adapter(again, runs["retrieval"].parent / "from-plain")
    torch.testing.assert_close(_hidden(again.eval().backbone, tokenizer), _hidden(wrapped.backbone, tokenizer),
                               rtol=0, atol=0)


def test_an_adapter_written_with_the_wrappers_prefix_still_loads_onto_the_plain_model(runs, tmp_path):
    from safetensors.torch import save as st_save

    wrapped, tokenizer = _wrapped(runs["retrieval"])
    tensors, config = native.adapter_tensors(wrapped)  # names from the wrapper, as files were written before
    assert any(k.startswith("delta.backbone:") for k in tensors) and "keys" not in config
    (tmp_path / native.WEIGHTS).write_bytes(st_save(tensors, metadata={"deltatune": json.dumps(config)}))
    plain, _ = load_backbone("tiny-bert")
    dt.load_adapter(plain, tmp_path)  # the fingerprint, too, is compared with the backbone where the file had it
    torch.testing.assert_close(_hidden(plain.eval(), tokenizer), _hidden(wrapped.backbone, tokenizer), rtol=0, atol=0)


def test_the_fingerprint_error_says_which_parts_of_the_base_differ(runs):
    plain, _ = load_backbone("tiny-bert")
    with torch.no_grad():
        plain.encoder.layer[1].output.dense.weight.mul_(1.01)
    with pytest.raises(AdapterFileError, match=r"1 of 4 parts differ \(encoder\.layer\.1; the others match\)"):
        dt.load_adapter(plain, runs["retrieval"] / "best")
    assert dt.adapters(plain) == []
    other, _ = load_backbone("tiny-bert")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    with pytest.raises(AdapterFileError, match="every part of the BertModel differs .*another checkpoint"):
        dt.load_adapter(other, runs["retrieval"] / "best")


def test_a_classifier_head_has_no_place_on_the_plain_model_and_says_so(runs):
    plain, _ = load_backbone("tiny-bert")
    with pytest.raises(AdapterFileError, match=r"carries a task head \(head\.bias, head\.weight\) trained in "
                                               r"Classifier.*heads=\{\}"):
        dt.load_adapter(plain, runs["classification"] / "best")
    heads = {}
    dt.load_adapter(plain, runs["classification"] / "best", heads=heads)
    assert sorted(heads) == ["head.head.bias", "head.head.weight"]


def test_export_peft_loads_in_peft_with_the_same_outputs(runs, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    code, out, err = run(capsys, "export", str(runs["retrieval"]), "--format", "peft", "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert "PeftModel.from_pretrained" in out
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "FEATURE_EXTRACTION"
    base, tokenizer = load_backbone("tiny-bert")
    in_peft = peft.PeftModel.from_pretrained(base.eval(), str(tmp_path / "p")).eval()
    wrapped, _ = _wrapped(runs["retrieval"])
    torch.testing.assert_close(_hidden(in_peft, tokenizer), _hidden(wrapped.backbone, tokenizer), rtol=1e-5, atol=1e-6)


def test_export_merged_is_a_plain_model_folder_with_the_adapter_folded_in(runs, tmp_path, capsys):
    from transformers import AutoModel, AutoTokenizer

    code, _, err = run(capsys, "export", str(runs["retrieval"]), "--format", "merged", "--out", str(tmp_path / "m"))
    assert code == 0, err
    merged = AutoModel.from_pretrained(tmp_path / "m").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    wrapped, _ = _wrapped(runs["retrieval"])
    torch.testing.assert_close(_hidden(merged, tokenizer), _hidden(wrapped.backbone, tokenizer), rtol=1e-5, atol=1e-6)


def test_export_sentence_transformers_encodes_as_the_bi_encoder(runs, tmp_path, capsys):
    st = pytest.importorskip("sentence_transformers")
    code, _, err = run(capsys, "export", str(runs["retrieval"]), "--format", "sentence-transformers",
                       "--out", str(tmp_path / "st"))
    assert code == 0, err
    encoded = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    wrapped, tokenizer = _wrapped(runs["retrieval"])
    with torch.no_grad():
        want = wrapped(**tokenizer(TEXTS, padding=True, return_tensors="pt"))
    torch.testing.assert_close(encoded, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["peft", "merged", "sentence-transformers"])
def test_export_refuses_a_classifier_head_naming_why(runs, tmp_path, capsys, fmt):
    code, _, err = run(capsys, "export", str(runs["classification"]), "--format", fmt, "--out", str(tmp_path / "x"))
    assert code == 2 and err.count("\n") == 1
    assert "classification head of Classifier (head.bias [2], head.weight [2, 32])" in err
    assert "no Hugging Face *ForSequenceClassification class computes" in err and "modules_to_save" in err
    assert not (tmp_path / "x").exists()


def test_export_of_an_adapter_folder_outside_a_run_asks_for_the_model(runs, tmp_path, capsys):
    shutil.copytree(runs["retrieval"] / "best", tmp_path / "bare")
    code, _, err = run(capsys, "export", str(tmp_path / "bare"), "--format", "merged", "--out", str(tmp_path / "m"))
    assert code == 2 and "pass --model NAME" in err
    code, _, err = run(capsys, "export", str(tmp_path / "bare"), "--format", "merged", "--out", str(tmp_path / "m"),
                       "--model", "tiny-bert")
    assert code == 0, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    code, _, err = run(capsys, "export", str(runs["retrieval"]), "--format", "peft", "--out", str(tmp_path / "full"))
    assert code == 2 and "not an empty folder" in err and (tmp_path / "full" / "mine.txt").read_text() == "keep"
