from ..core import Method, register
from ..sites import find_backbone


@register
class Full(Method):
    """The baseline: every backbone parameter is trained (with the task head).

    detach() restores the pretrained weights from a copy taken at attach time, so this method
    holds one extra copy of the backbone in memory.
    """

    name = "full"
    paper = "full fine-tuning (baseline)"
    lr = 5e-5
    kind = "selection"

    def selected(self, model):
        prefix, backbone = find_backbone(model)
        return [f"{prefix}.{n}" if prefix else n for n, _ in backbone.named_parameters()]
