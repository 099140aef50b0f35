import re

import torch

from ..combine import MULTIPLY, MULTIPLY_INPUT
from ..errors import ConfigError
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

    # -- the Hugging Face PEFT format (peft 0.21 IA3); ``peft``: deltatune.formats.peft.Bridge
    peft_type = "IA3"

    def to_peft(self, peft, deltas):
        """``<module>.ia3_l``: (out, 1) scales the output, (1, in) the input of the ``feedforward_modules``.
        A slice scale on GPT-2's c_attn becomes a full-width vector with ones elsewhere."""
        outputs: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        for module_name, marks, params in deltas:
            name, l = peft.rel(module_name), params["l"]
            if "in" in marks:
                inputs[name] = l
                continue
            vec = outputs.setdefault(name, torch.ones(peft.features(module_name)[1], dtype=l.dtype))  # scales at one module multiply
            if marks:  # a slice of GPT-2's c_attn: ones on the other slices leave them as they are
                a, b = peft.fused_rows(module_name, marks[0])
                vec[a:b] *= l
            else:
                vec *= l
        both = sorted(set(inputs) & set(outputs))
        if both:
            raise ConfigError(f"peft's (IA)^3 scales either the input or the output of a module, not both; this adapter "
                              f"scales both at {both[:3]}")
        tensors = {f"{n}.ia3_l": v.reshape(-1, 1) for n, v in outputs.items()}
        tensors.update({f"{n}.ia3_l": v.reshape(1, -1) for n, v in inputs.items()})
        targets, ff = peft.target_modules(set(outputs) | set(inputs), subset=set(inputs))
        return tensors, {"target_modules": targets, "feedforward_modules": ff,
                         "fan_in_fan_out": peft.fan_in_fan_out((*outputs, *inputs)), "init_ia3_weights": True}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        outputs, inputs = {}, {}
        for k, t in tensors.items():
            m = re.fullmatch(r"(.+)\.ia3_l", k)
            if m is None:
                raise ConfigError(f"tensor '{k}' is not an (IA)^3 vector")
            name = m.group(1)
            full = peft.full(name)
            try:
                feats = peft.features(full)
            except AttributeError:
                raise ConfigError(f"the adapter targets '{name}', which this model does not have") from None
            if feats is None:
                raise ConfigError(f"the adapter targets '{name}' ({type(peft.model.get_submodule(full)).__name__}); "
                                  "deltatune's (IA)^3 scales linear projections only")
            ff = peft.is_feedforward(config, name)
            if ff is None:
                ff = t.dim() == 2 and t.shape[0] == 1 and t.shape[1] != 1
            want = (1, feats[0]) if ff else (feats[1], 1)
            if tuple(t.shape) != want:
                kind = "feedforward (input)" if ff else "output"
                raise ConfigError(f"'{name}': ia3_l has shape {tuple(t.shape)}, a {kind} scale of this module needs {want}")
            (inputs if ff else outputs)[full] = t.reshape(-1)
        (out_sites, in_sites), layers = peft.choose_sites([set(outputs), set(inputs)])
        deltas = {peft.key(n) + ".l": v for n, v in outputs.items()}
        deltas.update({peft.key(n, "in") + ".l": v for n, v in inputs.items()})
        return {"sites": out_sites, "input_sites": in_sites, "layers": layers}, deltas
