from ..registry import Method, option, register
from ..errors import ConfigError
from ..sites import backbone_parameters, num_layers, resolve


def upper_parameters(model, first_trained: int) -> list[str]:
    """Backbone parameters of blocks >= ``first_trained`` and of the final norms above the blocks.

    Embeddings (including their LayerNorm), poolers and lower blocks are left out.
    """
    blocks = resolve(model, "block")
    trained = [b.name + "." for b in blocks if b.layer >= first_trained]
    frozen = [b.name + "." for b in blocks if b.layer < first_trained]
    norms = {f"{t.name}." for t in resolve(model, "ln") if t.layer is None and "embed" not in t.name}
    names = []
    for full, _ in backbone_parameters(model):
        if any(full.startswith(b) for b in trained) or (
            not any(full.startswith(b) for b in frozen) and any(full.startswith(m) for m in norms)
        ):
            names.append(full)
    return names


@register
class Telly(Method):
    """Freeze the embeddings, the pooler and the bottom k layers; fine-tune the layers above.

    Shi et al. 2023, "Towards Efficient Fine-tuning of Pre-trained Code Models" (ISSTA), Telly-K.
    The paper sweeps k in 0..11 on 12 layers and finds k up to 6 as good as full fine-tuning;
    the default k is half the layers. Frozen lower layers build no autograd graph.
    """

    name = "telly"
    paper = "Shi et al. 2023, Telly"
    lr = 2e-4  # chosen on the validation split at the demo budget: docs/demo/lr-sweep.md
    kind = "selection"
    honours_layers = False  # k chooses the layers
    auto_options = {"k": "freeze_depth"}  # k="auto": `deltatune train` picks it from a layer analysis
    deviations = ("by default the frozen bottom layers run without dropout while training (a fixed feature "
                  "extractor, ~25% faster steps on CPU, and what embedding recycling caches); the paper "
                  "freezes them with dropout on: train with `--frozen-dropout` (TrainConfig(frozen_dropout=True)) "
                  "for its behaviour.")

    # object: a whole number or "auto" (checked in __post_init__; the registry checks one type per option)
    k: object | None = option(None, help="number of frozen bottom layers (default: half); 'auto': `deltatune train` "
                                         "picks it from a layer analysis (deltatune.training.freeze)")

    def __post_init__(self):
        if self.k is not None and self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0):
            raise ConfigError(f"telly: option 'k' must be a whole number >= 0 or 'auto', got {self.k!r}")

    def frozen_layers(self, model) -> int:
        if self.k == "auto":
            raise ConfigError("telly: k='auto' is chosen from the task's data by `deltatune train --method telly --set "
                              "k=auto` (or deltatune.training.freeze.freeze_depth); dt.attach needs a number of layers")
        return num_layers(model) // 2 if self.k is None else self.k

    def check(self, model):
        super().check(model)
        if isinstance(self.k, int) and self.k > num_layers(model):
            raise ConfigError(f"telly: k={self.k} exceeds the model's {num_layers(model)} layers; use 0..{num_layers(model)}")

    def selected(self, model):
        return upper_parameters(model, self.frozen_layers(model))
