import math
import types

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import Method, option, register
from ..sites import backbone_parameters
from ..updates import UpdateRule, load_tensor


@register
class DPS(Method):
    """Dynamic Parameter Selection (Zhang et al., NeurIPS 2022): full fine-tuning regularised by
    staged, gradient-chosen subnetworks. No new parameters: every backbone parameter trains.

    Training runs in cycles of two stages of ``us = int(max_steps * stage_fraction)`` steps each
    (the stage of step s is ceil(s / us); odd: Stage I, even: Stage II). In Stage I the squared
    gradient of every nn.Linear weight (the task head's included) is accumulated as an importance
    score; on the first step of Stage II each matrix keeps its own top ceil(numel * update_fraction)
    entries by score (element-wise, a threshold per matrix) and, for the whole stage, only those
    entries get a gradient. Biases, embeddings and LayerNorms are never masked (METHODS.md §1).

    ``update_fraction`` is the share of each matrix that IS updated in Stage II. The released code's
    ``reserve_p = 0.3`` means update_fraction = 0.7 (its default here); the flag name there reads
    the other way round.

    ``variant='mix'`` adds the Mixout-style forward of DPSMix: in training each weight is used as
    ((1 - m) * T + m * W - p * T) / (1 - p) with p = 1 - update_fraction, and its gradient is
    multiplied by m (without the 1/(1 - p) factor, as the released backward does). In Stage I, m is
    Bernoulli(1 - p) per input column, resampled every step, and T the pretrained weight; in Stage II
    m is the top-score mask and T the weight at the start of the stage. Mix scores are
    sum(g^2 * m) / count(m), times exp(-count / us) when us >= 50. In evaluation the weight W itself
    is used (Mixout's expectation).

    Dropout (``dropout='released'``, the default): the released run_trainer.py sets the model's
    hidden and attention dropout to 0 under DPS, and back to 0.1 for Dense runs of max_steps >= 2000.
    Here every dropout of the model (nn.Dropout modules and the float dropout rates attention and
    BART layers read, the task head's included) is 0 during each training step of Mix runs and of
    Dense runs shorter than 2,000 steps, and restored after it; longer Dense runs keep the model's
    own rates (BERT's are the released 0.1). ``dropout='model'`` keeps the model's dropout always.

    Choices where the released code is unclear or differs: gradients are masked (as released), so
    AdamW's momentum and weight decay still move masked entries; GPT-2's Conv1D projections are not
    nn.Linear, so gpt2 is not supported. The masks, scores, counts and Mix's T and W(0) are the
    rule's state, saved in every checkpoint, so a resumed run continues bitwise.
    """

    name = "dps"
    paper = "Zhang et al. 2022, DPS (NeurIPS)"
    lr = 2e-5
    kind = "selection"
    honours_layers = False
    families = ("bert", "llama", "t5", "bart", "vit")
    deviations = ("Dense runs of 2,000 steps or more keep the model's own dropout rates (released: 0.1, BERT's); "
                  "dropout='model' keeps the model's dropout in every run (released: 0 below 2,000 steps and in Mix)")

    variant: str = option("dense", choices=["dense", "mix"], help="dense: masked gradients; mix: Mixout-style forward too")
    update_fraction: float = option(0.7, min=1e-6, max=1.0, help="share of each weight matrix updated in Stage II "
                                                                 "(released reserve_p=0.3 means 0.7)")
    stage_fraction: float = option(0.05, min=1e-6, max=0.5, help="each stage lasts this share of max_steps "
                                                                 "(released update_ratio)")
    dropout: str = option("released", choices=["released", "model"],
                          help="released: the model's dropout is 0 while training (Mix, and Dense below 2,000 "
                               "steps), as the released scripts set it; model: keep the model's dropout")

    def selected(self, model):
        return [n for n, _ in backbone_parameters(model)]

    def update_rule(self, model, params):
        ids = {id(p): name for name, p in params.items()}
        linears = {ids[id(m.weight)]: m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in ids}
        dropouts = dropout_rates(model) if self.dropout == "released" else []
        return DPSRule(linears, self.variant, self.update_fraction, self.stage_fraction, dropouts)


# Float attributes that hold a dropout probability read in forward (BART's layers and attention, and the
# attention modules of T5, Llama and ViT): beside nn.Dropout modules, what the model's config sets.
_RATE_NAMES = ("dropout", "attention_dropout", "activation_dropout")


def dropout_rates(model) -> list:
    """(module, attribute) of every dropout probability in ``model``: nn.Dropout's p and the float rates."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            out.append((m, "p"))
        out += [(m, a) for a in _RATE_NAMES if isinstance(getattr(m, a, None), float)]
    return out


class DPSRule(UpdateRule):
    name = "dps"

    def __init__(self, linears: dict, variant: str, update_fraction: float, stage_fraction: float,
                 dropouts: list = ()):
        self.linears, self.variant, self.fraction, self.stage_fraction = linears, variant, update_fraction, stage_fraction
        self.dropouts = list(dropouts)  # (module, attribute) set to 0 during each step (see DPS: released dropout)
        self.silenced = []  # (module, attribute, rate) while a step runs
        self.us = 1
        self.state = {}
        for name, m in linears.items():
            w = m.weight
            s = {"score": torch.zeros_like(w, dtype=torch.float32), "mask": torch.ones_like(w, dtype=torch.bool)}
            if variant == "mix":
                s["count"] = torch.zeros_like(w, dtype=torch.float32)
                s["pretrained"] = w.detach().clone()
                s["anchor"] = w.detach().clone()  # T: W(0) in Stage I, W at the stage's start in Stage II
            self.state[name] = s
        if variant == "mix":
            for name, m in linears.items():
                m.forward = types.MethodType(_mix_forward(self.state[name], 1.0 - update_fraction), m)

    def bind(self, max_steps):
        self.us = max(1, int(max_steps * self.stage_fraction))
        if self.variant == "dense" and max_steps >= 2000:  # released: Dense runs this long keep dropout
            self.dropouts = []

    def stage(self, step: int) -> tuple[int, bool]:
        """(stage index, whether ``step`` is its first step)."""
        return math.ceil(step / self.us), (step - 1) % self.us == 0

    @torch.no_grad()
    def before_step(self, step):
        self._restore_dropout()
        for m, attr in self.dropouts:
            self.silenced.append((m, attr, getattr(m, attr)))
            setattr(m, attr, 0.0)
        stage, first = self.stage(step)
        mix = self.variant == "mix"
        for name, m in self.linears.items():
            s = self.state[name]
            if stage % 2 == 1:  # Stage I
                if first:
                    s["score"].zero_()
                    if mix:
                        s["count"].zero_()
                        s["anchor"].copy_(s["pretrained"])
                if mix:  # Bernoulli(1 - p) per input column, the same for every output row
                    keep = torch.rand(s["mask"].shape[1], device=s["mask"].device) < self.fraction
                    s["mask"].copy_(keep.expand_as(s["mask"]))
                else:
                    s["mask"].fill_(True)
            elif first:  # Stage II starts: each matrix keeps its top entries by score
                score = s["score"]
                if mix:
                    score = torch.where(s["count"] > 0, score / s["count"].clamp_min(1), torch.zeros_like(score))
                    if self.us >= 50:
                        score = score * torch.exp(-s["count"] / self.us)
                k = math.ceil(score.numel() * self.fraction)
                top = torch.topk(score.flatten(), k, sorted=False).indices
                s["mask"].view(-1).fill_(False)
                s["mask"].view(-1)[top] = True
                if mix:
                    s["anchor"].copy_(m.weight)

    @torch.no_grad()
    def after_backward(self, step):
        stage, _ = self.stage(step)
        for name, m in self.linears.items():
            g, s = m.weight.grad, self.state[name]
            if g is None:
                continue
            if stage % 2 == 1:
                if self.variant == "mix":  # the gradient already carries m (see _mix_forward)
                    s["score"].add_(g.float().square() * s["mask"])
                    s["count"].add_(s["mask"].float())
                else:
                    s["score"].add_(g.float().square() / 1e3)
            else:
                g.mul_(s["mask"])

    def after_step(self, step):
        self._restore_dropout()

    def _restore_dropout(self):
        for m, attr, rate in reversed(self.silenced):
            setattr(m, attr, rate)
        self.silenced = []

    def state_dict(self):
        return {f"{name}/{k}": v.clone() for name, s in self.state.items() for k, v in s.items()}

    def load_state_dict(self, state):
        want = {f"{name}/{k}" for name, s in self.state.items() for k in s}
        extra = sorted(set(state) - want)
        if extra:
            raise ValueError(f"update rule 'dps': the checkpoint holds state for other weights ({extra[0]}, ...)")
        for name, s in self.state.items():
            for k, v in s.items():
                v.copy_(load_tensor(state, f"{name}/{k}", v, self.name))


def _mix_forward(s: dict, p: float):
    """Linear.forward with the DPSMix weight ((1 - m) T + m W - p T) / (1 - p) in training; the
    gradient to W is m * g (the value of m W / (1 - p), the gradient of m W)."""
    def forward(self, x):
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        m, anchor = s["mask"].to(self.weight.dtype), s["anchor"]
        mw = m * self.weight
        live = mw.detach() / (1 - p) + (mw - mw.detach())
        weight = ((1 - m) * anchor - p * anchor) / (1 - p) + live
        return F.linear(x, weight, self.bias)

    return forward
