from ..combine import PREFIX_KV
from ..registry import Method, Placement, option, register
from ..deltas import PrefixReparam, PrefixTable
from ..sites import attention_shape


@register
class Prefix(Method):
    """Trainable key/value prefixes of length l at every attention: K <- [P_K; K], V <- [P_V; V].

    Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", §4.3. During
    training P = MLP(P') (tanh, hidden 512), one MLP producing every layer's prefix as in the paper; ``dt.save_adapter`` folds the MLP
    away and stores only the table. l = 10 (table-to-text; 200 for summarisation). Works with
    padding, causal masks and generate()'s key/value cache. Not mergeable.

    Positions: the prefix is a set of key/value pairs with no position of its own, and the real tokens
    keep positions 0..T-1. In the paper's sequence [PREFIX; x; y] (and in its code and peft, which
    pass the prefix as past_key_values) the real tokens sit at n..n+T-1. With rotary positions the
    two are the same function once the prefix keys are rotated by their positions (the PEFT
    conversion does that); with learned absolute positions (GPT-2, BERT, BART) they differ, and the
    paper's placement is had by passing ``position_ids = arange(n, n + T)``
    (tests/test_interop.py::test_prefix_refusal_reason_is_the_position_shift checks that this then
    equals peft's outputs). Kept at 0..T-1 because the input then sees the positions it was
    pretrained on and keeps the whole position table (a length-200 prefix would cost BART 200 of
    its 1024).
    """

    name = "prefix"
    paper = "Li & Liang 2021, Prefix-Tuning"
    lr = 5e-4
    identity_at_init = False
    combines = (PREFIX_KV,)
    deviations = ("the real tokens keep positions 0..T-1 (the paper's code and peft put them after the prefix, "
                  "at n..n+T-1): the same function under rotary positions once the prefix keys are rotated, a "
                  "different one under learned absolute positions (GPT-2, BERT, BART); pass position_ids = "
                  "arange(n, n + T) for the paper's placement.")

    length: int = option(10, min=1)
    hidden: int = option(512, min=0, help="MLP reparameterisation width; 0 trains the table directly")
    sites: list = option(["attn.kv"])

    def folded_options(self) -> dict:
        return {**self.options(), "hidden": 0}

    def placements(self, model):
        d_model, _, kv_heads, head_dim = attention_shape(model)
        targets = self.targets(model, self.sites)
        width = 2 * kv_heads * head_dim
        reparam = PrefixReparam(self.length, d_model, self.hidden, len(targets), width) if self.hidden else None
        return [Placement(t, PrefixTable(self.length, kv_heads, head_dim, reparam, i), PREFIX_KV)
                for i, t in enumerate(targets)]
