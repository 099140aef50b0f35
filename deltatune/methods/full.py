from ..registry import Method, register
from ..sites import backbone_parameters


@register
class Full(Method):
    """The baseline: every backbone parameter is trained (with the task head).

    detach() restores the pretrained weights from a copy taken at attach time, so this method
    holds one extra copy of the backbone in memory.
    """

    name = "full"
    paper = "full fine-tuning (baseline)"
    lr = 1e-4  # chosen on the validation split at the demo budget: docs/demo/lr-sweep.md
    kind = "selection"

    def selected(self, model):
        return self.within_layers(model, [n for n, _ in backbone_parameters(model)])
