from ..combine import PARALLEL
from ..registry import Method, Placement, option, register
from ..deltas import LowRank
from ..sites import target_features


@register
class LoRA(Method):
    """Low-rank update beside a frozen projection: h = W0 x + (alpha / r) B A x, with B = 0 at init.

    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1. A is
    kaiming-uniform (loralib), B zero; applied to W_q and W_v by default; r = 8, alpha = 16 (the
    UniPELT defaults of METHODS.md). Mergeable: W0 += (alpha / r) B A.
    """

    name = "lora"
    paper = "Hu et al. 2021, LoRA"
    lr = 2e-3  # chosen on the validation split at the demo budget: docs/demo/lr-sweep.md
    combines = (PARALLEL,)

    r: int = option(8, min=1)
    alpha: float = option(16.0, min=0)
    dropout: float = option(0.0, min=0.0, max=0.99)
    sites: list = option(["attn.q", "attn.v"])

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            out.append(Placement(t, LowRank(d_in, d_out, self.r, self.alpha / self.r, self.dropout), PARALLEL))
        return out
