import math

from ..combine import PARALLEL
from ..deltas import KroneckerLinear, KroneckerRule
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features


@register
class KAdaptation(Method):
    """Kronecker adaptation of W_q and W_v: W <- W + s * sum_{i=1..n} A_i (x) B_i, plus a bias b.

    He et al. 2023, "Parameter-efficient Model Adaptation for Vision Transformers" (AAAI), §3; the
    official PEViT code's shapes: n = 32; the slow A_i (n x n, rank 1: A_i = u_i v_i^T, u, v ~
    U(-0.01, 0.01)) are shared by every layer, one set for the q projections and one for the v
    projections; the fast B_i ((in/n) x (out/n), rank 1: B_i = s_i t_i^T) are per layer and
    projection; s = 160 (lora_alpha / lora_dim * 5 = 128 / 4 * 5); Dropout(0.5) on the Kronecker
    matrix during training; a zero-initialised bias b. Mergeable: W += s H^T, bias += b.

    Choices:
    - Init: the official default zero-initialises *both* fast factors, which leaves them with zero
      gradients forever (only b would learn). Here s_i is Glorot-uniform and only t_i is zero, so
      training starts exactly at the base model and every factor learns (as LoRA's B = 0).
    - Bias: the official code adds one bias per attention layer to both q and v; here each adapted
      projection has its own b, and projections without a bias (Llama, T5) get none, so the update
      stays a weight (and bias) change that merges. On ViT-B the official count is 50,176; this one
      is 12 * 768 = 9,216 more.
    - The official v branch's factor bug (METHODS.md) is not reproduced: v uses its own factors.
    - n: None picks 32 (the paper's) where it divides both widths of a projection, else the largest
      divisor of 32 that does (gcd(32, in, out)), per site; an explicit n must divide them.
    """

    name = "kadaptation"
    paper = "He et al. 2023, KAdaptation"
    lr = 1e-3
    combines = (PARALLEL,)
    deviations = ("only t_i starts at zero (the official init zeroes both fast factors, which then never learn); "
                  "each projection has its own bias (official: one per layer, shared by q and v: 50,176 on ViT-B, "
                  "here 9,216 more); n = gcd(32, widths) where 32 does not divide a projection's widths")

    n: int | None = option(None, min=1, help="Kronecker summands (None: 32, or gcd(32, in, out))")
    scale: float = option(160.0, min=0.0, help="s = lora_alpha / lora_dim * 5 in the official code")
    dropout: float = option(0.5, min=0.0, max=0.99, help="dropout on the Kronecker matrix H while training")
    bias: bool = option(True, help="a trained bias where the projection has one")
    sites: list = option(["attn.q", "attn.v"])

    def placements(self, model):
        out = []
        for i, site in enumerate(self.sites):
            targets = self.targets(model, [site])
            widths = [w for t in targets for w in target_features(t, self.name)]
            n = self.n or math.gcd(32, *widths)
            if any(w % n for w in widths):
                raise ConfigError(f"{self.name}: n={n} must divide the widths {sorted(set(widths))} of site '{site}'; "
                                  f"pick a common divisor, or leave n unset")
            rule = KroneckerRule(n, factorized=True, init=0.01)  # slow weights of this site, shared by its layers
            for t in targets:
                d_in, d_out = target_features(t, self.name)
                has_bias = self.bias and getattr(t.module, "bias", None) is not None
                delta = KroneckerLinear(d_in, d_out, rule, f"kron{i}", self.scale, has_bias, "zero_right", self.dropout)
                out.append(Placement(t, delta, PARALLEL))
        return out
