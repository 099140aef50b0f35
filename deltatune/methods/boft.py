import torch
from torch import nn

from ..combine import MULTIPLY_WEIGHT, TRANSFORM_INPUT, TRANSFORM_SLICE
from ..deltas import Scale
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features


def butterfly_permutation(features: int, block_size: int, level: int) -> torch.Tensor:
    """The index permutation of butterfly factor ``level`` (BOFT, Liu et al. 2024, §4.2): within each group of
    block_size 2^level features, the half-blocks (block_size / 2 features each) taken even ones first, then
    odd ones, so that a block-diagonal matrix between the permutation and its inverse mixes features
    block_size 2^(level - 1) apart. Level 0 is the identity. The order peft's block_butterfly_perm builds."""
    half, group = block_size // 2, block_size * 2 ** level
    chunks = group // half
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
    return torch.cat([start + within for start in range(0, features, group)])


class Butterfly(nn.Module):
    """x -> B x with B = B_0 B_1 ... B_(m-1) (applied to a row vector: x B_(m-1)^T ... B_0^T), each butterfly
    factor B_i = P_i diag(R_i1, ..., R_iD) P_i^T a permuted block-diagonal of D = in / b blocks, each block the
    exact Cayley image (I - S)(I + S)^-1 of S = (R - R^T) / 2 (``R`` (m, D, b, b), zero at init, so B = I).
    ``dropout`` (BOFT's multiplicative dropout): while training, a share of one random factor's blocks is
    replaced by I. Applied to a row vector with gathers, never as the dense (in, in) matrix
    (``input_matrix()`` builds it, for a fold)."""

    def __init__(self, features: int, block_size: int, factors: int, dropout: float = 0.0):
        super().__init__()
        self.features, self.block_size, self.blocks = features, block_size, features // block_size
        self.dropout = dropout
        self.R = nn.Parameter(torch.zeros(factors, self.blocks, block_size, block_size))
        for level in range(factors):
            perm = butterfly_permutation(features, block_size, level)
            self.register_buffer(f"perm{level}", perm, persistent=False)
            self.register_buffer(f"inverse{level}", torch.argsort(perm), persistent=False)

    def rotations(self, train: bool) -> torch.Tensor:  # (m, D, b, b)
        S = 0.5 * (self.R - self.R.transpose(-2, -1))
        eye = torch.eye(self.block_size, dtype=S.dtype, device=S.device).expand_as(S)
        R = torch.linalg.solve(eye + S, eye - S, left=False)
        if train and self.dropout > 0:
            m, D = R.shape[:2]
            chosen = int(torch.randint(0, m, (1,)))
            mask = torch.zeros(m, D, 1, 1, dtype=R.dtype, device=R.device)
            mask[chosen, torch.randperm(D)[:int(self.dropout * D)]] = 1
            R = (1 - mask) * R + mask * eye[:1, :1]
        return R

    def _rotate(self, x, R):  # (..., in): x <- ((x[inv_i]) R_i)[perm_i] for i = m-1 ... 0
        lead = x.shape[:-1]
        for level in reversed(range(R.shape[0])):
            if level:
                x = x[..., getattr(self, f"inverse{level}")]
            x = torch.einsum("...rk,rkc->...rc", x.reshape(*lead, self.blocks, self.block_size), R[level])
            x = x.reshape(*lead, self.features)
            if level:
                x = x[..., getattr(self, f"perm{level}")]
        return x

    def forward(self, x):  # (..., in) -> (..., in)
        return self._rotate(x, self.rotations(self.training).to(x.dtype))

    @torch.no_grad()
    def input_matrix(self) -> torch.Tensor:  # (in, in): rows of I through the map give B^T
        eye = torch.eye(self.features, dtype=self.R.dtype, device=self.R.device)
        return self._rotate(eye, self.rotations(False)).t()


@register
class BOFT(Method):
    """Butterfly orthogonal fine-tuning: h = s * (W0 B x) + b, B a product of m butterfly factors, each a permuted
    block-diagonal orthogonal matrix, and s a trained scale per output row.

    Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization" (ICLR), §4
    (B = prod_i P_i diag(R_i) P_i^T, the blocks the Cayley image of skew matrices, §4.2; the magnitude s of
    §4.3); the GLUE setting of §5.1: m = 2 factors of 8 x 8 blocks, on W_q and W_v. R = 0 and s = 1 at init,
    so training starts at the base model. Mergeable: W0 <- diag(s) W0 B. On a slice of GPT-2's fused c_attn the
    slice's rows are recomputed from B x (the other slices read x).
    """

    name = "boft"
    paper = "Liu et al. 2024, BOFT"
    lr = 1e-3
    combines = (TRANSFORM_INPUT, TRANSFORM_SLICE, MULTIPLY_WEIGHT)
    deviations = ("each block keeps a full b x b matrix of which only the skew part (R - R^T) / 2 counts (peft's layout: "
                  "b (b - 1) / 2 of its b^2 trained entries are free)")

    block_size: int = option(8, min=2, help="features per orthogonal block (even when n_butterfly_factor > 1)")
    n_butterfly_factor: int = option(2, min=1, max=32, help="butterfly factors m (1: one block-diagonal factor)")
    dropout: float = option(0.0, min=0.0, max=1.0, help="share of one factor's blocks set to I per training pass")
    sites: list = option(["attn.q", "attn.v"])

    def check(self, model):
        b, m = self.block_size, self.n_butterfly_factor
        if m > 1 and b % 2:
            raise ConfigError(f"boft: block_size={b} must be even for butterfly factors (n_butterfly_factor={m})")
        for t in self.targets(model, self.sites):
            d_in, _ = target_features(t, self.name)
            span = b * 2 ** (m - 1)
            if d_in % span or (m > 1 and (d_in // b) % 2):
                raise ConfigError(f"boft: {t.name}'s input width {d_in} must be a multiple of block_size x "
                                  f"2^(n_butterfly_factor - 1) = {span}; lower block_size or n_butterfly_factor")

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            rotate = Butterfly(d_in, self.block_size, self.n_butterfly_factor, self.dropout)
            out.append(Placement(t, rotate, TRANSFORM_INPUT if t.out_slice is None else TRANSFORM_SLICE))
            out.append(Placement(t, Scale(d_out), MULTIPLY_WEIGHT, suffix="~s"))  # after the rotation
        return out

    # -- the Hugging Face PEFT format (peft 0.21 BOFT)
    peft_type = "BOFT"

    def to_peft(self, peft, deltas):
        """``<module>.boft_R`` (m, D, b, b) and ``boft_s`` (out, 1). peft's BOFT adapts nn.Linear (and
        convolutions), not GPT-2's Conv1D: refused there. peft runs m > 1 only with its CUDA extension (built
        on a GPU machine); without it, it runs one factor and cannot load an adapter of more (docs/interop.md)."""
        parts = []
        for module_name, marks, params in deltas:
            if marks and marks[-1] == "s":
                parts.append((module_name, marks[:-1], {"l": params["l"][:, None]}))
            else:
                parts.append((module_name, marks, params))
        tensors = peft.tuner_tensors(parts, {"R": "boft_R", "l": "boft_s"}, "BOFT", conv1d=False)
        targets, _ = peft.target_modules({n.rsplit(".", 1)[0] for n in tensors})
        return tensors, {"boft_block_size": self.block_size, "boft_block_num": 0,
                         "boft_n_butterfly_factor": self.n_butterfly_factor, "boft_dropout": float(self.dropout),
                         "target_modules": targets, "fan_in_fan_out": False, "bias": "none", "init_weights": True}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT BOFT on linear projections: the factors and block size from boft_R's shape (what peft built
        it with: one factor where its CUDA extension was missing, whatever the config says). Refused: biases,
        convolutions."""
        if config.get("bias", "none") not in ("none", None):
            raise ConfigError(f"bias={config.get('bias')!r}: deltatune's BOFT trains no biases")
        modules = peft.tuner_modules(tensors, {"boft_R": "R", "boft_s": "l"}, "BOFT")
        deltas, shapes = {}, set()
        for full, got in modules.items():
            d_in, d_out = peft.features(full)
            R = got.get("R")
            m, D, b = R.shape[:3] if R is not None and R.dim() == 4 else (0, 0, 0)
            if m < 1 or b < 2 or D * b != d_in or (m > 1 and (b % 2 or d_in % (b * 2 ** (m - 1)) or D % 2)):
                raise ConfigError(f"'{peft.rel(full)}': boft_R {tuple(R.shape) if R is not None else None} holds no "
                                  f"butterfly factors of blocks that tile its {d_in} input features")
            peft.check_shapes(full, got, {"R": (m, D, b, b), "l": (d_out, 1)}, f"BOFT on a {d_in} -> {d_out} projection")
            shapes.add((m, b))
            deltas[f"{peft.key(full)}.R"], deltas[f"{peft.key(full)}~s.l"] = R, got["l"][:, 0]
        if len(shapes) > 1:
            raise ConfigError(f"the adapter's modules have (factors, block size) {sorted(shapes)}; deltatune's BOFT "
                              "uses one per adapter")
        m, b = shapes.pop()
        (sites,), layers = peft.choose_sites([set(modules)])
        options = {"block_size": b, "n_butterfly_factor": m,
                   "dropout": float(peft.get(config, "boft_dropout", (int, float), 0.0)), "sites": sites, "layers": layers}
        return options, deltas
