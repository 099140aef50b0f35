from ..registry import Method, register
from ..errors import ConfigError
from ..sites import backbone_parameters, find_backbone


@register
class BitFit(Method):
    """Train only the bias terms of the backbone (plus the task head).

    Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
    Masked Language-models", §3: about 0.08% of BERT's parameters. Architectures without biases
    (Llama, T5) are rejected rather than silently training nothing.
    """

    name = "bitfit"
    paper = "Ben Zaken et al. 2022, BitFit"
    lr = 1e-3
    kind = "selection"
    families = ("bert", "gpt2", "bart", "vit")

    def selected(self, model):
        names = self.within_layers(model, [n for n, _ in backbone_parameters(model) if n.endswith("bias")])
        if not names:
            name = type(find_backbone(model)[1]).__name__
            raise ConfigError(f"bitfit: {name} has no bias terms; try 'ln' or 'lora'")
        return names
