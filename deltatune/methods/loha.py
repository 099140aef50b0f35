import math

import torch
from torch import nn
from torch.nn import functional as F

from ..combine import PARALLEL
from ..deltas import WeightDelta
from ..registry import Method, Placement, option, register
from ..sites import target_features


class HadamardLowRank(WeightDelta):
    """dW = scale * (A1 B1) * (A2 B2), the elementwise product of two rank-r matrices: A1, A2 (out, r),
    B1, B2 (r, in). peft's init (FedPara's He init, one factor zero): A1, B1, A2 kaiming-uniform, B2 = 0,
    so training starts at the base model.

    dW x is computed as a rank r^2 product where that is cheaper than the dense (out, in) matrix:
    dW = U V with U[i, (p, q)] = A1[i, p] A2[i, q] and V[(p, q), j] = B1[p, j] B2[q, j]."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.w1_a = nn.Parameter(torch.empty(out_features, r))
        self.w1_b = nn.Parameter(torch.empty(r, in_features))
        self.w2_a = nn.Parameter(torch.empty(out_features, r))
        self.w2_b = nn.Parameter(torch.zeros(r, in_features))
        for w in (self.w1_a, self.w1_b, self.w2_a):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.factored = r * r * (in_features + out_features) < in_features * out_features

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b) * self.scale

    def apply(self, x):
        if not self.factored:
            return super().apply(x)
        r = self.w1_a.shape[1]
        U = (self.w1_a[:, :, None] * self.w2_a[:, None, :]).reshape(self.out_features, r * r)  # (out, r^2)
        V = (self.w1_b[:, None, :] * self.w2_b[None, :, :]).reshape(r * r, self.in_features)  # (r^2, in)
        return F.linear(F.linear(x, V.to(x.dtype)), U.to(x.dtype)) * self.scale

    def row_mask(self, out):
        """LyCORIS's rank dropout: each output row of dW kept with probability 1 - p, rescaled by the mean."""
        if self.rank_dropout <= 0:
            return None
        keep = (torch.rand(out) > self.rank_dropout).float()
        return (keep / keep.mean()).to(self.w1_a.device)  # all dropped: 0/0, as in LyCORIS and peft


@register
class LoHa(Method):
    """Low-rank Hadamard product beside a frozen projection: h = W0 x + (alpha / r) ((A1 B1) * (A2 B2)) x.

    Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
    Learning" (ICLR), §3 (the rank of a Hadamard product of rank-r matrices reaches r^2), as LyCORIS adapts
    weights with it (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
    Model Evaluation", ICLR, §3.1). peft's defaults: r = 8, alpha = 8, on W_q and W_v; ``rank_dropout`` drops
    output rows of the update and ``module_dropout`` the whole update in a training pass (LyCORIS's). Mergeable:
    W0 += (alpha / r) (A1 B1) * (A2 B2).
    """

    name = "loha"
    paper = "Hyeon-Woo et al. 2022, FedPara (LoHa, via LyCORIS)"
    # chosen on the validation split at the demo budget (MiniLM code-search, 15 x 32, seed 0): validation MRR
    # 0.658 at 2e-3 (LoRA's), 0.708 at 2e-2, 0.674 at 6e-2; its update grows as the product of two products
    lr = 2e-2
    combines = (PARALLEL,)

    r: int = option(8, min=1)
    alpha: float = option(8.0, min=0)
    rank_dropout: float = option(0.0, min=0.0, max=0.99, help="drop output rows of the update while training")
    module_dropout: float = option(0.0, min=0.0, max=1.0, help="skip the whole update in a training pass")
    sites: list = option(["attn.q", "attn.v"])

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            delta = HadamardLowRank(d_in, d_out, self.r, self.alpha / self.r, self.rank_dropout, self.module_dropout)
            out.append(Placement(t, delta, PARALLEL))
        return out

    # -- the Hugging Face PEFT format (peft 0.21 LOHA)
    peft_type = "LOHA"
    PEFT_NAMES = {"hada_w1_a": "w1_a", "hada_w1_b": "w1_b", "hada_w2_a": "w2_a", "hada_w2_b": "w2_b"}

    def to_peft(self, peft, deltas):
        """``<module>.hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b``; scale alpha / r.
        peft's LoHa adapts nn.Linear (and convolutions), not GPT-2's Conv1D: refused there."""
        tensors = peft.tuner_tensors(deltas, {v: k for k, v in self.PEFT_NAMES.items()}, "LoHa", conv1d=False)
        targets, _ = peft.target_modules({n.rsplit(".", 1)[0] for n in tensors})
        return tensors, {"r": self.r, "alpha": peft.number(self.alpha), "rank_dropout": float(self.rank_dropout),
                         "module_dropout": float(self.module_dropout), "target_modules": targets,
                         "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {}}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT LoHa on linear projections. Refused: the CP form of convolutions (hada_t1, hada_t2) and
        rank_pattern / alpha_pattern (one rank and alpha for every module here)."""
        peft.refuse_patterns(config, "LoHa")
        r = peft.get(config, "r", int, 8)
        modules = peft.tuner_modules(tensors, cls.PEFT_NAMES, "LoHa")
        deltas = {}
        for full, got in modules.items():
            d_in, d_out = peft.features(full)
            want = {"w1_a": (d_out, r), "w1_b": (r, d_in), "w2_a": (d_out, r), "w2_b": (r, d_in)}
            peft.check_shapes(full, got, want, f"a rank-{r} LoHa of a {d_in} -> {d_out} projection")
            deltas.update({f"{peft.key(full)}.{k}": t for k, t in got.items()})
        (sites,), layers = peft.choose_sites([set(modules)])
        return {"r": r, "alpha": float(peft.get(config, "alpha", (int, float), 8)),
                "rank_dropout": float(peft.get(config, "rank_dropout", (int, float), 0.0)),
                "module_dropout": float(peft.get(config, "module_dropout", (int, float), 0.0)),
                "sites": sites, "layers": layers}, deltas
