import warnings

import torch

from ..combine import PREPEND_PROMPT
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
