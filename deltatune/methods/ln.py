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
