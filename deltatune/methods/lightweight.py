from ..registry import Method, option, register
from ..sites import num_layers, resolve
from .telly import upper_parameters


@register
class Lightweight(Method):
    """Lightweight fine-tuning: train only the top layer, or only the embeddings and output layer.

    The "personalization" seed paper's two lightweight schemes: ``mode='top'`` trains the last block
    (and the final norm); ``mode='embed_output'`` trains the input embeddings and the output
    layer (the task head, or the LM head for generative models).
    """

    name = "lightweight"
    paper = "lightweight fine-tuning (top layer / embeddings + output)"
    lr = 1e-4
    kind = "selection"
    honours_layers = False  # mode chooses the layers

    mode: str = option("top", choices=("top", "embed_output"))

    def selected(self, model):
        if self.mode == "top":
            return upper_parameters(model, num_layers(model) - 1)
        names = [f"{t.name}.{n}" for t in resolve(model, "embed") for n, _ in t.module.named_parameters()]
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is not None:
            by_id = {id(p): n for n, p in model.named_parameters()}
            names += [by_id[id(p)] for p in out_emb.parameters() if by_id.get(id(p)) not in names]
        return names
