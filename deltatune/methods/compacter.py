import math

from ..combine import SEQUENTIAL
from ..deltas import KroneckerRule, PHMAdapter
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import resolve, target_features


@register
class Compacter(Method):
    """Bottleneck adapters whose projections are PHM layers: h <- h + up(GELU(down(h))), with each
    projection W = sum_{i=1..n} A_i (x) B_i; the A_i (n x n) are shared by every adapter of every
    layer, the B_i are per layer and rank 1 (B_i = s_i t_i^T). After the attention output projection
    and after the FFN, before the residual and LayerNorm; LayerNorms are trained too.

    Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", §3-4;
    the compacter.json configuration: n = 4, reduction factor 32 (bottleneck d / 32), gelu_new,
    A_i ~ N(0, 1e-4), fast factors Glorot-uniform with gain sqrt(2) per rank-1 factor (the code's
    hypercomplex/inits.py glorot_uniform), biases zero (so near identity, not exactly), one shared
    rule for down and up projections (shared_phm_rule). Not mergeable.

    Choices: the bottleneck d / reduction is rounded to a multiple of n (at least n), since PHM
    needs n to divide it (24 on BERT/T5-base and 12 on MiniLM are already multiples of 4). On
    encoder-decoders ``attn.o`` also names cross-attention; pass ``sites`` to leave it out.
    """

    name = "compacter"
    paper = "Karimi Mahabadi et al. 2021, Compacter"
    lr = 3e-3
    identity_at_init = False  # A_i ~ N(0, 1e-4): near identity
    combines = (SEQUENTIAL,)
    deviations = ("the bottleneck d / reduction is rounded to a multiple of n (at least n); on encoder-decoders "
                  "attn.o also names cross-attention (pass sites to leave it out)")

    n: int = option(4, min=1, help="Kronecker summands (hypercomplex division)")
    reduction: int = option(32, min=1, help="bottleneck = d / reduction, rounded to a multiple of n")
    activation: str = option("gelu_new", choices=("gelu_new", "gelu", "relu", "tanh", "silu"))
    train_ln: bool = option(True, help="also train the LayerNorms (as in the paper)")
    sites: list = option(["attn.o", "ffn.out"])

    def bottleneck(self, d: int) -> int:
        return max(self.n, round(max(1, d // self.reduction) / self.n) * self.n)

    def placements(self, model):
        rule = KroneckerRule(self.n, factorized=False, init=1e-4)
        out = []
        for t in self.targets(model, self.sites):
            d = target_features(t, self.name)[1]
            if d % self.n:
                raise ConfigError(f"{self.name}: n={self.n} must divide the width {d} of {t.name}; "
                                  f"pick a divisor of {d}")
            adapter = PHMAdapter(d, self.bottleneck(d), rule, "phm", self.activation, gain=math.sqrt(2))
            out.append(Placement(t, adapter, SEQUENTIAL))
        return out

    def selected(self, model):
        if not self.train_ln:
            return []
        return [f"{t.name}.{n}" for t in resolve(model, "ln", self.layers) for n, _ in t.module.named_parameters()]


@register
class CompacterPP(Compacter):
    """Compacter++: the same PHM adapter after the FFN only (add_adapter_in_self_attention: false).

    Karimi Mahabadi et al. 2021, §4 (compacter++.json): about 0.047% of T5-base's parameters.
    """

    name = "compacter++"
    paper = "Karimi Mahabadi et al. 2021, Compacter++"

    sites: list = option(["ffn.out"])
