import math

import torch
from torch import nn

from ..combine import TRANSFORM_INPUT, TRANSFORM_SLICE
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features
from ..updates import UpdateRule


def skew(vec: torch.Tensor, upper: torch.Tensor, size: int) -> torch.Tensor:
    """(n, k) entries above the diagonal (row by row; ``upper``: their flat positions in a size x size matrix)
    -> (n, size, size) skew-symmetric matrices Q = U - U^T."""
    U = vec.new_zeros(vec.shape[0], size * size).index_copy(1, upper, vec).view(-1, size, size)
    return U - U.transpose(-2, -1)


def cayley_neumann(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """The truncated Cayley map of OFTv2 (Qiu et al. 2025, §3.2) as peft >= 0.18 computes it:
    (I + Q)(I - Q)^-1 ~ I + 2 (Q + Q^2 + ... + Q^k) + Q^(k+1), k = max(terms - 2, 2) for terms >= 3
    (terms 3 and 4 give the same series in peft), I + 2Q for terms = 2, I for terms = 1. (n, b, b) -> (n, b, b)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand_as(Q)
    if terms <= 1:
        return eye.clone()
    R = eye + 2 * Q
    if terms == 2:
        return R
    power = Q
    for _ in range(2, max(terms - 1, 3)):
        power = power @ Q
        R = R + 2 * power
    return R + power @ Q


def cayley(Q: torch.Tensor) -> torch.Tensor:
    """The exact Cayley map as peft computes it: R (I + Q) = I - Q, R = (I - Q)(I + Q)^-1 (orthogonal for a
    skew-symmetric Q; the transpose of the series above at the same Q, as in peft)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand_as(Q)
    return torch.linalg.solve(eye + Q, eye - Q, left=False)


def constrain(vec: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT's projection (Qiu et al. 2023, §3.3): each block's skew matrix Q = U - U^T (Frobenius norm
    sqrt(2) |vec|) scaled back onto the ball of radius eps / sqrt(blocks) around 0 when it lies outside."""
    radius = eps / math.sqrt(vec.shape[0])
    norm = math.sqrt(2) * vec.norm(dim=1, keepdim=True)
    return torch.where(norm <= radius, vec, vec * (radius / norm.clamp_min(torch.finfo(vec.dtype).tiny)))


class BlockOrthogonal(nn.Module):
    """x -> R x with R block-diagonal: blocks of ``block_size`` features, each rotated by the Cayley image of
    a skew-symmetric matrix kept as its upper triangle (``weight`` (blocks, b (b - 1) / 2), zero at init, so
    R = I; one block for all with ``block_share``). ``terms``: the Cayley–Neumann series (None: the exact map).
    ``coft``: the weights are used projected onto COFT's ball (the gradient passes as it is; the update rule
    of the method keeps the parameters there). ``input_matrix()`` (in, in) is the R with x -> x R^T."""

    def __init__(self, features: int, block_size: int, block_share: bool = False, terms: int | None = 5,
                 coft: bool = False, eps: float = 6e-5):
        super().__init__()
        self.features, self.block_size, self.blocks = features, block_size, features // block_size
        self.block_share, self.terms, self.coft, self.eps = block_share, terms, coft, eps
        self.weight = nn.Parameter(torch.zeros(1 if block_share else self.blocks, block_size * (block_size - 1) // 2))
        rows, cols = torch.triu_indices(block_size, block_size, 1)  # peft's order of the entries
        self.register_buffer("upper", rows * block_size + cols, persistent=False)

    def rotations(self) -> torch.Tensor:  # (blocks or 1, b, b), applied to row vectors: x_block R_i
        vec = self.weight
        if self.coft:
            vec = vec + (constrain(vec.detach(), self.eps) - vec.detach())
        Q = skew(vec, self.upper, self.block_size)
        return cayley(Q) if self.terms is None else cayley_neumann(Q, self.terms)

    def forward(self, x):  # (..., in) -> (..., in)
        R = self.rotations().to(x.dtype).expand(self.blocks, -1, -1)
        blocks = x.reshape(*x.shape[:-1], self.blocks, self.block_size)  # (..., blocks, b)
        return torch.einsum("...rk,rkc->...rc", blocks, R).reshape(x.shape)

    @torch.no_grad()
    def input_matrix(self) -> torch.Tensor:  # (in, in)
        R = self.rotations().expand(self.blocks, -1, -1)
        return torch.block_diag(*R).t()


class KeepConstrained(UpdateRule):
    """COFT (Qiu et al. 2023, §3.3): after every optimizer step each OFT weight is projected back onto its
    ball, as peft does in place before each forward pass (the same trajectory, no parameter changed inside
    a forward pass)."""

    name = "coft"

    def __init__(self, deltas: list):
        self.deltas = deltas

    @torch.no_grad()
    def after_step(self, step):
        for d in self.deltas:
            d.weight.copy_(constrain(d.weight, d.eps))


@register
class OFT(Method):
    """Orthogonal fine-tuning: h = W0 R x + b, R block-diagonal orthogonal, the Cayley image of a skew matrix.

    Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (NeurIPS), §3 (W = R W0
    with R = (I + Q)(I - Q)^-1 block-diagonal; COFT's constraint ||Q|| <= eps, §3.3), in the input-centric
    form of OFTv2 (Qiu et al. 2025, "Orthogonal Finetuning Made Scalable", §3: W0 (R x), the series
    I + 2 sum Q^i + Q^(k+1) for the inverse), as peft >= 0.18 computes it: blocks of 32 features, five
    Cayley–Neumann terms (``use_cayley_neumann=False``: the exact map, which peft takes with the opposite
    sign), on W_q and W_v; Q = 0 at init, so training starts at the base model. Mergeable: W0 <- W0 R.
    On a slice of GPT-2's fused c_attn the slice's rows are recomputed from R x (the other slices read x).
    """

    name = "oft"
    paper = "Qiu et al. 2023, OFT (OFTv2 form)"
    lr = 1e-3
    combines = (TRANSFORM_INPUT, TRANSFORM_SLICE)
    deviations = ("by default the Cayley–Neumann series of OFTv2 (5 terms, orthogonal up to its truncation), as peft "
                  ">= 0.18 computes it; use_cayley_neumann=False gives the paper's exact Cayley map (with peft's sign, "
                  "(I - Q)(I + Q)^-1)")

    block_size: int = option(32, min=2, help="features per orthogonal block (must divide each site's input width)")
    block_share: bool = option(False, help="one block shared by all blocks of a module")
    use_cayley_neumann: bool = option(True, help="the truncated Cayley–Neumann series (OFTv2) instead of the exact map")
    num_cayley_neumann_terms: int = option(5, min=1, max=64)
    coft: bool = option(False, help="constrained OFT: keep each block's skew matrix within eps of zero")
    eps: float = option(6e-5, min=0.0, help="COFT's radius")
    sites: list = option(["attn.q", "attn.v"])

    def check(self, model):
        for t in self.targets(model, self.sites):
            d_in, _ = target_features(t, self.name)
            if d_in % self.block_size:
                raise ConfigError(f"oft: block_size={self.block_size} must divide {t.name}'s input width {d_in}; "
                                  f"choose a divisor of {d_in} (peft would silently change it)")

    def placements(self, model):
        terms = self.num_cayley_neumann_terms if self.use_cayley_neumann else None
        return [Placement(t, BlockOrthogonal(target_features(t, self.name)[0], self.block_size, self.block_share,
                                             terms, self.coft, self.eps),
                          TRANSFORM_INPUT if t.out_slice is None else TRANSFORM_SLICE)
                for t in self.targets(model, self.sites)]

    def update_rule(self, model, params):
        if not self.coft:
            return None
        from ..store import require_store

        store = require_store(model)
        deltas = [e.delta for rec in store.records.values() if rec.method is self for e in rec.entries]
        return KeepConstrained(deltas)

    # -- the Hugging Face PEFT format (peft 0.21 OFT)
    peft_type = "OFT"

    def to_peft(self, peft, deltas):
        """``<module>.oft_R.weight`` (blocks or 1, b (b - 1) / 2), the upper triangles in peft's order.
        peft's OFT adapts nn.Linear (and convolutions and embeddings), not GPT-2's Conv1D: refused there."""
        tensors = peft.tuner_tensors(deltas, {"weight": "oft_R.weight"}, "OFT", conv1d=False)
        targets, _ = peft.target_modules({n[:-len(".oft_R.weight")] for n in tensors})
        # peft >= 0.18 reads the Cayley–Neumann series as computed here (older versions computed another)
        return tensors, {"r": 0, "oft_block_size": self.block_size, "block_share": bool(self.block_share),
                         "use_cayley_neumann": bool(self.use_cayley_neumann),
                         "num_cayley_neumann_terms": self.num_cayley_neumann_terms, "coft": bool(self.coft),
                         "eps": float(self.eps), "module_dropout": 0.0, "target_modules": targets,
                         "fan_in_fan_out": False, "bias": "none", "init_weights": True, "peft_version": "0.18.0"}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT OFT on linear projections: the block size from the tensors (peft adjusts one that does not
        divide a width). Refused: OFT on embeddings or convolutions, biases, blocks of different sizes in one
        adapter, and the Cayley–Neumann series of peft < 0.18 (another function). ``module_dropout`` is
        read and dropped: peft 0.21's Linear layer never applies it."""
        if config.get("bias", "none") not in ("none", None):
            raise ConfigError(f"bias={config.get('bias')!r}: deltatune's OFT trains no biases")
        neumann = bool(config.get("use_cayley_neumann", False))
        version = str(config.get("peft_version") or "0.0.0").partition("@")[0]
        if neumann and _version(version) < (0, 18):
            raise ConfigError(f"this OFT adapter was written by peft {version}, whose Cayley–Neumann series differs "
                              "from peft >= 0.18's (peft itself warns); retrain it with peft >= 0.18")
        terms = max(1, peft.get(config, "num_cayley_neumann_terms", int, 5))  # peft: 0 terms give I, as 1 does
        share = bool(config.get("block_share", False))
        modules = peft.tuner_modules(tensors, {"oft_R.weight": "weight"}, "OFT")
        deltas, sizes = {}, set()
        for full, got in modules.items():
            d_in, _ = peft.features(full)
            rows, n = got["weight"].shape if got["weight"].dim() == 2 else (0, 0)
            b = (1 + math.isqrt(1 + 8 * n)) // 2
            if n < 1 or b * (b - 1) // 2 != n or d_in % b or rows != (1 if share else d_in // b):
                raise ConfigError(f"'{peft.rel(full)}': oft_R.weight {tuple(got['weight'].shape)} holds no blocks that "
                                  f"tile its {d_in} input features (block_share={share})")
            sizes.add(b)
            deltas[f"{peft.key(full)}.weight"] = got["weight"]
        if len(sizes) > 1:
            raise ConfigError(f"the adapter's modules have blocks of sizes {sorted(sizes)}; deltatune's OFT uses one "
                              "block size per adapter")
        (sites,), layers = peft.choose_sites([set(modules)])
        return {"block_size": sizes.pop(), "block_share": share, "use_cayley_neumann": neumann,
                "num_cayley_neumann_terms": terms, "coft": bool(config.get("coft", False)),
                "eps": float(peft.get(config, "eps", (int, float), 6e-5)), "sites": sites, "layers": layers}, deltas


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
