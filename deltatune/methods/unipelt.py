from torch import nn

from ..combine import ADD
from ..deltas import Gated, PrefixGated
from ..registry import Composite, Placement, option, register
from ..sites import attention_shape
from .pfeiffer import Pfeiffer
from .prefix import Prefix


@register
class UniPELT(Composite):
    """LoRA + prefix tuning + a bottleneck adapter, each behind its own learned gate.

    Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning"
    (ACL), §3: a gate is G = mean over tokens of sigmoid(W_G x + b), one scalar per example
    (nn.Linear(d, 1) per layer and submodule).
    - LoRA on W_q, W_v: h = W0 x + G_L B A x, G_L read from the projection's input x. The gate
      *replaces* LoRA's alpha / r scaling (the LowRank scale is set to 1). r = 8.
    - Prefix (length 10, MLP reparameterisation hidden 512): P_K <- G_P P_K, P_V <- G_P P_V, G_P read
      from the self-attention input (the placement's source is the attention module).
    - Pfeiffer adapter after the FFN (ReLU, reduction 16): out = G_A Up(ReLU(Down(x))) + residual,
      G_A read from the FFN output the adapter reads.
    Init as the official code: LoRA and prefix gates default Linear init; the adapter gate and both
    adapter projections (W_down and W_up: BERT init, init_bert_weights in transformers/adapters/
    modeling.py) N(0, 0.02) with zero biases; LoRA A kaiming-uniform and B zero. (The standalone
    ``pfeiffer`` method starts W_up at zero; UniPELT draws it, as its code does.) The optional
    softmax central gate is not implemented. Not mergeable (the gates depend on the input).
    """

    name = "unipelt"
    paper = "Mao et al. 2022, UniPELT"
    lr = 5e-4
    identity_at_init = False  # the prefix
    combines = (ADD, *Prefix.combines, *Pfeiffer.combines)
    deviations = "the optional softmax central gate is not offered"
    parts = {
        "lora": ("lora", {"r": "r"}, {"sites": ["attn.q", "attn.v"]}),
        "prefix": ("prefix", {"length": "prefix_length", "hidden": "prefix_hidden"}, {}),
        "adapter": ("pfeiffer", {"reduction": "reduction"}, {}),
    }

    r: int = option(8, min=1, help="LoRA rank")
    prefix_length: int = option(10, min=1)
    prefix_hidden: int = option(512, min=0, help="prefix MLP width; 0 trains the table directly")
    reduction: int = option(16, min=1, help="adapter bottleneck = d / reduction")

    def folded_options(self) -> dict:
        return {**self.options(), "prefix_hidden": 0}

    def gate(self, part, placement, model):
        d = attention_shape(model)[0]
        if part == "lora":
            placement.delta.scale = 1.0  # the gate replaces alpha / r
            return Placement(placement.target, Gated(placement.delta, d), ADD, suffix=placement.suffix)
        if part == "prefix":
            return Placement(placement.target, PrefixGated(placement.delta, d), placement.combine,
                             source=placement.target, suffix=placement.suffix)
        nn.init.normal_(placement.delta.up.weight, std=0.02)  # UniPELT's adapter: W_up BERT-initialised too
        gated = Gated(placement.delta, d)
        nn.init.normal_(gated.gate.proj.weight, std=0.02)  # BERT init for the adapter gate
        nn.init.zeros_(gated.gate.proj.bias)
        placement.delta = gated
        return placement

