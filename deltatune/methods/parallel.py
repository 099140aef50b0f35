from ..combine import PARALLEL_SPAN
from ..registry import Method, Placement, option, register
from ..deltas import Bottleneck
from ..errors import ConfigError
from ..sites import resolve, target_features


@register
class ParallelAdapter(Method):
    """An adapter beside the FFN: h = FFN(x) + s * W_up ReLU(W_down x), reading the FFN input x.

    He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", §3 (PA);
    s = 1 is the plain parallel adapter, s > 1 the scaled one (s = 4 on XSum, 2 on GLUE). No adapter
    LayerNorm; LoRA-style init (W_down kaiming-uniform, W_up and biases zero). Bottleneck 16 is the
    paper's GLUE setting (512 for XSum). Not mergeable.
    """

    name = "parallel"
    paper = "He et al. 2022, Unified View (parallel adapter)"
    lr = 1e-3
    combines = (PARALLEL_SPAN,)

    bottleneck: int = option(16, min=1)
    scale: float = option(1.0, min=0.0)

    def placements(self, model):
        blocks = [b.name + "." for b in resolve(model, "block", self.layers)]

        def block_of(t):  # layer indices repeat across encoder and decoder: pair by block path
            return next(b for b in blocks if t.name.startswith(b))

        reads = {block_of(t): t for t in resolve(model, "ffn.in", self.layers)}
        out = []
        for t in resolve(model, "ffn.out", self.layers):
            source = reads.get(block_of(t))
            if source is None:
                raise ConfigError(f"parallel: no FFN input projection found in the block of {t.name}")
            d_in, d_out = target_features(source, self.name)[0], target_features(t, self.name)[1]
            if d_in != d_out:
                raise ConfigError(f"parallel: FFN input width {d_in} differs from output width {d_out} at {t.name}")
            delta = Bottleneck(d_in, self.bottleneck, "relu", init="lora", scale=self.scale)
            out.append(Placement(t, delta, PARALLEL_SPAN, source=source))
        return out
