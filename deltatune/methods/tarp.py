from ..combine import ADD
from ..deltas import DynamicLowRank
from ..registry import Method, Placement, option, register
from ..sites import target_features


@register
class TARP(Method):
    """Input-conditioned (dynamic) low-rank reparameterisation: h = W0 x + (alpha / r) U diag(g(x)) V x,
    with a small gating network g(x) = 1 + tanh(G x + c) on the projection's input, per token.

    Hou, Salazar & Polovets 2022, "Meta-Learning the Difference: Preparing Large Language Models for
    Efficient Adaptation" (TACL), TARP. The paper's exact equations, ranks and gating network are
    UNVERIFIED (METHODS.md §14: no public code; the abstract describes a task-adaptive, input-dependent
    low-rank reparameterisation with an input-dependent diagonal). This implements that documented
    idea, not the paper's equations: the gate is one linear layer per projection (r outputs), per
    token so that cached generation sees the same gate as a full pass; U = 0 and g = 1 at init
    (training starts at the base model, and the static part is LoRA). The MAML-style meta-training of
    the MLtD framework is not part of the method here. Not mergeable (the update depends on x).
    """

    name = "tarp"
    paper = "Hou et al. 2022, TARP (equations unverified)"
    lr = 5e-4
    combines = (ADD,)
    deviations = ("the paper's equations are unverified: this is W0 x + U diag(1 + tanh(G x + c)) V x per token, "
                  "the documented idea, without the meta-training")

    r: int = option(8, min=1)
    alpha: float = option(16.0, min=0)
    sites: list = option(["attn.q", "attn.v"])

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            out.append(Placement(t, DynamicLowRank(d_in, d_out, self.r, self.alpha / self.r), ADD))
        return out
