from ..combine import SEQUENTIAL
from ..registry import Method, Placement, option, register
from ..deltas import Bottleneck
from ..sites import target_features


@register
class Pfeiffer(Method):
    """One bottleneck adapter per layer, after the FFN only: h <- h + W_up ReLU(W_down h).

    Pfeiffer et al. 2021, "AdapterFusion", §3 (the AdapterHub seq_bn configuration): reduction
    factor 16 (bottleneck d / 16), ReLU. Init: W_down N(0, 0.02), W_up zero, so training starts at
    the base model. Not mergeable.
    """

    name = "pfeiffer"
    paper = "Pfeiffer et al. 2021, AdapterFusion"
    lr = 1e-3
    combines = (SEQUENTIAL,)

    reduction: int = option(16, min=1)
    activation: str = option("relu", choices=("relu", "gelu", "tanh", "silu"))
    sites: list = option(["ffn.out"])

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d = target_features(t, self.name)[1]
            out.append(Placement(t, Bottleneck(d, max(1, d // self.reduction), self.activation, init="bert"), SEQUENTIAL))
        return out
