import warnings

import torch

from ..combine import PREPEND_PROMPT
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..deltas import SoftPrompt
from ..sites import find_backbone, resolve


@register
class Prompt(Method):
    """Soft prompt tuning: l trainable vectors prepended to the input token embeddings only.

    Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", §2-3. Init
    from the embeddings of vocabulary rows (§3.2 "sampled vocab"): drawn among the first 5000 ids
    that are real words of the model's tokenizer (no special, [unused] or one-character tokens, no
    WordPiece continuations; for byte-level BPE and SentencePiece, whole-word tokens, whose low ids
    are the frequent merges). The prompt positions are removed from the backbone's outputs (and
    BERT's pooler recomputed from [CLS]), so heads and losses see the original sequence; masks,
    padding and generate() are handled. Not mergeable.
    """

    name = "prompt"
    paper = "Lester et al. 2021, Prompt Tuning"
    # The paper's 0.3 (with Adafactor) scored 0.078 +- 0.014 MRR below 0.1 on the validation split at the
    # demo's budget with AdamW (docs/demo/lr-sweep.md, 2026-11-30); the findings' grid also chose 0.1.
    lr = 1e-1
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
                pool = torch.tensor(word_ids(model, embed.num_embeddings)[:5000])
                ids = pool[torch.randint(0, len(pool), (self.length,), generator=gen)]
                init = embed(ids.to(embed.weight.device)).float()
            else:
                init = torch.randn(self.length, embed.embedding_dim, generator=gen) * embed.weight.float().std()
        return [Placement(target, SoftPrompt(init), PREPEND_PROMPT)]

    # -- the Hugging Face PEFT format (peft 0.21 PROMPT_TUNING); ``peft``: deltatune.formats.peft.Bridge
    peft_type = "PROMPT_TUNING"

    def to_peft(self, peft, deltas):
        """``prompt_embeddings`` (num_virtual_tokens, hidden). Both libraries prepend the vectors to the
        input embeddings, with position ids 0..n-1 for them and n.. for the tokens; deltatune then removes
        the prompt positions from the outputs, peft returns them, so the outputs agree at the real
        positions. Refused where a head or a decoder reads different positions (``_peft_refusal``)."""
        why = _peft_refusal(peft)
        if why:
            raise ConfigError(f"cannot export this prompt adapter to PEFT: {why}")
        peft.require_prompt_task("prompt")
        (_, _, params), = deltas
        prompt = params["prompt"]
        return {"prompt_embeddings": prompt}, {**peft.prompt_fields(prompt.shape[0]), "prompt_tuning_init": "RANDOM"}

    @classmethod
    def from_peft(cls, peft, config, tensors):
        why = _peft_refusal(peft)
        if why:
            raise ConfigError(f"cannot load this prompt adapter: {why}")
        if set(tensors) != {"prompt_embeddings"}:
            other = sorted(set(tensors) - {"prompt_embeddings"})[:3]
            raise ConfigError(f"a prompt adapter holds prompt_embeddings only, not {other}")
        n = peft.get(config, "num_virtual_tokens", int, None)
        table = tensors["prompt_embeddings"]
        embed = resolve(peft.model, "embed")[0]
        dim = embed.module.weight.shape[1]
        if not n or n < 1 or table.dim() != 2 or table.shape[0] < n or table.shape[1] != dim:
            raise ConfigError(f"prompt_embeddings {tuple(table.shape)} do not fit num_virtual_tokens={n} and this "
                              f"model's embedding width {dim}")
        return {"length": n, "init": "random"}, {peft.key(embed.name) + ".prompt": table[:n]}


# Where peft 0.21's prompt tuning computes something else than deltatune's, so no conversion is exact.
_PEFT_SEQ2SEQ = (
    "prompt tuning on encoder-decoder models differs between the libraries: deltatune removes the prompt "
    "positions from the encoder output, so the decoder cross-attends to the real tokens only, while peft "
    "keeps them (and peft saves a second, unused block of decoder prompt vectors); the outputs would differ"
)
_PEFT_CLS = (
    "a sequence classifier reads one position of the sequence, and under prompt tuning the libraries read "
    "different ones: peft's head sees the soft prompt vectors as part of the sequence (BERT's pooler and "
    "RoBERTa's classifier read the first soft vector; a decoder's classifier, given inputs_embeds, cannot find "
    "the padding and reads the last position), deltatune's head sees the real tokens only ([CLS], the last "
    "real token); the outputs differ (the hidden states at the real positions agree)"
)
_PEFT_POOLER = (
    "this model's head reads the backbone's pooler, which deltatune recomputes from the first real token "
    "([CLS]) and peft's reads from the first soft prompt vector; the outputs would differ"
)


def _peft_refusal(peft) -> str | None:
    """Why a prompt on ``peft.model`` computes something else in peft (None: the same function)."""
    if getattr(peft.root.config, "is_encoder_decoder", False):
        return _PEFT_SEQ2SEQ
    if peft.task == "SEQ_CLS":
        return _PEFT_CLS
    _, backbone = find_backbone(peft.model)
    if backbone is not peft.root and getattr(backbone, "pooler", None) is not None:
        return _PEFT_POOLER
    return None


_MARKS = ("\u0120", "\u2581")  # byte-level BPE (GPT-2) and SentencePiece word-start marks


def _is_word(token: str, marked: bool) -> bool:
    """A whole word of two or more letters: WordPiece gives it plain, BPE with a word-start mark."""
    if marked:
        if not token.startswith(_MARKS):
            return False
        token = token[1:]
    return len(token) >= 2 and token.isalpha() and not any(m in token for m in _MARKS)


def word_ids(model, vocab_size: int) -> list[int]:
    """Ids of real whole-word tokens in the model's tokenizer, in id order; without a tokenizer
    (a random test model), every id that is not a special token, with a warning."""
    from transformers import AutoTokenizer

    config = find_backbone(model)[1].config  # a task wrapper (BiEncoder, Classifier) has none of its own
    path = getattr(config, "_name_or_path", "") or ""
    tok = None
    if path:
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # no tokenizer files beside the weights: fall back below
            tok = None
    special = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    if tok is None:
        warnings.warn("prompt init='vocab': no tokenizer found beside the model, so rows are drawn from every "
                      "non-special id; pass init='random' or load the model from a folder with its tokenizer",
                      stacklevel=4)
        return [i for i in range(vocab_size) if i not in special]
    special |= set(tok.all_special_ids)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    marked = sum(t.startswith(_MARKS) for t, _ in vocab) > len(vocab) // 10
    return [i for token, i in vocab if i < vocab_size and i not in special and _is_word(token, marked)]
