import torch

from ..combine import PREPEND_PROMPT
from ..registry import Method, Placement, option, register
from ..deltas import SoftPrompt
from ..sites import find_backbone, resolve


@register
class Prompt(Method):
    """Soft prompt tuning: l trainable vectors prepended to the input token embeddings only.

    Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", §2-3. Init
    from the embeddings of vocabulary rows sampled among the first 5000 ids (the ATTEMPT/compacter
    baselines). The prompt positions are removed from the backbone's outputs, so heads and losses
    see the original sequence; masks, padding and generate() are handled. Not mergeable.
    """

    name = "prompt"
    paper = "Lester et al. 2021, Prompt Tuning"
    lr = 3e-1
    identity_at_init = False
    combines = (PREPEND_PROMPT,)
    honours_layers = False  # the prompt is at the input embeddings, below every layer
    families = ("bert", "gpt2", "llama", "t5", "bart")

    length: int = option(20, min=1)
    init: str = option("vocab", choices=("vocab", "random"))
    seed: int = option(0)

    def placements(self, model):
        _, backbone = find_backbone(model)
        embed = backbone.get_input_embeddings()
        target = resolve(model, "embed")[0]
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            if self.init == "vocab":
                ids = torch.randint(0, min(5000, embed.num_embeddings), (self.length,), generator=gen)
                init = embed(ids.to(embed.weight.device)).float()
            else:
                init = torch.randn(self.length, embed.embedding_dim, generator=gen) * embed.weight.float().std()
        return [Placement(target, SoftPrompt(init), PREPEND_PROMPT)]
