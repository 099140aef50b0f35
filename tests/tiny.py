"""Tiny random models of every supported family, and matching inputs, for fast tests."""
from __future__ import annotations

import torch
import transformers as T

VOCAB = 97
FAMILIES = ("bert", "gpt2", "llama", "t5", "bart", "vit")


def config(family: str, hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64):
    if family == "bert":
        return T.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            max_position_embeddings=64, num_labels=3)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 2), intermediate_size=ffn, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    if family == "t5":
        return T.T5Config(vocab_size=VOCAB, d_model=hidden, d_kv=hidden // heads, d_ff=ffn, num_layers=layers,
                          num_heads=heads, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if family == "bart":
        return T.BartConfig(vocab_size=VOCAB, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                            decoder_ffn_dim=ffn, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                            activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            decoder_start_token_id=2, forced_eos_token_id=None)
    if family == "vit":
        return T.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                           image_size=16, patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           num_labels=3)
    raise ValueError(family)


CLASSES = {
    "bert": T.BertForSequenceClassification,
    "gpt2": T.GPT2LMHeadModel,
    "llama": T.LlamaForCausalLM,
    "t5": T.T5ForConditionalGeneration,
    "bart": T.BartForConditionalGeneration,
    "vit": T.ViTForImageClassification,
}


def model(family: str, seed: int = 0, **dims):
    """The same seed gives the same weights: a 'fresh base model' for load tests."""
    torch.manual_seed(seed)
    m = CLASSES[family](config(family, **dims))
    m.eval()
    return m


def inputs(family: str, batch: int = 2, length: int = 7, seed: int = 1, pad: str = "right"):
    """A batch with padding in its last row (for text families)."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        if pad == "right":
            mask[-1, length - 2:] = 0
        else:
            mask[-1, :2] = 0
        ids[mask == 0] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family in ("t5", "bart"):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return out


def outputs(m, batch):
    """Logits at the real (unpadded) positions, flattened: what must stay identical."""
    logits = m(**batch).logits
    mask = batch.get("attention_mask")
    if mask is not None and logits.dim() == 3 and logits.shape[1] == mask.shape[1]:
        return logits[mask.bool()]
    return logits


def loss(m, batch):
    logits = m(**batch).logits
    return logits.float().pow(2).mean() + logits.float().mean()
