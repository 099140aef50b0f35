from typing import ClassVar

from ..registry import Composite, option, register
from .parallel import ParallelAdapter
from .prefix import Prefix


@register
class MAM(Composite):
    """Mix-And-Match adapter: prefix tuning in every attention plus a scaled parallel adapter at the FFN.

    He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning" (ICLR), §4.6:
    prefix keys/values of length 30 with the MLP reparameterisation (hidden 800), and
    h = FFN(x) + s * W_up ReLU(W_down x) reading the FFN input, bottleneck 512, s = 4 (the XSum and
    en-ro setting that defines the MAM adapter). On BART-large this is 6.7% of the parameters once
    the prefix MLP is folded away [calc]. Their GLUE setting (roberta-base) is prefix_length=16,
    bottleneck=16, scale=2. The adapter's dropout as in the released code (see ``parallel``):
    inside the adapter (``dropout``, the model's 0.1 there), its output added after the FFN's
    dropout. Not mergeable.
    """

    name = "mam"
    paper = "He et al. 2022, MAM adapter"
    lr = 5e-5
    identity_at_init = False  # the prefix
    combines = (*Prefix.combines, *ParallelAdapter.combines)
    parts = {
        "prefix": ("prefix", {"length": "prefix_length", "hidden": "prefix_hidden"}, {}),
        "adapter": ("parallel", {"bottleneck": "bottleneck", "scale": "scale", "dropout": "dropout", "join": "join"},
                    {}),
    }
    old_file_options: ClassVar[dict] = ParallelAdapter.old_file_options

    prefix_length: int = option(30, min=1)
    prefix_hidden: int = option(800, min=0, help="prefix MLP width; 0 trains the table directly")
    bottleneck: int = option(512, min=1, help="parallel adapter bottleneck")
    scale: float = option(4.0, min=0.0, help="parallel adapter scale s")
    dropout: float = option(0.1, min=0.0, max=0.99, help="dropout inside the parallel adapter (the unify code: "
                                                          "the model's dropout, 0.1)")
    join: str = option("after_dropout", choices=["after_dropout", "ffn.out"],
                       help="where the adapter's output is added: after the FFN's dropout (the unify code), "
                            "or to the FFN output projection (before its dropout)")

    def folded_options(self) -> dict:
        return {**self.options(), "prefix_hidden": 0}
