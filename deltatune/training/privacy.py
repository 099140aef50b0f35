"""Differentially private training of any method (DP-SGD, Abadi et al. 2016; Yu et al., ICLR 2022).

Each step draws a Poisson sample of the training set (every example in with probability
q = expected batch / N), computes the
gradient of every trainable parameter for each sampled example separately (``torch.func``:
functional_call + grad, batched with vmap where the model's forward allows it), clips each
example's whole gradient to norm C, sums, adds N(0, (sigma C)^2) to every coordinate and divides
by the expected batch size. The frozen base gets no gradient and no noise: only the parameters
the method trains (plus the task head) are released. sigma comes from (epsilon, delta, q, steps)
through Opacus's RDP accountant, which also reports the epsilon spent when the run ends.

The Poisson sample and the noise are drawn from generators seeded afresh at every step from the
operating system's cryptographically secure source (``os.urandom``, 64 bits), independent of the run's
seed and never stored: anyone holding the run folder (its seed, its checkpoints) cannot regenerate the
noise or the batches, which the (epsilon, delta) guarantee assumes. Nothing of the noise is reproducible:
two private runs with the same seed differ, and a resumed private run goes on with fresh noise (the
privacy accounting goes on from the checkpoint's step count, so the budget spent is the same as a run
that was never interrupted). Everything else about a run (data order of a non-private run, dropout,
initialisation) stays seeded. Like Opacus without ``secure_mode``, the generators themselves are
torch's (Philox/Mersenne Twister) and not a CSPRNG stream: the secret is the per-step seed.

What it does not protect: the tokenizer, task head shape and max_len are public choices. Retrieval tasks are refused: their in-batch contrastive loss makes
each example's gradient depend on the other examples of the batch, so clipping it per example
bounds nothing. The run's ``max_grad_norm`` is not applied (the per-example clip replaces it).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import ConfigError
from ..tasks.kinds import get_kind
from ..updates import UpdateRule, load_tensor


def default_delta(n: int) -> float:
    """The largest power of ten at most 1/(10 n): 1e-4 for n = 1000, 1e-5 for n = 1001 to 10000.

    The usual guidance is a delta well below 1/n (a mechanism that publishes one example in the clear
    satisfies delta = 1/n); a tenth of 1/n is the loosest value we default to. Pass dp_delta for a smaller one.
    """
    k = 1
    while 10 ** k < 10 * n:
        k += 1
    return 10.0 ** -k


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest sigma (to Opacus's tolerance of 0.01 in epsilon) giving (epsilon, delta)-DP after ``steps``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


def epsilon_spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps, by Opacus's RDP accountant."""
    if steps == 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


def secure_generator(device="cpu") -> torch.Generator:
    """A generator seeded from the operating system's secure source (64 bits), for one step's sample or noise;
    its seed is never stored."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def poisson_sample(n: int, rate: float, generator: torch.Generator | None = None) -> list[int]:
    """The indices of a Poisson sample: every one of ``n`` examples in with probability ``rate``, drawn from
    ``generator`` (default: a fresh :func:`secure_generator`)."""
    g = generator if generator is not None else secure_generator()
    return torch.nonzero(torch.rand(n, generator=g) < rate).flatten().tolist()


class _LossOf(nn.Module):
    """The objective's loss as a module, so functional_call can swap the trainable parameters."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch):
        return self.objective.loss(self.model, batch)


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map(fn, v) for v in tree)
    return fn(tree)


def per_example_grads(model, objective, batch, params: dict, use_vmap: bool = True):
    """({name: (B, *shape)} gradients of each example's own loss, (B,) losses) for the trainable
    ``params`` (name -> parameter of ``model``). ``batch`` is a collated batch of B examples; each
    example's loss is the objective's loss on it alone (a batch of one). vmap runs the B examples
    at once; without it (models whose forward branches on the data) they run one by one."""
    wrapper = _LossOf(model, objective)
    detached = {f"model.{n}": p.detach() for n, p in params.items()}

    def one(p, example):
        loss = functional_call(wrapper, p, (_map(lambda t: t.unsqueeze(0), example),))
        return loss, loss.detach()

    fn = grad(one, has_aux=True)
    if use_vmap:
        grads, losses = vmap(fn, in_dims=(None, 0), randomness="different")(detached, batch)
    else:
        size = len(next(iter(_leaves(batch))))
        outs = [fn(detached, _map(lambda t, i=i: t[i], batch)) for i in range(size)]
        grads = {k: torch.stack([g[k] for g, _ in outs]) for k in detached}
        losses = torch.stack([loss for _, loss in outs])
    return {k[len("model."):]: v for k, v in grads.items()}, losses


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def clip_and_sum(grads: dict, clip: float) -> tuple[dict, torch.Tensor]:
    """Each example's gradient (over all parameters together) scaled to norm <= clip, then summed;
    returns (sums, the (B,) norms before clipping)."""
    norms = torch.sqrt(sum(g.flatten(1).float().square().sum(1) for g in grads.values()))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in grads.items()}, norms


class PrivateTraining(UpdateRule):
    """DP-SGD as an update rule: it computes the step's gradients itself (``computes_grads``)."""

    name = "dp"
    computes_grads = replaces_clipping = private = True

    def __init__(self, params: dict, *, n: int, batch: int, chunk: int, epsilon: float, delta: float, clip: float,
                 to_device, autocast=contextlib.nullcontext):
        self.params, self.n, self.batch, self.chunk = params, n, batch, chunk
        self.epsilon, self.delta, self.clip = epsilon, delta, clip
        self.to_device, self.autocast = to_device, autocast
        self.rate = batch / n
        self.sigma = None
        self.use_vmap = None  # decided on the first batch: whether the model's forward can be vmapped
        self.steps = torch.zeros((), dtype=torch.int64)

    def bind(self, max_steps):
        self.sigma = noise_multiplier(self.epsilon, self.delta, self.rate, max_steps)

    def backward(self, model, objective, examples, order, step):
        sample = poisson_sample(self.n, self.rate)  # from the secure source, not the run's seed
        order.consumed += self.batch  # the expected examples per step: the loop's position stays a count of steps
        total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params.items()}
        losses = []
        for start in range(0, len(sample), self.chunk):
            batch = self.to_device(objective.collate([examples[i] for i in sample[start:start + self.chunk]]))
            with self.autocast():
                grads, loss = self._grads(model, objective, batch)
            sums, _ = clip_and_sum(grads, self.clip)
            for name, s in sums.items():
                total[name] += s.float()
            losses.append(loss.float())
        for name, p in self.params.items():
            noise = torch.normal(0.0, self.sigma * self.clip, size=p.shape, device=p.device,
                                 generator=secure_generator(p.device))
            p.grad = ((total[name] + noise) / self.batch).to(p.dtype)
        return torch.cat(losses).mean() if losses else torch.zeros((), device=next(iter(self.params.values())).device)

    def _grads(self, model, objective, batch):
        if self.use_vmap is None:  # one example, RNG untouched: does the forward branch on data?
            one = _map(lambda t: t[:1], batch)
            device = next(iter(self.params.values())).device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                try:
                    per_example_grads(model, objective, one, self.params, use_vmap=True)
                    self.use_vmap = True
                except RuntimeError as err:
                    if "vmap" not in str(err):
                        raise
                    self.use_vmap = False
        return per_example_grads(model, objective, batch, self.params, use_vmap=self.use_vmap)

    def after_step(self, step):
        self.steps.fill_(step)

    def state_dict(self):
        return {"steps": self.steps.clone()}

    def load_state_dict(self, state):
        self.steps.copy_(load_tensor(state, "steps", self.steps, self.name))

    def metrics(self):
        steps = int(self.steps)
        return {"dp_epsilon": epsilon_spent(self.sigma, self.rate, steps, self.delta), "dp_delta": self.delta,
                "dp_target_epsilon": self.epsilon, "dp_noise_multiplier": self.sigma, "dp_clip": self.clip,
                "dp_sample_rate": self.rate, "dp_steps": steps,
                "dp_per_example": "vmap" if self.use_vmap else "loop"}


def rule_for(cfg, kind, n: int, params: dict, to_device, autocast) -> PrivateTraining | None:
    """The private-training rule a TrainConfig asks for (dp_epsilon set), or None. ``kind``: the task's kind
    (its name or the kind itself), which says whether private training applies to it."""
    if cfg.dp_epsilon is None:
        if cfg.dp_delta is not None or cfg.dp_clip is not None:
            raise ConfigError("dp_delta and dp_clip configure private training; set dp_epsilon (--dp-epsilon) too")
        return None
    refusal = get_kind(kind).private_refusal  # e.g. retrieval: its in-batch loss couples the examples
    if refusal:
        raise ConfigError(refusal)
    batch = cfg.batch_size * cfg.grad_accum
    if batch >= n:
        raise ConfigError(f"private training samples batch_size x grad_accum = {batch} of the {n} training examples "
                          "per step, which must be fewer than all of them; lower batch_size")
    delta = cfg.dp_delta if cfg.dp_delta is not None else default_delta(n)
    if not 0 < delta < 1:
        raise ConfigError(f"dp_delta must be in (0, 1), got {delta}")
    return PrivateTraining(params, n=n, batch=batch, chunk=cfg.batch_size, epsilon=cfg.dp_epsilon, delta=delta,
                           clip=cfg.dp_clip if cfg.dp_clip is not None else 1.0,
                           to_device=to_device, autocast=autocast)
