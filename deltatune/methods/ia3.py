from ..combine import MULTIPLY, MULTIPLY_INPUT
from ..registry import Method, Placement, option, register
from ..deltas import Scale
from ..sites import target_features


@register
class IA3(Method):
    """Learned rescaling vectors: k <- l_k * (W_k x), v <- l_v * (W_v x), and the FFN activation
    scaled by l_ff before the FFN output projection; all vectors start at ones.

    Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
    Learning" (T-Few), §3.3. Scaling the input of ffn.out equals scaling wi_1's output in T5 v1.1.
    Mergeable: rows (outputs) or columns (inputs) of W are multiplied by l, and divided back.
    """

    name = "ia3"
    paper = "Liu et al. 2022, (IA)^3 / T-Few"
    lr = 1e-2  # chosen on the validation split at the demo budget: docs/demo/lr-sweep.md
    combines = (MULTIPLY, MULTIPLY_INPUT)

    sites: list = option(["attn.k", "attn.v"], help="sites whose output is rescaled")
    input_sites: list = option(["ffn.out"], help="sites whose input is rescaled")

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            out.append(Placement(t, Scale(target_features(t, self.name)[1]), MULTIPLY))
        for t in self.targets(model, self.input_sites):
            out.append(Placement(t, Scale(target_features(t, self.name)[0]), MULTIPLY_INPUT, suffix="~in"))
        return out
