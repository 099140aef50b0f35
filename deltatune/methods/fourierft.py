import torch
from torch import nn

from ..combine import PARALLEL
from ..deltas import WeightDelta
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features


def spectral_entries(out_features: int, in_features: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the n fixed random spectral entries of an (out, in) weight: the first n of a permutation
    of its out x in positions drawn from a CPU generator seeded with ``seed``, as peft draws them (so the same
    seed gives the same entries in both, for every layer of one shape)."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return flat // in_features, flat % in_features


class SparseSpectrum(WeightDelta):
    """dW = scale * Re(IDFT2(F)), F (out, in) zero but for n trained coefficients ``spectrum`` (n,) at fixed
    random entries (non-persistent buffers: drawn again from the seed). The inverse 2-D DFT runs in float32
    (torch's FFT takes no half precision)."""

    def __init__(self, in_features: int, out_features: int, n: int, scale: float, seed: int, init: str = "gaussian"):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        rows, cols = spectral_entries(out_features, in_features, n, seed)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.spectrum = nn.Parameter(torch.randn(n) if init == "gaussian" else torch.zeros(n))

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        dense = torch.zeros(self.out_features, self.in_features, device=self.spectrum.device)
        dense = dense.index_put((self.rows, self.cols), self.spectrum.float())
        return (torch.fft.ifft2(dense).real * self.scale).to(self.spectrum.dtype)


@register
class FourierFT(Method):
    """A sparse spectrum beside a frozen projection: h = W0 x + alpha Re(IDFT2(F)) x, F holding n trained
    coefficients at fixed random entries shared by every layer of one shape.

    Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (ICML), §3 (dW =
    alpha Re(F^-1(S)), S sparse with n entries drawn once from a seed, Eq. 2-4); peft's defaults: n = 1000,
    alpha = 150, seed 777, coefficients drawn from N(0, 1) (so it does not start exactly at the base model;
    ``init='zero'`` does), on W_q and W_v. Mergeable: W0 += dW.
    """

    name = "fourierft"
    paper = "Gao et al. 2024, FourierFT"
    lr = 5e-2  # the released GLUE runs (RoBERTa-base) train the coefficients at 0.05 to 0.12: each moves dW by ~alpha / (out in)
    identity_at_init = False  # peft's default: the coefficients start at N(0, 1) (init='zero' starts at the base)
    combines = (PARALLEL,)
    deviations = "the coefficients start at N(0, 1) (peft's default), not at the base model; init='zero' starts there"

    n_frequency: int = option(1000, min=1, help="trained spectral coefficients per module")
    scaling: float = option(150.0, min=0.0, help="alpha, the scale of the inverse DFT")
    random_loc_seed: int = option(777, min=0, max=2**63 - 1, help="the seed of the coefficients' entries")
    init: str = option("gaussian", choices=("gaussian", "zero"), help="coefficients from N(0, 1) (peft) or zero")
    sites: list = option(["attn.q", "attn.v"])

    def check(self, model):
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            if self.n_frequency > d_in * d_out:
                raise ConfigError(f"fourierft: n_frequency={self.n_frequency} exceeds the {d_out} x {d_in} = "
                                  f"{d_in * d_out} entries of {t.name}; lower n_frequency")

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            delta = SparseSpectrum(d_in, d_out, self.n_frequency, self.scaling, self.random_loc_seed, self.init)
            out.append(Placement(t, delta, PARALLEL))
        return out

    # -- the Hugging Face PEFT format (peft 0.21 FOURIERFT)
    peft_type = "FOURIERFT"

    def to_peft(self, peft, deltas):
        """``<module>.fourierft_spectrum`` (n,); the entries are drawn again from ``random_loc_seed``. peft adapts
        Linear and GPT-2's Conv1D whole: a slice of c_attn (attn.q) has entries over its own shape, refused."""
        tensors = peft.tuner_tensors(deltas, {"spectrum": "fourierft_spectrum"}, "FourierFT", conv1d=True)
        chosen = {n[:-len(".fourierft_spectrum")] for n in tensors}
        targets, _ = peft.target_modules(chosen)
        return tensors, {"n_frequency": self.n_frequency, "scaling": float(self.scaling),
                         "random_loc_seed": self.random_loc_seed, "target_modules": targets,
                         "fan_in_fan_out": peft.fan_in_fan_out(chosen), "bias": "none", "n_frequency_pattern": {},
                         "init_weights": self.init == "zero"}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT FourierFT on Linear or GPT-2 Conv1D modules. Refused: biases, n_frequency_pattern."""
        if config.get("bias", "none") not in ("none", None):
            raise ConfigError(f"bias={config.get('bias')!r}: deltatune's FourierFT trains no biases")
        peft.refuse_patterns(config, "FourierFT")
        n = peft.get(config, "n_frequency", int, 1000)
        seed = peft.get(config, "random_loc_seed", int, 777)
        modules = peft.tuner_modules(tensors, {"fourierft_spectrum": "spectrum"}, "FourierFT", conv1d=True)
        deltas = {}
        for full, got in modules.items():
            d_in, d_out = peft.features(full)
            peft.check_shapes(full, got, {"spectrum": (n,)}, f"n_frequency={n}")
            if n > d_in * d_out:
                raise ConfigError(f"'{peft.rel(full)}': n_frequency={n} exceeds its {d_out} x {d_in} entries")
            deltas[f"{peft.key(full)}.spectrum"] = got["spectrum"]
        (sites,), layers = peft.choose_sites([set(modules)])
        return {"n_frequency": n, "scaling": float(peft.get(config, "scaling", (int, float), 150.0)),
                "random_loc_seed": seed, "init": "zero" if config.get("init_weights") else "gaussian",
                "sites": sites, "layers": layers}, deltas
