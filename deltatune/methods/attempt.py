import math
import os
from pathlib import Path

import torch

from ..combine import PREPEND_PROMPT
from ..deltas import PromptMixture
from ..errors import ConfigError
from ..registry import Method, Placement, option, read_saved_adapter, register
from ..sites import attention_shape, resolve


def read_sources(dirs: list) -> torch.Tensor:
    """The prompts of adapters saved by the 'prompt' method (directories, or train out dirs), stacked:
    (t, length, d)."""
    prompts = []
    odd = [d for d in dirs if not isinstance(d, (str, os.PathLike))]
    if odd:
        raise ConfigError(f"attempt: sources must be adapter directories (paths), got {odd[0]!r}; "
                          "pass sources=[DIR, ...] (CLI: --set sources=DIR,DIR)")
    for path in map(Path, dirs):
        if path.is_dir() and not (path / "adapter.safetensors").exists() and (path / "best").is_dir():
            path = path / "best"  # a `deltatune train` out dir: its best adapter
        config, tensors = read_saved_adapter(path)
        if config["method"] != "prompt":
            raise ConfigError(f"attempt: source {path} is a '{config['method']}' adapter; sources must be soft prompts "
                              "saved by the 'prompt' method (deltatune train --method prompt)")
        (prompt,) = [t for k, t in tensors.items() if k.startswith("delta.") and k.endswith(".prompt")]
        prompts.append(prompt.float())
    shapes = {tuple(p.shape) for p in prompts}
    if len(shapes) != 1:
        raise ConfigError(f"attempt: source prompts differ in shape {sorted(shapes)}; "
                          "train them with one --set length=L")
    return torch.stack(prompts)


@register
class ATTEMPT(Method):
    """A mixture of soft prompts: frozen source prompts (trained with 'prompt' on other tasks) and a new
    target prompt, mixed per input by an attention module, prepended to the input embeddings.

    Asai et al. 2022, "ATTEMPT: Parameter-Efficient Multi-task Tuning via Attentional Mixtures of Soft
    Prompts" (EMNLP), §3, the released attn_method 'sub': x = max-pool of the input embeddings;
    H = LN(W_up SiLU(W_down x)) with W_down d -> 100 and W_up 100 -> d, no biases, default Linear
    init; a_j = softmax_j(maxpool(P_j) . H / T) over [sources..., target], T = int(d * e) (2087
    for d = 768, as in the released configs); P = P_target + sum_j a_j P_j. Trained: the target
    prompt, W_down, W_up. The target starts as a copy of the first source (single-task ATTEMPT).
    ``sources``: adapter directories saved by 'prompt' (CLI: --set sources=DIR,DIR), all of one
    length; the saved adapter carries the source prompts, so loading it needs no source directory.
    Not mergeable.

    Choices: the max-pool skips padding positions (a padded row gets the prompt it gets alone); the
    LayerNorm has no parameters (the released code freezes it and loads it from a multi-task
    checkpoint this single-task form does not have); the learned temperature (broken in the code) is
    not offered.
    """

    name = "attempt"
    paper = "Asai et al. 2022, ATTEMPT"
    lr = 3e-1
    identity_at_init = False
    combines = (PREPEND_PROMPT,)
    deviations = ("the max-pool skips padding; the attention module's LayerNorm has no parameters (the released "
                  "code loads a frozen one from multi-task training); single-task form")
    honours_layers = False  # the prompt is at the input embeddings, below every layer
    families = ("bert", "gpt2", "llama", "t5", "bart")
    file_options = ("sources",)

    sources: list = option([], help="adapter directories of source prompts saved by the 'prompt' method")
    hidden: int = option(100, min=1, help="width of the attention module's bottleneck")
    temperature: float | None = option(None, min=1e-6, help="softmax temperature (None: int(d * e))")
    source_shape: list | None = option(None, help="(sources, length) of a saved adapter; set when it is saved")

    def folded_options(self) -> dict:
        # The saved adapter holds the source prompts, so loading it reads no directory named in a file.
        shape = getattr(self, "seen_shape", None) or (read_sources(self.sources).shape[:2] if self.sources
                                                      else self.source_shape)
        return {**self.options(), "sources": [], "source_shape": list(shape)}

    def check(self, model):
        super().check(model)
        if not self.sources and not self.source_shape:
            raise ConfigError("attempt needs source prompts; pass sources=[DIR, ...] (CLI: --set sources=DIR,DIR), "
                              "adapter directories saved by the 'prompt' method on other tasks")
        if self.source_shape is not None and (len(self.source_shape) != 2 or min(self.source_shape) < 1):
            raise ConfigError(f"attempt: source_shape must be [sources, length], got {self.source_shape!r}")

    def placements(self, model):
        self.check(model)
        d = attention_shape(model)[0]
        if self.sources:
            sources = read_sources(self.sources)
            if sources.shape[-1] != d:
                raise ConfigError(f"attempt: the source prompts have width {sources.shape[-1]}, this model {d}; "
                                  "train them on the same model")
        else:  # rebuilding a saved adapter: its tensors are copied in after this
            sources = torch.zeros(*self.source_shape, d)
        self.seen_shape = list(sources.shape[:2])  # not an option: what folded_options saves
        temperature = self.temperature or float(int(d * math.e))
        delta = PromptMixture(sources, sources[0], self.hidden, temperature)
        return [Placement(resolve(model, "embed")[0], delta, PREPEND_PROMPT)]
