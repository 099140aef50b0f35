from ..combine import PREPEND_PROMPT
from ..deltas import PromptEncoder
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import find_backbone, resolve
from .prompt import Prompt


@register
class PTuning(Method):
    """P-tuning: trainable virtual tokens, reparameterised by a prompt encoder, prepended to the input embeddings.

    Liu et al. 2021, "GPT Understands, Too", §3 (the prompt encoder): the prompt is
    h = MLP([LSTM_fwd(e); LSTM_bwd(e)]) of trainable inputs e (length, d): a bidirectional two-layer LSTM
    (width d/2 per direction, as the paper's code) and a ReLU MLP; ``encoder='mlp'`` is peft's three-layer ReLU
    MLP instead (width d by default). The encoder is a training device only: ``dt.save_adapter`` folds it and
    stores the prompt it computes, (length, d), as peft's P_TUNING files do. Placed, masked and stripped from the
    outputs as ``prompt`` is (prompt.py). Not mergeable.
    """

    name = "ptuning"
    paper = "Liu et al. 2021, P-tuning (GPT Understands, Too)"
    lr = 1e-3  # the encoder's layers train at an Adam-typical rate (not tuned here)
    identity_at_init = False
    combines = (PREPEND_PROMPT,)
    honours_layers = False  # the prompt is at the input embeddings, below every layer
    families = Prompt.families
    deviations = ("the virtual tokens are all prepended to the input (as peft); the paper places them in a "
                  "hand-written template around the input and the target ([P0:i] x [Pi+1:m] y)")

    length: int = option(20, min=1)
    encoder: str = option("lstm", choices=("lstm", "mlp", "none"),
                          help="the prompt encoder; 'none': a plain table (a folded adapter)")
    hidden: int = option(0, min=0, help="the encoder's width; 0: d/2 per LSTM direction, d for the MLP")
    dropout: float = option(0.0, min=0.0, max=0.99, help="dropout between the two LSTM layers")

    def folded_options(self) -> dict:
        return {**self.options(), "encoder": "none", "hidden": 0, "dropout": 0.0}

    def placements(self, model):
        _, backbone = find_backbone(model)
        d = backbone.get_input_embeddings().embedding_dim
        delta = PromptEncoder(self.length, d, self.encoder, self.hidden, self.dropout)
        return [Placement(resolve(model, "embed")[0], delta, PREPEND_PROMPT)]

    # -- the Hugging Face PEFT format (peft 0.21 P_TUNING); ``peft``: deltatune.formats.peft.Bridge
    peft_type = "P_TUNING"

    def to_peft(self, peft, deltas):
        """``prompt_embeddings`` (num_virtual_tokens, hidden): the folded prompt, which peft loads as the table it
        prepends (a P_TUNING adapter loaded for inference skips the encoder). The positions agree as for prompt
        tuning; refused where prompt tuning is (``prompt._peft_refusal``)."""
        tensors, fields = Prompt(length=self.length).to_peft(peft, _as_prompt(deltas))
        fields.pop("prompt_tuning_init", None)
        return tensors, {**fields, "encoder_reparameterization_type": "MLP" if self.encoder != "lstm" else "LSTM",
                         "encoder_hidden_size": fields["token_dim"], "encoder_num_layers": 2, "encoder_dropout": 0.0}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        options, deltas = Prompt.from_peft(peft, config, tensors)
        return {"length": options["length"], "encoder": "none", "hidden": 0, "dropout": 0.0}, deltas


def _as_prompt(deltas):
    """The folded P-tuning delta under the parameter name of a soft prompt ('prompt' in both)."""
    if len(deltas) != 1 or set(deltas[0][2]) != {"prompt"}:
        raise ConfigError("a P-tuning adapter holds one folded prompt table")
    return deltas
