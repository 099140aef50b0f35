from ..combine import SEQUENTIAL
from ..registry import Method, Placement, option, register
from ..deltas import Bottleneck
from ..sites import resolve, target_features


@register
class Houlsby(Method):
    """Bottleneck adapters after the attention output projection and after the FFN:
    h <- h + W_up f(W_down h), before the residual and LayerNorm; LayerNorms are trained too.

    Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1. Near-identity
    init (truncated N(0, 1e-2), the paper's §3.6); GELU as in the authors' adapter-bert
    (``feedforward_adapter``); bottleneck m from {8, 64, 256}. Not mergeable.
    """

    name = "houlsby"
    paper = "Houlsby et al. 2019, Adapters"
    lr = 1e-3
    identity_at_init = False  # near identity, not exactly
    combines = (SEQUENTIAL,)
    deviations = ("the adapter reads the projection's output before its dropout (adapter-bert: after it); "
                  "identical without dropout and at evaluation. adapter-bert initialises with std 1e-3, "
                  "the paper's text with 1e-2 (used here).")

    bottleneck: int = option(64, min=1)
    activation: str = option("gelu", choices=("relu", "gelu", "tanh", "silu"))
    train_ln: bool = option(True, help="also train the LayerNorms (as in the paper)")
    sites: list = option(["attn.o", "ffn.out"])

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d = target_features(t, self.name)[1]
            out.append(Placement(t, Bottleneck(d, self.bottleneck, self.activation, init="houlsby"), SEQUENTIAL))
        return out

    def selected(self, model):
        if not self.train_ln:
            return []
        return [f"{t.name}.{n}" for t in resolve(model, "ln", self.layers) for n, _ in t.module.named_parameters()]
