from typing import ClassVar

from ..combine import PARALLEL_SPAN, SPAN_AROUND_NORM
from ..deltas import Bottleneck
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import SITE_MAP, attention_shape, family_of, resolve, target_features


@register
class ParallelAdapter(Method):
    """An adapter beside the FFN: h = FFN(x) + s * W_up dropout(ReLU(W_down x)), reading the FFN input x.

    He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", §3 (PA);
    s = 1 is the plain parallel adapter, s > 1 the scaled one (s = 4 on XSum, 2 on GLUE). No adapter
    LayerNorm; LoRA-style init (W_down kaiming-uniform, W_up and biases zero). Bottleneck 16 is the
    paper's GLUE setting (512 for XSum). Not mergeable.

    Dropout as in the released code (``Adapter_Layer`` in petl_factory.py and its call in
    modeling_bart.py / modeling_roberta.py): inside the adapter, on the ReLU output (p = the model's
    dropout there, 0.1 for BART and RoBERTa: the ``dropout`` option), and the adapter's output joins
    *after* the FFN's own dropout, so that dropout never touches it. Post-LN models (BERT, BART):
    LN(residual + dropout(FFN(x)) + adapter) at the FFN's LayerNorm; pre-LN models (GPT-2, Llama,
    T5, ViT): added to the block output, which is residual + dropout(FFN(LN(h))).
    ``join='ffn.out'`` adds it to the FFN output projection instead (before the FFN's dropout; the
    placement of adapters saved before this option existed: the same function at evaluation).
    """

    name = "parallel"
    paper = "He et al. 2022, Unified View (parallel adapter)"
    lr = 1e-3
    combines = (PARALLEL_SPAN, SPAN_AROUND_NORM)
    # Adapter files written before these options existed hold adapters built this way.
    old_file_options: ClassVar[dict] = {"dropout": 0.0, "join": "ffn.out"}

    bottleneck: int = option(16, min=1)
    scale: float = option(1.0, min=0.0)
    dropout: float = option(0.1, min=0.0, max=0.99, help="dropout inside the adapter, on the ReLU output "
                                                          "(the unify code: the model's dropout, 0.1)")
    join: str = option("after_dropout", choices=["after_dropout", "ffn.out"],
                       help="where the adapter's output is added: after the FFN's dropout (the unify code), "
                            "or to the FFN output projection (before its dropout)")

    def placements(self, model):
        blocks = [b.name for b in resolve(model, "block", self.layers)]

        def block_of(t):  # layer indices repeat across encoder and decoder: pair by block path
            return next(b for b in blocks if t.name == b or t.name.startswith(b + "."))

        reads = {block_of(t): t for t in resolve(model, "ffn.in", self.layers)}
        if self.join == "ffn.out":
            site, combine = "ffn.out", PARALLEL_SPAN
        elif "ffn.ln" in SITE_MAP[family_of(model)]:  # post-LN: the norm of FFN output + residual
            site, combine = "ffn.ln", SPAN_AROUND_NORM
        else:  # pre-LN: the block ends with residual + dropout(FFN(...))
            site, combine = "block", PARALLEL_SPAN
        d = attention_shape(model)[0]
        out = []
        for t in resolve(model, site, self.layers):
            source = reads.get(block_of(t))
            if source is None:
                raise ConfigError(f"parallel: no FFN input projection found in the block of {t.name}")
            d_in = target_features(source, self.name)[0]
            if d_in != d:
                raise ConfigError(f"parallel: FFN input width {d_in} differs from the hidden width {d} at {t.name}")
            delta = Bottleneck(d_in, self.bottleneck, "relu", init="lora", scale=self.scale, dropout=self.dropout)
            out.append(Placement(t, delta, combine, source=source))
        return out
