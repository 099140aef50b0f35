from ..combine import INTERVENE
from ..deltas import LowRankIntervention
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import attention_shape


@register
class LoReFT(Method):
    """LoReFT: a low-rank edit of the hidden states at chosen positions, phi(h) = h + R^T (W h + b - R h).

    Wu et al. 2024, "ReFT: Representation Finetuning for Language Models" (NeurIPS), §3, eq. 2: R (r, d) has
    orthonormal rows, so the edit moves h only inside the r-dimensional subspace R spans, to the values W h + b
    there. Applied to each adapted block's output (the residual stream) at each row's first ``first`` and last
    ``last`` real tokens, each at most half of the row's tokens (as pyreft picks them), read from the attention
    mask, so left and right padding both work. ``tied``: one intervention for both sides (the paper's "tied"
    weights), else one per side. Defaults are the paper's commonsense/arithmetic runs (as pyreft's examples give
    them: rank 8, f7+l7, tied, every layer, lr 9e-4, no dropout); its GLUE runs use rank 1, f1, dropout 0.05. A
    continuation over a key/value cache edits none of its new tokens (the chosen positions are all in the prompt,
    as pyreft intervenes on the prompt only). Per-row routing works. Not mergeable: it depends on the positions.

    No PEFT library has it in this form (peft 0.21 has no ReFT type); pyreft 0.1.0 is its reference
    implementation (it pins transformers 4.45.1, so the equality test writes eq. 2 out by hand).
    """

    name = "loreft"
    paper = "Wu et al. 2024, ReFT (LoReFT)"
    lr = 9e-4  # the paper's commonsense and arithmetic runs
    identity_at_init = False  # W and b start random, as in pyreft
    combines = (INTERVENE,)
    families = ("bert", "gpt2", "llama")
    deviations = ("R is trained as a free matrix and used with its rows orthonormalised (Gram-Schmidt through a "
                  "Cholesky factor; pyreft: torch's orthogonal parametrisation): the same set of functions, another "
                  "path through it in training; dropout drops entries of the edit (pyreft: of the whole output)")

    r: int = option(8, min=1)
    first: int = option(7, min=0, help="edit each row's first tokens (pyreft's f<n>)")
    last: int = option(7, min=0, help="edit each row's last tokens (pyreft's l<n>)")
    tied: bool = option(True, help="one intervention for the first and the last tokens (else one each)")
    dropout: float = option(0.0, min=0.0, max=0.99)

    def check(self, model):
        if self.first == 0 and self.last == 0:
            raise ConfigError("loreft: first=0 and last=0 choose no position to edit; set first and/or last")
        d = attention_shape(model)[0]
        if self.r > d:
            raise ConfigError(f"loreft: rank r={self.r} exceeds the hidden size {d}; R needs r orthonormal rows of "
                              "width d")

    def placements(self, model):
        d = attention_shape(model)[0]
        # Untied: one intervention per side (pyreft's), unless one side has no position at all.
        one = self.tied or not (self.first and self.last)
        parts = [("both", "")] if one else [("first", "~first"), ("last", "~last")]
        return [Placement(t, LowRankIntervention(d, self.r, self.first, self.last, part, self.dropout), INTERVENE,
                          suffix=suffix)
                for t in self.targets(model, ["block"]) for part, suffix in parts]
