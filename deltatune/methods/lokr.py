import math

import torch
from torch import nn

from ..combine import PARALLEL
from ..deltas import WeightDelta
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a width into two factors (the rule peft's LoKr uses, so shapes agree):
    ``factor`` itself where it divides the width (as (factor, width / factor)); else walking up the
    divisors m of the width, no larger than ``factor`` (-1: no limit), until m >= width / m, and the
    last pair reached, smaller factor first: 384 -> (16, 24), 32 -> (4, 8), 127 -> (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for d in range(2, dimension + 1):
        if m >= dimension // m:
            break
        if dimension % d:
            continue
        if d > limit:
            break
        m = d
    return min(m, dimension // m), max(m, dimension // m)


class KroneckerProduct(WeightDelta):
    """dW = scale * W1 (x) W2 (a Kronecker product): W1 (a, c), W2 (b, d) with out = a b and in = c d, each
    factor full or a rank-r product (W1 = W1a W1b where ``decompose_w1``, W2 = W2a W2b where ``decompose_w2``).
    Init ('default', peft's): W1 (or W1a) zero, the rest kaiming-uniform; 'lycoris': W2 (or W2b) zero.

    dW x is computed without the (out, in) matrix: x viewed as X (c, d) gives W1 X W2^T (a, b)."""

    def __init__(self, shape: tuple, r: int, scale: float, decompose_w1: bool, decompose_w2: bool,
                 init: str = "default", rank_dropout: float = 0.0, rank_dropout_scale: bool = False,
                 module_dropout: float = 0.0):
        super().__init__()
        (a, b), (c, d) = shape
        self.shape, self.scale = ((a, b), (c, d)), scale
        self.out_features, self.in_features = a * b, c * d
        self.rank_dropout, self.rank_dropout_scale, self.module_dropout = rank_dropout, rank_dropout_scale, module_dropout
        if decompose_w1:
            self.w1_a, self.w1_b = nn.Parameter(torch.empty(a, r)), nn.Parameter(torch.empty(r, c))
        else:
            self.w1 = nn.Parameter(torch.empty(a, c))
        if decompose_w2:
            self.w2_a, self.w2_b = nn.Parameter(torch.empty(b, r)), nn.Parameter(torch.empty(r, d))
        else:
            self.w2 = nn.Parameter(torch.empty(b, d))
        for p in self.parameters():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        zero = (self.w1_a if decompose_w1 else self.w1) if init == "default" else (self.w2_b if decompose_w2 else self.w2)
        nn.init.zeros_(zero)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:  # W1 (a, c), W2 (b, d)
        w1 = self.w1_a @ self.w1_b if hasattr(self, "w1_a") else self.w1
        w2 = self.w2_a @ self.w2_b if hasattr(self, "w2_a") else self.w2
        return w1, w2

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scale

    def apply(self, x):  # (..., c d) -> (..., a b)
        w1, w2 = self.factors()
        (a, b), (c, d) = self.shape
        X = x.reshape(*x.shape[:-1], c, d)
        Y = torch.matmul(w1.to(x.dtype), torch.matmul(X, w2.t().to(x.dtype)))  # W1 X W2^T: (..., a, b)
        return Y.reshape(*x.shape[:-1], a * b) * self.scale

    def row_mask(self, out):
        """LyCORIS's rank dropout: each output row of dW kept with probability 1 - p (rescaled by the mean
        with ``rank_dropout_scale``)."""
        if self.rank_dropout <= 0:
            return None
        keep = (torch.rand(out) > self.rank_dropout).float()
        return (keep / keep.mean() if self.rank_dropout_scale else keep).to(next(self.parameters()).device)


def lokr_shape(d_in: int, d_out: int, r: int, factor: int, decompose_both: bool) -> tuple[tuple, bool, bool]:
    """((a, b), (c, d)), whether W1 and whether W2 is a rank-r product: peft's rule (W2 is whenever r is below
    half its larger side; W1 only with ``decompose_both``)."""
    (a, b), (c, d) = factorization(d_out, factor), factorization(d_in, factor)
    return ((a, b), (c, d)), decompose_both and r < max(a, c) / 2, r < max(b, d) / 2


@register
class LoKr(Method):
    """Low-rank Kronecker product beside a frozen projection: h = W0 x + (alpha / r) (W1 (x) W2) x.

    Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation"
    (ICLR), §3.1 (LoKr): out = a b and in = c d split by LyCORIS's factorization (near the square root, or
    by ``decompose_factor``), W1 (a, c), W2 (b, d), W2 as a rank-r product when r < max(b, d) / 2 and W1
    too with ``decompose_both``. peft's defaults: r = 8, alpha = 8 (its scale alpha / r also where no factor
    is decomposed; LyCORIS then uses 1), on W_q and W_v; W1 starts at zero ('lycoris': W2). Mergeable:
    W0 += (alpha / r) W1 (x) W2.
    """

    name = "lokr"
    paper = "Yeh et al. 2024, LyCORIS (LoKr)"
    lr = 2e-3
    combines = (PARALLEL,)
    deviations = "the scale alpha / r applies also where neither factor is decomposed (peft's; LyCORIS uses 1 there)"

    r: int = option(8, min=1)
    alpha: float = option(8.0, min=0)
    decompose_both: bool = option(False, help="W1 as a rank-r product too")
    decompose_factor: int = option(-1, min=-1, help="split widths into (factor, width / factor); -1: near the square root")
    init: str = option("default", choices=("default", "lycoris"), help="which factor starts at zero: W1 (peft) or W2 (LyCORIS)")
    rank_dropout: float = option(0.0, min=0.0, max=0.99, help="drop output rows of the update while training")
    rank_dropout_scale: bool = option(False, help="rescale rank dropout by the share of rows kept")
    module_dropout: float = option(0.0, min=0.0, max=1.0, help="skip the whole update in a training pass")
    sites: list = option(["attn.q", "attn.v"])

    def check(self, model):
        if self.decompose_factor == 0:
            raise ConfigError("lokr: decompose_factor must be -1 (near the square root) or a factor >= 1, got 0")

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            shape, dec1, dec2 = lokr_shape(d_in, d_out, self.r, self.decompose_factor, self.decompose_both)
            delta = KroneckerProduct(shape, self.r, self.alpha / self.r, dec1, dec2, self.init, self.rank_dropout,
                                     self.rank_dropout_scale, self.module_dropout)
            out.append(Placement(t, delta, PARALLEL))
        return out

    # -- the Hugging Face PEFT format (peft 0.21 LOKR)
    peft_type = "LOKR"
    PEFT_NAMES = {f"lokr_{k}": k for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}

    def to_peft(self, peft, deltas):
        """``<module>.lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r), ``lokr_w1_b`` (r, c); ``lokr_w2`` (b, d) or
        ``lokr_w2_a``, ``lokr_w2_b``; scale alpha / r. peft's LoKr adapts nn.Linear (and convolutions), not
        GPT-2's Conv1D: refused there."""
        tensors = peft.tuner_tensors(deltas, {v: k for k, v in self.PEFT_NAMES.items()}, "LoKr", conv1d=False)
        targets, _ = peft.target_modules({n.rsplit(".", 1)[0] for n in tensors})
        return tensors, {"r": self.r, "alpha": peft.number(self.alpha), "rank_dropout": float(self.rank_dropout),
                         "module_dropout": float(self.module_dropout), "rank_dropout_scale": bool(self.rank_dropout_scale),
                         "decompose_both": bool(self.decompose_both), "decompose_factor": self.decompose_factor,
                         "target_modules": targets, "use_effective_conv2d": False,
                         "init_weights": True if self.init == "default" else "lycoris",
                         "rank_pattern": {}, "alpha_pattern": {}}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT LoKr on linear projections, its factor shapes checked against peft's rule. Refused: the CP
        form of convolutions (lokr_t2) and rank_pattern / alpha_pattern."""
        peft.refuse_patterns(config, "LoKr")
        r = peft.get(config, "r", int, 8)
        factor = peft.get(config, "decompose_factor", int, -1)
        both = bool(config.get("decompose_both", False))
        if factor == 0 or factor < -1:
            raise ConfigError(f"decompose_factor={factor}: peft's LoKr takes -1 or a factor >= 1")
        modules = peft.tuner_modules(tensors, cls.PEFT_NAMES, "LoKr")
        deltas = {}
        for full, got in modules.items():
            d_in, d_out = peft.features(full)
            ((a, b), (c, d)), dec1, dec2 = lokr_shape(d_in, d_out, r, factor, both)
            want = {**({"w1_a": (a, r), "w1_b": (r, c)} if dec1 else {"w1": (a, c)}),
                    **({"w2_a": (b, r), "w2_b": (r, d)} if dec2 else {"w2": (b, d)})}
            peft.check_shapes(full, got, want, f"a rank-{r} LoKr of a {d_in} -> {d_out} projection")
            deltas.update({f"{peft.key(full)}.{k}": t for k, t in got.items()})
        (sites,), layers = peft.choose_sites([set(modules)])
        init = config.get("init_weights", True)
        return {"r": r, "alpha": float(peft.get(config, "alpha", (int, float), 8)), "decompose_both": both,
                "decompose_factor": factor, "init": "lycoris" if init == "lycoris" else "default",
                "rank_dropout": float(peft.get(config, "rank_dropout", (int, float), 0.0)),
                "rank_dropout_scale": bool(config.get("rank_dropout_scale", False)),
                "module_dropout": float(peft.get(config, "module_dropout", (int, float), 0.0)),
                "sites": sites, "layers": layers}, deltas
