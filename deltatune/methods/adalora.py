import re
from collections import defaultdict

import torch

from ..combine import PARALLEL
from ..deltas import SVDLowRank
from ..errors import ConfigError
from ..registry import Method, Placement, option, register
from ..sites import target_features
from ..updates import UpdateRule, load_tensor


@register
class AdaLoRA(Method):
    """h = W0 x + scale P diag(lambda) Q x per site, with the rank budget moved to where it matters during training.

    Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (ICLR). §3.1: the
    update in SVD form, P (out, r), lambda (r,), Q (r, in) (``SVDLowRank``: B, E, A), with the regulariser
    R = ||P^T P - I||_F + ||Q Q^T - I||_F (its mean over the matrices times ``orth_reg_weight``, added to the
    loss). §3.2: each triplet's importance S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij), where
    s(w) = Ī(w) Ū(w) is the sensitivity |w dL/dw| smoothed by an EMA (``beta1``) times its uncertainty (EMA
    ``beta2`` of |I - Ī|). §3.3 (the budget schedule): the number of triplets kept falls from ``init_r`` per
    site to ``target_r`` per site as a cube between step ``tinit`` and step ``total_step - tfinal``; every
    ``deltaT`` steps the lambdas of the least important triplets are set to 0; at ``total_step - tfinal``
    the pattern is fixed and kept to the end. The pruning runs in the training loop (``AdaLoRARule``, the
    update seam), after each optimizer step as peft's ``update_and_allocate``; ``total_step`` defaults to
    the run's max_steps. Defaults are peft's (init_r 12, target_r 8, alpha 8, orth_reg_weight 0.5, tinit 0,
    tfinal 0, deltaT 1). Mergeable: W0 += scale B (A * E); pruned triplets have E = 0 and are saved as such.
    """

    name = "adalora"
    paper = "Zhang et al. 2023, AdaLoRA"
    lr = 2e-3  # as LoRA's here
    combines = (PARALLEL,)
    deviations = ("when the budget does not fall below the initial one (target_r = init_r) nothing is pruned "
                  "(peft fails there: kthvalue with k = 0)")

    target_r: int = option(8, min=1, help="the average rank per site at the end")
    init_r: int = option(12, min=1, help="the rank per site at the start")
    alpha: float = option(8.0, min=0, help="scale = alpha / init_r (alpha = 0: scale 1)")
    dropout: float = option(0.0, min=0.0, max=0.99)
    tinit: int = option(0, min=0, help="steps before the first pruning")
    tfinal: int = option(0, min=0, help="last steps with the final pattern fixed")
    deltaT: int = option(1, min=1, help="steps between two prunings")
    beta1: float = option(0.85, min=0.0, max=0.999999, help="EMA of the sensitivity")
    beta2: float = option(0.85, min=0.0, max=0.999999, help="EMA of its uncertainty")
    orth_reg_weight: float = option(0.5, min=0.0, help="weight of the orthogonality regulariser")
    total_step: int | None = option(None, min=1, help="the schedule's length (None: the run's max_steps)")
    sites: list = option(["attn.q", "attn.v"])

    def check(self, model):
        super().check(model)
        if self.target_r > self.init_r:
            raise ConfigError(f"adalora: target_r={self.target_r} is above init_r={self.init_r}; the budget only falls")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"adalora: tinit={self.tinit} and tfinal={self.tfinal} leave no step of total_step="
                              f"{self.total_step} to allocate ranks in; lower them or raise total_step")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha > 0 else float(self.init_r)) / (self.init_r + 1e-5)  # peft's ranknum + 1e-5

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            out.append(Placement(t, SVDLowRank(d_in, d_out, self.init_r, self.scale, self.dropout), PARALLEL))
        return out

    def update_rule(self, model, params):
        from ..store import require_store

        store = require_store(model)
        deltas = {e.key: e.delta for rec in store.records.values() if rec.method is self
                  for e in rec.entries if isinstance(e.delta, SVDLowRank)}
        return AdaLoRARule(deltas, self) if deltas else None

    def faster_parameters(self, deltas):
        return [d.B for d in deltas.values() if isinstance(d, SVDLowRank)]

    # -- the Hugging Face PEFT format (peft 0.21 ADALORA)
    peft_type = "ADALORA"

    def to_peft(self, peft, deltas):
        """``<module>.lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r) at init_r, pruned triplets
        included with lambda = 0 (so no rank_pattern is needed). Slices of GPT-2's c_attn are refused: peft
        adapts c_attn whole."""
        tensors, chosen = {}, set()
        for module_name, marks, params in deltas:
            if marks:
                raise ConfigError(f"adalora on {'attn.' + marks[0]}, a slice of GPT-2's fused {module_name}: peft adapts "
                                  "c_attn whole; train with sites ['re:h\\.(?P<layer>\\d+)\\.attn\\.c_attn'] to export it")
            name = peft.rel(module_name)
            for part in "AEB":
                tensors[f"{name}.lora_{part}"] = params[part]
            chosen.add(name)
        targets, _ = peft.target_modules(chosen)
        alpha = int(self.alpha) if float(self.alpha).is_integer() else float(self.alpha)
        return tensors, {
            "init_r": self.init_r, "target_r": self.target_r, "lora_alpha": alpha, "lora_dropout": float(self.dropout),
            "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            # peft requires a schedule length; a loaded adapter does not use it
            "total_step": self.total_step or self.tinit + self.tfinal + 1,
            "rank_pattern": None, "target_modules": targets, "fan_in_fan_out": peft.fan_in_fan_out(chosen),
            "bias": "none", "init_lora_weights": True, "use_dora": False, "use_rslora": False,
        }

    @classmethod
    def from_peft(cls, peft, config, tensors):
        """A PEFT AdaLoRA, pruned (rank_pattern: the kept triplets only) or not: each module's triplets are
        padded back to init_r with lambda = 0, which adds nothing, and the scale stays alpha / init_r as in
        peft (its ranknum keeps init_r)."""
        if config.get("bias", "none") not in ("none", None):
            raise ConfigError(f"bias={config.get('bias')!r}: deltatune's AdaLoRA trains no biases")
        for flag in ("use_dora", "use_rslora", "lora_bias"):
            if config.get(flag):
                raise ConfigError(f"{flag}=true: peft's AdaLoRA does not apply it, so the file is inconsistent")
        init_r = peft.get(config, "init_r", int, 12)
        parts: dict[str, dict] = defaultdict(dict)
        for k, t in tensors.items():
            m = re.fullmatch(r"(.+)\.lora_([AEB])", k)
            if m is None:
                raise ConfigError(f"tensor '{k}' is not an AdaLoRA lora_A, lora_E or lora_B")
            parts[m.group(1)][m.group(2)] = t
        if not parts:
            raise ConfigError("the adapter holds no AdaLoRA weights")
        deltas, modules = {}, set()
        for name, got in parts.items():
            if set(got) != set("AEB"):
                raise ConfigError(f"module '{name}' lacks lora_{'/'.join(sorted(set('AEB') - set(got)))}")
            full, feats = peft.projection(name)
            A, E, B = got["A"], got["E"], got["B"]
            k = A.shape[0] if A.dim() == 2 else -1
            if k < 0 or k > init_r or A.shape[1] != feats[0] or tuple(E.shape) != (k, 1) or tuple(B.shape) != (feats[1], k):
                raise ConfigError(f"'{name}': lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)}, lora_B {tuple(B.shape)} "
                                  f"do not fit a {feats[0]} -> {feats[1]} projection at init_r={init_r}")
            pad = init_r - k  # triplets pruned away before saving: lambda = 0
            key = peft.key(full)
            deltas[key + ".A"] = torch.cat([A, A.new_zeros(pad, A.shape[1])])
            deltas[key + ".E"] = torch.cat([E, E.new_zeros(pad, 1)])
            deltas[key + ".B"] = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
            modules.add(full)
        (site_list,), layers = peft.choose_sites([modules])
        options = {"target_r": min(peft.get(config, "target_r", int, 8), init_r), "init_r": init_r,
                   "alpha": float(peft.get(config, "lora_alpha", (int, float), 8)),
                   "dropout": float(peft.get(config, "lora_dropout", (int, float), 0.0) or 0.0),
                   "tinit": peft.get(config, "tinit", int, 0), "tfinal": peft.get(config, "tfinal", int, 0),
                   "deltaT": peft.get(config, "deltaT", int, 1),
                   "beta1": float(peft.get(config, "beta1", (int, float), 0.85)),
                   "beta2": float(peft.get(config, "beta2", (int, float), 0.85)),
                   "orth_reg_weight": float(peft.get(config, "orth_reg_weight", (int, float), 0.5)),
                   "total_step": peft.get(config, "total_step", int, None), "sites": site_list, "layers": layers}
        return options, deltas


class AdaLoRARule(UpdateRule):
    """AdaLoRA's training-time parts (Zhang et al. 2023, §3.1-3.3), run by the loop through the update seam:
    after the backward pass, the orthogonality regulariser's gradient is added to P's and Q's (the same as
    adding the regulariser to the loss, once per optimizer step); after the optimizer step (the gradients
    still there, as peft's ``update_and_allocate``), the importance EMAs are updated and the triplets pruned
    to the step's budget. State for a resumed run: the EMAs and the final pattern."""

    name = "adalora"

    def __init__(self, deltas: dict, cfg: AdaLoRA):
        self.deltas = dict(sorted(deltas.items()))
        self.cfg = cfg
        self.init_budget = sum(d.E.shape[0] for d in self.deltas.values())
        self.target_budget = cfg.target_r * len(self.deltas)
        self.total = cfg.total_step
        self.ema = {f"{kind}/{key}/{part}": torch.zeros_like(getattr(d, part))
                    for key, d in self.deltas.items() for part in "AEB" for kind in ("ipt", "unc")}
        self.final = {f"final/{key}": torch.ones(d.E.shape[0], dtype=torch.bool, device=d.E.device)
                      for key, d in self.deltas.items()}
        self.fixed = torch.zeros((), dtype=torch.int64)  # 1 once the final pattern is fixed

    def bind(self, max_steps):
        self.total = self.cfg.total_step or max_steps
        if self.cfg.tinit >= self.total - self.cfg.tfinal:
            raise ConfigError(f"adalora: tinit={self.cfg.tinit} and tfinal={self.cfg.tfinal} leave no step of the "
                              f"{self.total} to allocate ranks in; lower them, or train longer")

    def after_backward(self, step):
        w = self.cfg.orth_reg_weight
        if w == 0:
            return
        params = [p for d in self.deltas.values() for p in (d.A, d.B)]
        with torch.enable_grad():
            terms = []
            for d in self.deltas.values():
                for cov in (d.A @ d.A.t(), d.B.t() @ d.B):  # Q Q^T and P^T P, both (r, r)
                    terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
            reg = w * torch.stack(terms).mean()
            grads = torch.autograd.grad(reg, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad.add_(g)

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets to keep, whether to prune at this step): the cubic schedule of §3.3, as peft computes it."""
        tinit, tfinal, total = self.cfg.tinit, self.cfg.tfinal, self.total
        if step <= tinit:
            return self.init_budget, False
        if step > total - tfinal:
            return self.target_budget, True
        left = 1 - (step - tinit) / (total - tfinal - tinit)
        return int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget), step % self.cfg.deltaT == 0

    @torch.no_grad()
    def after_step(self, step):
        end = self.total - self.cfg.tfinal
        if step > end:  # the final phase: the fixed pattern is kept
            self._apply({key: self.final[f"final/{key}"] for key in self.deltas})
            return
        if step < end:
            self._update_importance()
        budget, prune = self.budget(step)
        if prune or step == end:
            kept = self._prune(budget)
            if step == end:
                for key, mask in kept.items():
                    self.final[f"final/{key}"].copy_(mask)
                self.fixed.fill_(1)
                for t in self.ema.values():
                    t.zero_()

    def _update_importance(self):
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for key, d in self.deltas.items():
            for part in "AEB":
                p = getattr(d, part)
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg, unc = self.ema[f"ipt/{key}/{part}"], self.ema[f"unc/{key}/{part}"]
                avg.mul_(b1).add_((1 - b1) * ipt)
                unc.mul_(b2).add_((1 - b2) * (ipt - avg).abs())

    def _scores(self) -> dict:
        """Each triplet's importance (r,) per site: s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)."""
        out = {}
        for key in self.deltas:
            s = {part: self.ema[f"ipt/{key}/{part}"] * self.ema[f"unc/{key}/{part}"] for part in "AEB"}
            out[key] = s["E"].view(-1) + (s["A"].mean(dim=1) + s["B"].mean(dim=0))
        return out

    def _prune(self, budget: int) -> dict:
        scores = self._scores()
        k = self.init_budget - budget
        if k <= 0:  # nothing to prune (peft's kthvalue would fail)
            kept = {key: torch.ones_like(s, dtype=torch.bool) for key, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k)[0]
            kept = {key: s > threshold for key, s in scores.items()}
        self._apply(kept)
        return kept

    def _apply(self, kept: dict):
        for key, mask in kept.items():
            self.deltas[key].E.masked_fill_(~mask.view(-1, 1), 0.0)

    def ranks(self) -> dict:
        """Site key -> the number of triplets whose lambda is not zero."""
        return {key: int((d.E != 0).sum()) for key, d in self.deltas.items()}

    def metrics(self):
        ranks = self.ranks()
        return {"adalora_ranks": ranks, "adalora_budget": sum(ranks.values())}

    def state_dict(self):
        return {**{k: v.clone() for k, v in self.ema.items()}, **{k: v.clone() for k, v in self.final.items()},
                "fixed": self.fixed.clone()}

    def load_state_dict(self, state):
        for k, t in {**self.ema, **self.final, "fixed": self.fixed}.items():
            t.copy_(load_tensor(state, k, t, self.name))
        extra = sorted(set(state) - set(self.ema) - set(self.final) - {"fixed"})
        if extra:
            raise ValueError(f"update rule '{self.name}': unexpected state {extra[:3]}")
