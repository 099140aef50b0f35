import torch

from ..combine import PREFIX_KV
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..deltas import PrefixReparam, PrefixTable
from ..sites import attention_shape, family_of, resolve


@register
class Prefix(Method):
    """Trainable key/value prefixes of length l at every attention: K <- [P_K; K], V <- [P_V; V].

    Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", §4.3. During
    training P = MLP(P') (tanh, hidden 512), one MLP producing every layer's prefix as in the paper; ``dt.save_adapter`` folds the MLP
    away and stores only the table. l = 10 (table-to-text; 200 for summarisation). Works with
    padding, causal masks and generate()'s key/value cache. Not mergeable.

    Positions: the prefix is a set of key/value pairs with no position of its own, and the real tokens
    keep positions 0..T-1. In the paper's sequence [PREFIX; x; y] (and in its code and peft, which
    pass the prefix as past_key_values) the real tokens sit at n..n+T-1. With rotary positions the
    two are the same function once the prefix keys are rotated by their positions (the PEFT
    conversion does that); with learned absolute positions (GPT-2, BERT, BART) they differ, and the
    paper's placement is had by passing ``position_ids = arange(n, n + T)``
    (tests/test_interop.py::test_prefix_refusal_reason_is_the_position_shift checks that this then
    equals peft's outputs). Kept at 0..T-1 because the input then sees the positions it was
    pretrained on and keeps the whole position table (a length-200 prefix would cost BART 200 of
    its 1024).
    """

    name = "prefix"
    paper = "Li & Liang 2021, Prefix-Tuning"
    lr = 5e-4
    identity_at_init = False
    combines = (PREFIX_KV,)
    deviations = ("the real tokens keep positions 0..T-1 (the paper's code and peft put them after the prefix, "
                  "at n..n+T-1): the same function under rotary positions once the prefix keys are rotated, a "
                  "different one under learned absolute positions (GPT-2, BERT, BART); pass position_ids = "
                  "arange(n, n + T) for the paper's placement.")

    length: int = option(10, min=1)
    hidden: int = option(512, min=0, help="MLP reparameterisation width; 0 trains the table directly")
    sites: list = option(["attn.kv"])

    def folded_options(self) -> dict:
        return {**self.options(), "hidden": 0}

    def placements(self, model):
        d_model, _, kv_heads, head_dim = attention_shape(model)
        targets = self.targets(model, self.sites)
        width = 2 * kv_heads * head_dim
        reparam = PrefixReparam(self.length, d_model, self.hidden, len(targets), width) if self.hidden else None
        return [Placement(t, PrefixTable(self.length, kv_heads, head_dim, reparam, i), PREFIX_KV)
                for i, t in enumerate(targets)]

    # -- the Hugging Face PEFT format (peft 0.21 PREFIX_TUNING); ``peft``: deltatune.formats.peft.Bridge
    peft_type = "PREFIX_TUNING"

    def to_peft(self, peft, deltas):
        """``prompt_embeddings`` (num_virtual_tokens, num_layers * 2 * kv_heads * head_dim): per token,
        layer after layer, the keys then the values, each (kv_heads, head_dim). peft passes the prefix as
        ``past_key_values``, so the real tokens sit at positions n..n+T-1; deltatune leaves them at
        0..T-1. Under rotary embeddings (the llama family) that is the same function once the prefix keys
        are rotated by n positions, which the conversion does; elsewhere it is refused (``_PEFT_REFUSED``)."""
        _peft_check(peft, "export to PEFT")
        if self.sites != ["attn.kv"] or self.layers is not None:
            raise ConfigError("peft's prefix covers the attention of every layer; this prefix adapter is at "
                              f"sites={self.sites}, layers={self.layers}")
        _, _, kv_heads, head_dim = attention_shape(peft.model)
        layer_of = {t.name: t.layer for t in resolve(peft.model, "attn.kv")}
        tables = sorted((layer_of[m], params["table"]) for m, _, params in deltas)
        if [i for i, _ in tables] != sorted(set(layer_of.values())):
            raise ConfigError("peft's prefix needs one table per layer")
        parts = []
        for _, table in tables:
            kv = table.reshape(self.length, 2, kv_heads, head_dim).clone()
            kv[:, 0] = peft.rotate_keys(kv[:, 0], self.length)  # peft's tokens sit n positions later
            parts.append(kv.reshape(self.length, -1))
        return {"prompt_embeddings": torch.cat(parts, dim=1)}, {
            **peft.prompt_fields(self.length), "num_attention_heads": kv_heads,
            "token_dim": kv_heads * head_dim, "encoder_hidden_size": attention_shape(peft.model)[0],
            "prefix_projection": False}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        _peft_check(peft, "load")
        if config.get("num_transformer_submodules") not in (None, 1):
            raise ConfigError("num_transformer_submodules must be 1 for a decoder-only model's prefix")
        if set(tensors) != {"prompt_embeddings"}:
            raise ConfigError("a prefix adapter holds prompt_embeddings only")
        n = peft.get(config, "num_virtual_tokens", int, None)
        _, _, kv_heads, head_dim = attention_shape(peft.model)
        targets = sorted(resolve(peft.model, "attn.kv"), key=lambda t: t.layer)
        width = 2 * kv_heads * head_dim
        table = tensors["prompt_embeddings"]
        if not n or n < 1 or tuple(table.shape) != (n, len(targets) * width):
            raise ConfigError(f"prompt_embeddings {tuple(table.shape)} do not fit {n} virtual tokens x {len(targets)} "
                              f"layers x 2 x {kv_heads} kv heads x {head_dim} dims")
        deltas = {}
        for i, t in enumerate(targets):
            kv = table[:, i * width:(i + 1) * width].reshape(n, 2, kv_heads, head_dim).clone()
            kv[:, 0] = peft.rotate_keys(kv[:, 0], -n)  # back from peft's positions n.. to deltatune's 0..
            deltas[peft.key(t.name) + ".table"] = kv.reshape(n, width)
        return {"length": n, "hidden": 0, "sites": ["attn.kv"]}, deltas


# Families where peft 0.21's prefix computes something else than deltatune's, so no conversion is exact.
_PEFT_REFUSED = {
    "gpt2": "with learned absolute positions peft's prefix (past_key_values) moves the real tokens to positions "
            "n..n+T-1 while deltatune keeps them at 0..T-1, so the same tables give different outputs; no "
            "rewrite of the tables makes them agree (only rotary positions, the llama family, can be converted)",
    "bert": "peft's prefix tuning needs past_key_values, which this transformers version's encoder-only models "
            "do not accept (peft raises 'Model does not support past key values')",
    "bart": "peft 0.21's prefix on encoder-decoders reaches only the decoder self-attention, gives every decoder "
            "layer the first layer's slice of its table and moves the decoder tokens' learned positions by n, "
            "while deltatune's prefix is at every attention (encoder, decoder, cross); the outputs differ",
    "t5": "peft 0.21's prefix on encoder-decoders reaches only the decoder self-attention, gives every decoder "
          "layer the first layer's slice of its table and gives the prefix keys a relative position bias, while "
          "deltatune's prefix is at every attention (encoder, decoder, cross) with no bias; the outputs differ",
    "vit": "peft's prefix tuning needs a language model that takes past_key_values",
}


def _peft_check(peft, what: str) -> None:
    family = family_of(peft.model)
    if family in _PEFT_REFUSED:
        raise ConfigError(f"cannot {what} a prefix adapter on a {family} model: {_PEFT_REFUSED[family]}")
    if peft.task not in ("CAUSAL_LM", "FEATURE_EXTRACTION"):  # e.g. LlamaForSequenceClassification
        raise ConfigError(f"cannot {what} a prefix adapter on {type(peft.root).__name__}: peft's prefix goes in as "
                          "past_key_values, which only a causal LM or the bare model takes here")
