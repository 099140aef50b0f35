import math

import torch
from torch import nn

from ..combine import TRANSFORM_INPUT, TRANSFORM_SLICE
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features


class Householder(nn.Module):
    """x -> H x with H = H_1 H_2 ... H_r, H_i = I - 2 u_i u_i^T / |u_i|^2 (``u`` (in, r)); or, with
    ``apply_gs``, H = I - 2 Q Q^T where Q orthonormalises u's columns (Gram–Schmidt: the same projection as a
    QR's Q). Applied in the compact WY form H = I - V T V^T (Schreiber and Van Loan 1989): V the unit
    columns, T^-1 = I / 2 + the strict upper triangle of V^T V, so x -> x - ((x V) T^T) V^T costs two
    (tokens x in x r) products, never the (in, in) matrix (``input_matrix()`` builds it, for a fold).
    peft's init: u in equal pairs (u_1 = u_2, u_3 = u_4, ...; kaiming-uniform), so H = I in exact arithmetic
    (to rounding in floats); an odd r or ``apply_gs`` draws every column apart (as Gram–Schmidt needs)."""

    def __init__(self, features: int, r: int, apply_gs: bool = False):
        super().__init__()
        self.features, self.r, self.apply_gs = features, r, apply_gs
        paired = r % 2 == 0 and not apply_gs
        half = torch.empty(features, r // 2 if paired else r)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        self.u = nn.Parameter(half.repeat_interleave(2, dim=1) if paired else half)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:  # V (in, r), T (r, r): H = I - V T V^T
        if self.apply_gs:
            Q = torch.linalg.qr(self.u).Q
            return Q, 2 * torch.eye(self.r, dtype=Q.dtype, device=Q.device)
        V = self.u / self.u.norm(dim=0)
        eye = torch.eye(self.r, dtype=V.dtype, device=V.device)
        T_inv = eye / 2 + torch.triu(V.t() @ V, diagonal=1)
        return V, torch.linalg.solve_triangular(T_inv, eye, upper=True)

    def forward(self, x):  # (..., in) -> (..., in)
        V, T = self.factors()
        V, T = V.to(x.dtype), T.to(x.dtype)
        return x - (x @ V) @ T.t() @ V.t()

    @torch.no_grad()
    def input_matrix(self) -> torch.Tensor:  # (in, in): H
        V, T = self.factors()
        return torch.eye(self.features, dtype=V.dtype, device=V.device) - V @ T @ V.t()


@register
class HRA(Method):
    """Householder reflection adaptation: h = W0 H x + b, H the product of r Householder reflections.

    Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
    Adaptation" (NeurIPS), §3: W = W0 H_1 ... H_r, H_i = I - 2 u_i u_i^T / |u_i|^2, initialised in equal pairs
    so that training starts at the base model; peft's defaults: r = 8 on W_q and W_v, and its ``apply_GS``
    (reflections made orthogonal by Gram–Schmidt, the paper's strictly orthogonal variant). Mergeable:
    W0 <- W0 H. The paper's orthogonality regulariser (lambda |I - U^T U|^2 added to the loss) is not offered
    (peft has none either).
    On a slice of GPT-2's fused c_attn the slice's rows are recomputed from H x (the other slices read x).
    """

    name = "hra"
    paper = "Yuan et al. 2024, HRA"
    lr = 1e-3
    identity_at_init = False  # paired reflections cancel to rounding (|H - I| ~ 1e-7), not bitwise
    combines = (TRANSFORM_INPUT, TRANSFORM_SLICE)
    deviations = ("the orthogonality regulariser (lambda |I - U^T U|^2 in the loss) is not offered (as in peft); "
                  "apply_gs gives strictly orthogonal reflections instead")

    r: int = option(8, min=1, help="Householder reflections")
    apply_gs: bool = option(False, help="make the reflections orthogonal (Gram–Schmidt); starts away from the base")
    sites: list = option(["attn.q", "attn.v"])

    def check(self, model):
        for t in self.targets(model, self.sites):
            d_in, _ = target_features(t, self.name)
            if self.apply_gs and self.r > d_in:
                raise ConfigError(f"hra: apply_gs makes {self.r} orthonormal columns in {t.name}'s {d_in} input "
                                  f"features; lower r to at most {d_in}")

    def placements(self, model):
        return [Placement(t, Householder(target_features(t, self.name)[0], self.r, self.apply_gs),
                          TRANSFORM_INPUT if t.out_slice is None else TRANSFORM_SLICE)
                for t in self.targets(model, self.sites)]

    # -- the Hugging Face PEFT format (peft 0.21 HRA)
    peft_type = "HRA"

    def to_peft(self, peft, deltas):
        """``<module>.hra_u`` (in, r). peft's HRA adapts nn.Linear (and convolutions), not GPT-2's Conv1D:
        refused there."""
        tensors = peft.tuner_tensors(deltas, {"u": "hra_u"}, "HRA", conv1d=False)
        targets, _ = peft.target_modules({n[:-len(".hra_u")] for n in tensors})
        return tensors, {"r": self.r, "apply_GS": bool(self.apply_gs), "target_modules": targets, "bias": "none",
                         "init_weights": True}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT HRA on linear projections. Refused: biases, convolutions."""
        if config.get("bias", "none") not in ("none", None):
            raise ConfigError(f"bias={config.get('bias')!r}: deltatune's HRA trains no biases")
        r = peft.get(config, "r", int, 8)
        modules = peft.tuner_modules(tensors, {"hra_u": "u"}, "HRA")
        deltas = {}
        for full, got in modules.items():
            d_in, d_out = peft.features(full)
            peft.check_shapes(full, got, {"u": (d_in, r)}, f"{r} reflections of a {d_in} -> {d_out} projection")
            deltas[f"{peft.key(full)}.u"] = got["u"]
        (sites,), layers = peft.choose_sites([set(modules)])
        return {"r": r, "apply_gs": bool(config.get("apply_GS", False)), "sites": sites, "layers": layers}, deltas
