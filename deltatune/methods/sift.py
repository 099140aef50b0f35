from typing import ClassVar

import torch
from torch.nn import functional as F

from ..combine import PARALLEL
from ..deltas import Sparse
from ..registry import Method, Placement, option, register
from ..sites import target_features
from ..updates import UpdateRule, load_tensor


def _placeholder(n: int, k: int) -> torch.Tensor:
    """k distinct flat positions out of n, evenly strided: replaced on the first step."""
    return torch.arange(k, dtype=torch.long) * (n // k)


@register
class SIFT(Method):
    """Sparse increments at the entries with the largest first-batch gradient (Song et al., ICML 2024).

    Each target weight W (out, in) gets a ``Sparse`` delta: k = int(rate * out * in) + 1 trainable
    values at fixed flat indices, zero at init, so the model starts at the base function and the
    optimizer holds state for the k values only (AdamW: 2k floats instead of 2 out*in). The
    target's bias, where it has one, is trained the same way (``bias``): int(rate * out) + 1 of its
    entries, as the released ``sift/sift.py`` does for every parameter whose name matches a sparse
    module (``query`` matches query.weight and query.bias). The indices are chosen on the first
    optimizer step of training (``SiftRule``): that step's forward runs with a dense zero probe in
    place of the sparse delta, its gradient dL/dW (and dL/db) is read, the top-k |grad| entries of
    each tensor become the indices, and the sparse values are not updated on that step (as in the
    released code, where the first backward only selects). The indices are then fixed.

    Weight decay as released: there the optimizer's parameter is the increment of the current step
    only (W[idx] += delta, then delta = 0, before every optimizer step), so AdamW's decoupled weight
    decay multiplies zero and never pulls W back toward W0. ``SiftRule`` does the same: during
    ``optimizer.step()`` the accumulated values are set aside and the step's update lands on zeros,
    then the values are added back. (A training loop of your own must call the rule's hooks.)

    Differences from the released code: the placeholder index set before the first step is evenly
    strided instead of random (it is replaced before any update, and needs no RNG); the increment
    lives beside W as a delta, applied as soon as it is made and merged exactly with ``dt.merge``,
    whereas the released hook adds it into W inside the next backward pass, so each released forward
    runs on the weights of one step earlier. Defaults are the GLUE ones (rate 0.008 on query, key,
    value and attention output; lr 7e-5 for RoBERTa-large; weight decay 0.1 is a TrainConfig
    setting, which then acts on the task head only, as released). Under private training sift is
    refused: its selection reads a raw (not privatised) gradient of a batch.
    """

    name = "sift"
    paper = "Song et al. 2024, SIFT (ICML)"
    lr = 7e-5
    combines = (PARALLEL,)
    deviations = ("the update is applied at once (the released hook adds it into W inside the next backward "
                  "pass, so each forward there runs one step behind); the indices before the first step are a "
                  "strided placeholder, not random (replaced before any update)")
    # Adapter files written before the bias option existed hold weight increments only.
    old_file_options: ClassVar[dict] = {"bias": False}

    rate: float = option(0.008, min=1e-9, max=1.0, help="share of each target matrix's entries that are trained")
    sites: list = option(["attn.q", "attn.k", "attn.v", "attn.o"])
    bias: bool = option(True, help="also train int(rate * out) + 1 entries of each target's bias (as released)")

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            n = d_in * d_out
            k = min(n, int(self.rate * n) + 1)
            bias = None
            if self.bias and getattr(t.module, "bias", None) is not None:
                kb = min(d_out, int(self.rate * d_out) + 1)
                bias = Sparse((d_out, 1), _placeholder(d_out, kb))
            out.append(Placement(t, Sparse((d_out, d_in), _placeholder(n, k), bias=bias), PARALLEL))
        return out

    def update_rule(self, model, params):
        from ..store import require_store

        store = require_store(model)
        deltas = {f"{rec.name}/{e.key}": e.delta for rec in store.records.values() if rec.method is self
                  for e in rec.entries if isinstance(e.delta, Sparse)}
        return SiftRule(deltas) if deltas else None


class SiftRule(UpdateRule):
    """Chooses each Sparse delta's indices from the gradient of the first optimizer step, then keeps
    them; and keeps the optimizer's weight decay off the accumulated increment (see SIFT)."""

    name = "sift"
    refuses_private = ("sift chooses its entries from the raw gradient of the first batch, which private "
                       "training does not privatise; train sift without --dp-epsilon, or use a PEFT method such as lora")
    refuses_processes = ("sift picks its entries from the first step's gradient in one process; train sift "
                         "without --nproc")

    def __init__(self, deltas: dict):
        self.deltas = deltas
        self.selected = torch.zeros((), dtype=torch.int64)  # 1 once the indices are chosen
        self.probes, self.handles = {}, []
        self.set_aside = []  # (values, accumulated) during optimizer.step()

    def before_step(self, step):
        self._restore()  # a loop that skipped after_step: the increment is not lost
        if self.selected.item() or self.probes:
            return
        for key, delta in self.deltas.items():
            probes = [torch.zeros(part.shape, dtype=part.values.dtype, device=part.values.device, requires_grad=True)
                      for part in (delta, delta.bias) if part is not None]
            self.probes[key] = probes
            # The delta's output is replaced by probe_W @ x + probe_b, whose gradients are dL/dW and dL/db here.
            self.handles.append(delta.register_forward_hook(
                lambda mod, args, out, p=probes: F.linear(args[0], p[0], p[1].view(-1) if len(p) > 1 else None)))

    @torch.no_grad()
    def after_backward(self, step):
        if not self.probes:
            # The step's update must land on zeros (released: delta is zeroed before every step), so that
            # AdamW's decay, p <- p (1 - lr wd), acts on nothing but the step's own increment.
            for delta in self.deltas.values():
                for values in delta.parameters():
                    if values.grad is not None:
                        self.set_aside.append((values, values.detach().clone()))
                        values.zero_()
            return
        for handle in self.handles:
            handle.remove()
        for key, delta in self.deltas.items():
            for part, probe in zip((delta, delta.bias), self.probes[key]):
                if probe.grad is None:
                    raise RuntimeError(f"sift: the site {key} got no gradient on the first step, so no entries can "
                                       "be chosen there; is it used by the model's forward pass?")
                k = part.indices.numel()
                chosen = torch.topk(probe.grad.abs().flatten().float(), k, sorted=False).indices.sort().values
                part.indices.copy_(chosen)
                part.values.grad = None  # the selecting step updates no sparse value
        self.probes, self.handles = {}, []
        self.selected.fill_(1)

    def after_step(self, step):
        self._restore()

    @torch.no_grad()
    def _restore(self):
        for values, accumulated in self.set_aside:
            values.add_(accumulated)
        self.set_aside = []

    def state_dict(self):
        return {"selected": self.selected.clone()}

    def load_state_dict(self, state):
        self.selected.copy_(load_tensor(state, "selected", self.selected, self.name))
