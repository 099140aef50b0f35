import torch
from torch import nn

from ..combine import REPLACE_ROWS
from ..deltas import RowsOf, TokenRows
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import Target, find_backbone

SHARED = "tokens"  # the adapter's one TokenRows: shared~tokens


def holders(model: nn.Module, every_name: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of ``model`` whose weight is the input embedding matrix E, the input
    embedding first: a tied LM head, an encoder-decoder's other embedding. ``every_name``: a module reachable
    under several names (T5's shared and encoder.embed_tokens) once per name, as peft names them."""
    _, backbone = find_backbone(model)
    embed = backbone.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=not every_name) if not n.startswith("deltatune")]
    return ([(n, m) for n, m in named if m is embed][:None if every_name else 1]
            + [(n, m) for n, m in named if m is not embed and getattr(m, "weight", None) is weight])


@register
class TrainableTokens(Method):
    """Trainable tokens: the rows of the token embedding matrix E for chosen token ids train, all else is frozen.

    As peft's TrainableTokens (peft 0.21; no paper of its own), for training the embeddings of a few new or
    changed tokens without the whole matrix: values (n, d) for the n chosen rows, starting at
    E[ids], replace those rows wherever E is used: at the input embedding and at every module tied to it (an LM
    head reads them as its output rows for those ids). Mergeable, exactly: the rows are written into E
    (merged equals unmerged; unmerge copies the original rows back, bitwise). In one line: E'[i] = v_i for the
    chosen ids i, E'[j] = E[j] for every other id.
    """

    name = "trainable-tokens"
    paper = "peft's TrainableTokens (no paper)"
    lr = 1e-3  # an Adam-typical rate for embedding rows (not tuned here)
    combines = (REPLACE_ROWS,)
    honours_layers = False  # the rows belong to the embedding, below every layer
    families = ("bert", "gpt2", "llama", "t5", "bart")

    tokens: list = option([], help="the token ids whose rows of the embedding matrix train (required)")

    def check(self, model):
        _, backbone = find_backbone(model)
        embed = backbone.get_input_embeddings()
        if not isinstance(embed, nn.Embedding):
            raise ConfigError(f"trainable-tokens trains rows of a token embedding; this model's input embedding is "
                              f"a {type(embed).__name__}")
        vocab = embed.num_embeddings
        if not self.tokens:
            raise ConfigError("trainable-tokens needs the token ids to train: tokens=[...]; e.g. --set tokens=5,17, "
                              "or the ids tokenizer.convert_tokens_to_ids gives for new tokens")
        bad = [t for t in self.tokens if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"trainable-tokens: tokens must be ids in 0..{vocab - 1} (this model's vocabulary), "
                              f"got {bad[:3]}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ConfigError(f"trainable-tokens: token ids repeat in {self.tokens}; give each id once")

    def placements(self, model):
        found = holders(model)
        embed = found[0][1]
        rows = TokenRows(embed.weight, self.tokens)
        out = []
        for i, (name, module) in enumerate(found):
            if not isinstance(module, (nn.Embedding, nn.Linear)):
                raise ConfigError(f"trainable-tokens: {name} ({type(module).__name__}) shares the embedding matrix, "
                                  "and only embeddings and linear heads are supported")
            scale = float(getattr(module, "embed_scale", 1.0)) if isinstance(module, nn.Embedding) else 1.0
            # the first holder folds the rows into E; the others share E, so they are folded by it already
            delta = RowsOf(rows, SHARED, scale, foldable=i == 0)
            out.append(Placement(Target("embed", name, module, None), delta, REPLACE_ROWS))
        return out

    # -- the Hugging Face PEFT format (peft 0.21 TRAINABLE_TOKENS); ``peft``: deltatune.formats.peft.Bridge
    peft_type = "TRAINABLE_TOKENS"
    peft_target_rule = False  # target_modules read its own way (registry.Method.peft_target_rule)

    def to_peft(self, peft, deltas):
        """``<module>.trainable_tokens_delta`` (n, d), the new rows, at the input embedding and (as peft saves
        them) again at every module tied to it; ``token_indices`` in the config."""
        shared = next((params for module, marks, params in deltas if module == "shared" and marks == (SHARED,)), None)
        if shared is None:
            raise ConfigError("a trainable-tokens adapter holds its rows (shared~tokens)")
        names = [peft.rel(name) for name, _ in holders(peft.model, every_name=True)]
        # a copy per name: safetensors refuses tensors that share memory
        tensors = {f"{name}.trainable_tokens_delta": shared["rows"].clone() for name in names}
        return tensors, {"token_indices": list(self.tokens), "target_modules": [names[0]], "init_weights": True}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        ids = config.get("token_indices")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigError(f"token_indices must be a non-empty list of token ids, got {str(ids)[:80]}")
        ours = {peft.rel(name) for name, _ in holders(peft.model, every_name=True)}
        values = None
        for key, t in tensors.items():
            name, _, what = key.rpartition(".")
            if what != "trainable_tokens_delta":
                raise ConfigError(f"unexpected tensor '{key}' in a trainable tokens adapter")
            if name not in ours:
                raise ConfigError(f"the adapter trains rows of '{name}', which is not this model's input embedding "
                                  f"or tied to it ({', '.join(sorted(ours))}); deltatune trains the input "
                                  "embedding's rows")
            if values is None:
                values = t
            elif t.shape != values.shape or not torch.equal(t, values):
                raise ConfigError(f"the copies of the rows at the tied modules differ ('{key}'); the adapter is "
                                  "damaged")
        if values is None or values.dim() != 2 or values.shape[0] != len(ids):
            raise ConfigError(f"trainable_tokens_delta must be ({len(ids)}, d) for {len(ids)} token_indices")
        return {"tokens": list(ids)}, {f"shared~{SHARED}.rows": values}
