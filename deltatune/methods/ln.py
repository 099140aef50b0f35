import re

from ..errors import ConfigError
from ..registry import Method, register
from ..sites import resolve


@register
class LNTuning(Method):
    """Train only the gains and biases of every LayerNorm (RMSNorm on Llama), plus the task head.

    Qi et al. 2022, "Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language
    Models" (arXiv 2211.08682): about 0.03% of the parameters.
    """

    name = "ln"
    paper = "Qi et al. 2022, LN-tuning"
    lr = 3e-3  # chosen on the validation split at the demo budget: docs/demo/lr-sweep.md
    kind = "selection"

    def selected(self, model):
        return [f"{t.name}.{n}" for t in resolve(model, "ln", self.layers) for n, _ in t.module.named_parameters()]

    # -- the Hugging Face PEFT format (peft 0.21 LN_TUNING); ``peft``: deltatune.formats.peft.Bridge
    peft_type = "LN_TUNING"

    def to_peft(self, peft, deltas):
        """``<module>.ln_tuning_layers.<parameter>``: peft's LN tuning runs a whole copy of each targeted norm in
        its place, so the copy holds the trained values of every parameter of the norm (gain, and bias where
        the norm has one), which is what this method trains in place."""
        modules = peft.trained_base()
        if not modules:
            raise ConfigError("an ln adapter holds the trained LayerNorm parameters (base.*); this one has none")
        tensors = {f"{peft.rel(module)}.ln_tuning_layers.{pname}": t
                   for module, params in modules.items() for pname, t in params.items()}
        targets, _ = peft.target_modules({peft.rel(module) for module in modules})
        return tensors, {"target_modules": targets}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """The copies of the norms become the trained values of the norms' own parameters, and ``layers`` the
        blocks they lie in (every block when a norm outside the blocks is tuned). A norm of those layers that the
        file holds no copy of keeps the model's value, as it does in peft (which copies the module it wraps).
        Refused: a copy of any module but a norm that ``ln`` tunes, and copies that do not fit the norm."""
        norms = {t.name: t for t in resolve(peft.model, "ln")}
        got: dict[str, dict] = {}
        for k, t in tensors.items():
            m = re.fullmatch(r"(.+)\.ln_tuning_layers\.([^.]+)", k)
            if m is None:
                raise ConfigError(f"tensor '{k}' is not an LN tuning copy ('<module>.ln_tuning_layers.<parameter>')")
            got.setdefault(peft.full(m.group(1)), {})[m.group(2)] = t
        if not got:
            raise ConfigError("the adapter holds no LN tuning tensors")
        for full, params in got.items():
            if full not in norms:
                try:
                    what = type(peft.model.get_submodule(full)).__name__
                except AttributeError:
                    raise ConfigError(f"the adapter tunes '{peft.rel(full)}', which this model does not have; load it "
                                      "onto the model it was trained on") from None
                shown = ", ".join(sorted({peft.rel(n).rsplit(".", 1)[-1] for n in norms}))
                raise ConfigError(f"the adapter tunes '{peft.rel(full)}' ({what}), which is not one of the norms "
                                  f"deltatune's ln tunes ({shown}); load this adapter with peft, or train one whose target_modules "
                                  "are among those norms")
            want = {n: tuple(p.shape) for n, p in norms[full].module.named_parameters()}
            peft.check_shapes(full, params, want, f"this model's {type(norms[full].module).__name__}")
        used = {norms[n].layer for n in got}
        layers = None if None in used else sorted(used)
        values = dict(peft.model.named_parameters())
        for target in resolve(peft.model, "ln", layers):
            for pname, _ in target.module.named_parameters():
                name = f"{target.name}.{pname}"
                peft.base[name] = got[target.name][pname] if target.name in got else values[name].detach().to("cpu")
        return {"layers": layers}, {}
