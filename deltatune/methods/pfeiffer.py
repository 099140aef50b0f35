from ..combine import AROUND_NORM, SEQUENTIAL
from ..registry import Method, Placement, option, register
from ..deltas import Bottleneck
from ..sites import SITE_MAP, attention_shape, family_of


@register
class Pfeiffer(Method):
    """One bottleneck adapter per layer, after the FFN: the AdapterHub ``seq_bn`` configuration.

    Pfeiffer et al. 2021, "AdapterFusion", §3; the order is AdapterHub's (original_ln_before,
    residual_before_ln, original_ln_after). With s = FFN output + residual, post-LN models (BERT,
    BART) compute LN(s + W_up ReLU(W_down LN(s))): the adapter reads the normalised sum, its output
    joins the residual taken before the norm, and the block's LayerNorm is applied again (with its
    own weights). Pre-LN models (GPT-2, Llama, T5, ViT) have no norm there: s + W_up ReLU(W_down s)
    at the block output. Reduction factor 16 (bottleneck d / 16), ReLU.
    """

    name = "pfeiffer"
    paper = "Pfeiffer et al. 2021, AdapterFusion"
    lr = 1e-3
    combines = (AROUND_NORM, SEQUENTIAL)
    deviations = ("W_up starts at zero (AdapterHub draws it from N(0, 0.02)), so training starts exactly "
                  "at the base model; W_down is N(0, 0.02) as in AdapterHub.")

    reduction: int = option(16, min=1)
    activation: str = option("relu", choices=("relu", "gelu", "tanh", "silu"))

    def placements(self, model):
        post_ln = "ffn.ln" in SITE_MAP[family_of(model)]
        site, combine = ("ffn.ln", AROUND_NORM) if post_ln else ("block", SEQUENTIAL)
        out = []
        for t in self.targets(model, [site]):
            d = model.get_submodule(t.name).weight.shape[0] if post_ln else attention_shape(model)[0]
            out.append(Placement(t, Bottleneck(d, max(1, d // self.reduction), self.activation, init="bert"), combine))
        return out

