import torch
from torch.nn import functional as F

from ..combine import PARALLEL
from ..deltas import Sparse
from ..registry import Method, Placement, option, register
from ..sites import target_features
from ..updates import UpdateRule, load_tensor


@register
class SIFT(Method):
    """Sparse increments at the entries with the largest first-batch gradient (Song et al., ICML 2024).

    Each target weight W (out, in) gets a ``Sparse`` delta: k = int(rate * out * in) + 1 trainable
    values at fixed flat indices, zero at init, so the model starts at the base function and the
    optimizer holds state for the k values only (AdamW: 2k floats instead of 2 out*in). The indices
    are chosen on the first optimizer step of training (``SiftRule``): that step's forward runs with
    a dense zero probe in place of the sparse delta, its gradient dL/dW is read, the top-k |grad|
    entries of each matrix become the indices, and the sparse values are not updated on that step
    (as in the released code, where the first backward only selects). The indices are then fixed.

    Deliberate differences from the released ``sift/sift.py``: the placeholder index set before the
    first step is evenly strided instead of random (it is replaced before any update, and needs no
    RNG); the increment lives beside W as a delta and is merged exactly with ``dt.merge``, instead
    of being added into W one step late inside the next backward pass. Defaults are the GLUE ones
    (rate 0.008 on query, key, value and attention output; lr 7e-5 for RoBERTa-large; weight decay
    0.1 is a TrainConfig setting). Under private training sift is refused: its selection reads a
    raw (not privatised) gradient of a batch.
    """

    name = "sift"
    paper = "Song et al. 2024, SIFT (ICML)"
    lr = 7e-5
    combines = (PARALLEL,)

    rate: float = option(0.008, min=1e-9, max=1.0, help="share of each target matrix's entries that are trained")
    sites: list = option(["attn.q", "attn.k", "attn.v", "attn.o"])

    def placements(self, model):
        out = []
        for t in self.targets(model, self.sites):
            d_in, d_out = target_features(t, self.name)
            n = d_in * d_out
            k = min(n, int(self.rate * n) + 1)
            placeholder = torch.arange(k, dtype=torch.long) * (n // k)  # replaced on the first step
            out.append(Placement(t, Sparse((d_out, d_in), placeholder), PARALLEL))
        return out

    def update_rule(self, model, params):
        from ..store import require_store

        store = require_store(model)
        deltas = {f"{rec.name}/{e.key}": e.delta for rec in store.records.values() if rec.method is self
                  for e in rec.entries if isinstance(e.delta, Sparse)}
        return SiftRule(deltas) if deltas else None


class SiftRule(UpdateRule):
    """Chooses each Sparse delta's indices from the gradient of the first optimizer step, then keeps them."""

    name = "sift"
    refuses_private = ("sift chooses its entries from the raw gradient of the first batch, which private "
                       "training does not privatise; train sift without --dp-epsilon, or use a PEFT method such as lora")

    def __init__(self, deltas: dict):
        self.deltas = deltas
        self.selected = torch.zeros((), dtype=torch.int64)  # 1 once the indices are chosen
        self.probes, self.handles = {}, []

    def before_step(self, step):
        if self.selected.item() or self.probes:
            return
        for key, delta in self.deltas.items():
            probe = torch.zeros(delta.shape, dtype=delta.values.dtype, device=delta.values.device, requires_grad=True)
            self.probes[key] = probe
            # The delta's output is replaced by probe @ x, whose gradient is dL/dW at this site.
            self.handles.append(delta.register_forward_hook(lambda mod, args, out, p=probe: F.linear(args[0], p)))

    @torch.no_grad()
    def after_backward(self, step):
        if not self.probes:
            return
        for handle in self.handles:
            handle.remove()
        for key, delta in self.deltas.items():
            grad = self.probes[key].grad
            if grad is None:
                raise RuntimeError(f"sift: the site {key} got no gradient on the first step, so no entries can be "
                                   "chosen there; is it used by the model's forward pass?")
            k = delta.indices.numel()
            chosen = torch.topk(grad.abs().flatten().float(), k, sorted=False).indices.sort().values
            delta.indices.copy_(chosen)
            delta.values.grad = None  # the selecting step updates no sparse value
        self.probes, self.handles = {}, []
        self.selected.fill_(1)

    def state_dict(self):
        return {"selected": self.selected.clone()}

    def load_state_dict(self, state):
        self.selected.copy_(load_tensor(state, "selected", self.selected, self.name))
