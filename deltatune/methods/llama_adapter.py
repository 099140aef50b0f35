from ..combine import GATED_ATTENTION
from ..deltas import AdaptionPrompt
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import attention_shape, family_of, resolve


@register
class LlamaAdapter(Method):
    """LLaMA-Adapter: a learnable adaption prompt P (length, d) at each adapted layer's self-attention, read through
    a zero-initialised gate, so training starts exactly at the base model.

    Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention", §3.2
    (zero-init attention): with the layer's own projections K_p = W_k P, V_p = W_v P (no position), each token's
    query adds g softmax(q K_p^T / sqrt(hd)) V_p to its attention output before the output projection; the
    prompt's scores get a softmax of their own, apart from the tokens'. g is one scalar per layer, starting at 0;
    P ~ N(0, 1) as the official code's embedding. length = 10 (the paper's K). Runs inside the model's attention
    through the prefix mechanism (``PrefixAttention``), so masks, padding, per-row routing and generate() work as
    for prefixes. Not mergeable.
    """

    name = "llama-adapter"
    paper = "Zhang et al. 2023, LLaMA-Adapter"
    lr = 9e-3  # the paper's instruction-tuning setting (AdamW, batch 64)
    combines = (GATED_ATTENTION,)
    # decoders of the paper's kind, and BERT-style encoders (the same self-attention); encoder-decoders not built
    families = ("bert", "gpt2", "llama")
    deviations = ("every layer by default (the paper: the top 30 of LLaMA-7B's 32; pass layers); on GPT-2 the "
                  "adaption output goes through c_proj like the tokens' (peft's GPT-2 adds it after c_proj)")

    length: int = option(10, min=1)

    def placements(self, model):
        d_model, _, kv_heads, head_dim = attention_shape(model)
        keys = {t.layer: t for t in resolve(model, "attn.k", self.layers)}
        values = {t.layer: t for t in resolve(model, "attn.v", self.layers)}
        out = []
        for t in resolve(model, "attn.kv", self.layers):
            k, v = keys[t.layer], values[t.layer]
            delta = AdaptionPrompt(self.length, d_model, kv_heads, head_dim,
                                   ((k.module, k.out_slice), (v.module, v.out_slice)))
            out.append(Placement(t, delta, GATED_ATTENTION))
        return out

    # -- the Hugging Face PEFT format (peft 0.21 ADAPTION_PROMPT); ``peft``: deltatune.formats.peft.Bridge
    peft_type = "ADAPTION_PROMPT"
    peft_target_rule = False  # target_modules read its own way (registry.Method.peft_target_rule)

    def to_peft(self, peft, deltas):
        """``<attention>.adaption_prompt`` (1, length, d) and ``<attention>.adaption_gate`` (1,) per adapted layer;
        ``adapter_layers`` counts them from the top, so the layers must be the topmost ones."""
        _peft_check(peft, "export to PEFT")
        layers = _top_layers(peft.model, self.layers)
        tensors = {}
        for module_name, _, params in deltas:
            name = peft.rel(module_name)
            tensors[f"{name}.adaption_prompt"] = params["prompt"].unsqueeze(0)
            tensors[f"{name}.adaption_gate"] = params["gate"]
        return tensors, {"task_type": peft.task, "adapter_len": self.length, "adapter_layers": layers,
                         "target_modules": "self_attn"}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        _peft_check(peft, "load")
        if peft.get(config, "target_modules", str, "self_attn") != "self_attn":
            raise ConfigError("an adaption prompt on Llama sits at 'self_attn'; this config names "
                              f"{config.get('target_modules')!r}")
        n = peft.get(config, "adapter_len", int, None)
        count = peft.get(config, "adapter_layers", int, None)
        targets = sorted(resolve(peft.model, "attn.kv"), key=lambda t: t.layer)
        if not n or n < 1 or not count or not 1 <= count <= len(targets):
            raise ConfigError(f"adapter_len={n} and adapter_layers={count} do not fit a model of {len(targets)} layers")
        chosen = targets[len(targets) - count:]
        d_model = attention_shape(peft.model)[0]
        deltas, want = {}, set()
        for t in chosen:
            name = peft.rel(t.name)
            prompt, gate = tensors.get(f"{name}.adaption_prompt"), tensors.get(f"{name}.adaption_gate")
            want |= {f"{name}.adaption_prompt", f"{name}.adaption_gate"}
            if prompt is None or gate is None or tuple(prompt.shape) != (1, n, d_model) or tuple(gate.shape) != (1,):
                raise ConfigError(f"{name} needs adaption_prompt (1, {n}, {d_model}) and adaption_gate (1,)")
            deltas[peft.key(t.name) + ".prompt"] = prompt[0]
            deltas[peft.key(t.name) + ".gate"] = gate
        extra = sorted(set(tensors) - want)
        if extra:
            raise ConfigError(f"unexpected tensors in an adaption prompt adapter: {extra[:3]}")
        layers = None if count == len(targets) else [t.layer for t in chosen]
        return {"length": n, "layers": layers}, deltas


# peft 0.21's adaption prompt knows these model types (peft/tuners/adaption_prompt/config.py)
_PEFT_TYPES = ("llama", "mistral")
_PEFT_GPT2 = ("peft's adaption prompt on GPT-2 adds the adaption output after the output projection c_proj, "
              "where the paper (and deltatune, and peft's Llama) add it before; the outputs differ")


def _peft_check(peft, what: str) -> None:
    family = family_of(peft.model)
    if family == "gpt2":
        raise ConfigError(f"cannot {what} a llama-adapter adapter on GPT-2: {_PEFT_GPT2}")
    model_type = getattr(peft.root.config, "model_type", "")
    if model_type not in _PEFT_TYPES:
        raise ConfigError(f"cannot {what} a llama-adapter adapter on a {model_type} model: peft's adaption prompt "
                          f"supports {', '.join(_PEFT_TYPES)} (and GPT-2, computed differently)")


def _top_layers(model, layers) -> int:
    """peft's adapter_layers for deltatune's ``layers``: how many of the top layers; refused if not the top ones."""
    all_layers = sorted(t.layer for t in resolve(model, "attn.kv"))
    if layers is None:
        return len(all_layers)
    chosen = sorted(set(layers))
    if chosen != all_layers[len(all_layers) - len(chosen):]:
        raise ConfigError(f"peft's adaption prompt adapts the topmost adapter_layers layers; this adapter is at "
                          f"layers {chosen} of {len(all_layers)} (train it with layers = the top ones to export it)")
    return len(chosen)
