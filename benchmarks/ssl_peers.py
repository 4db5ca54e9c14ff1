"""Peer implementations of MoCo-v2, BYOL and DINO, to time semssl's steps against (``benchmarks/gpu_check.py``).

A *peer* is an independent, minimal implementation of one method's training step on the same inputs, written
from the papers' formulas on a torchvision ResNet trunk (``fc`` replaced by an identity) — not from semssl's
code and not copied from any other repository. Each peer is a callable: one call = one whole step (forward
under autocast, loss, backward, optimiser step, EMA of the teacher), like :class:`semssl.bench.MethodStep`.

* **MoCo-v2** (He et al. 2020, Chen et al. 2020): query encoder = trunk + MLP ``d -> d -> 128`` (no BN), key
  encoder = its EMA copy (momentum ``m``), keys computed on a shuffled batch and unshuffled (shuffle-BN's
  single-process form), InfoNCE ``CE([q.k+, q.queue] / tau, 0)`` against a FIFO queue of past keys (65536 at
  paper scale), keys enqueued after the loss; SGD with momentum, weight decay on every parameter.
* **BYOL** (Grill et al. 2020): online = trunk + projector ``MLP(d, 4096, 256, BN)`` + predictor
  ``MLP(256, 4096, 256, BN)``; target = EMA copy of trunk + projector, momentum ``1 - (1 - m0)(cos(pi k/K) + 1)/2``;
  loss ``2 - 2 cos(p, z')`` summed over both directions (one online forward per view); LARS (You et al. 2017:
  ``d = g + wd w``, trust ratio ``eta ||w|| / ||d||``, momentum on the scaled update), biases and norm
  parameters without weight decay or adaptation.
* **DINO** (Caron et al. 2021), multi-crop: student = trunk + head (3-layer MLP with GELU, L2-normalised
  bottleneck, weight-normalised last layer with gain 1); teacher = EMA copy seeing the global crops only;
  loss = mean over (teacher crop, other student crop) pairs of ``-softmax((t - c)/tau_t) . log_softmax(s/tau_s)``;
  centre ``c <- l c + (1 - l) mean(t)``; per-parameter gradient clipping; last layer frozen in epoch 0; SGD.

``implementation="lightly"`` swaps in lightly's heads, losses, LARS and ``update_momentum`` where lightly has
them (the trunk, the step structure and the optimiser settings stay the same), so the peer is then "lightly's
building blocks". Hyper-parameters (widths, queue, temperatures, momenta, lr, weight decay, clipping) are read
from the semssl recipe being compared, so both sides do the same arithmetic.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PEERS = ("mocov2", "byol", "dino")


# --------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------
def lightly_version() -> Optional[str]:
    """lightly's version when it imports, else None (the GPU machine has no lightly)."""
    try:
        import lightly
    except Exception:  # noqa: BLE001 — any failure to import means "not available"
        return None
    return str(getattr(lightly, "__version__", "unknown"))


def trunk(arch: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier, random init; returns (module, feature width)."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def mlp(dims: list[int], batch_norm: bool) -> nn.Sequential:
    """``Linear -> [BN] -> ReLU`` between consecutive widths, a plain ``Linear`` last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(b)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def split_decay(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: weights (decayed, adapted by LARS) and biases / norm parameters (neither)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "adapt": True},
            {"params": plain, "weight_decay": 0.0, "adapt": False}]


class PlainLARS(torch.optim.Optimizer):
    """LARS from You et al. 2017 as BYOL uses it: ``d = g + wd w``; ``d *= eta ||w|| / ||d||`` (groups with
    ``adapt``); ``buf = momentum buf + d``; ``w -= lr buf``."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float = 0.9, eta: float = 1e-3) -> None:
        super().__init__(groups, {"lr": lr, "momentum": momentum, "eta": eta, "weight_decay": 0.0, "adapt": True})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:  # noqa: D102
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d.mul_(trust)
                buf = self.state[p].get("buf")
                if buf is None:
                    buf = self.state[p]["buf"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


@torch.no_grad()
def ema(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """``teacher <- m teacher + (1 - m) student`` over parameters (fused over the parameter list)."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, s, alpha=1.0 - m)


def cosine_momentum(m0: float, m1: Optional[float], step: int, total: int) -> float:
    """BYOL / DINO's teacher momentum: ``m1 - (m1 - m0)(cos(pi step / total) + 1) / 2``; constant without m1."""
    if m1 is None:
        return m0
    return m1 - (m1 - m0) * (math.cos(math.pi * step / total) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False)


def shuffled(encoder: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``encoder`` on a permuted batch, outputs put back in batch order (shuffle-BN on one process)."""
    perm = torch.randperm(x.shape[0], device=x.device)
    out = encoder(x[perm])
    return out[torch.argsort(perm)]


class PeerStep:
    """One training step of a peer: ``loss()`` under autocast, backward, ``after_backward()``, optimiser step,
    ``after_step()`` (EMA). Subclasses build ``self.model`` (trainable), ``self.optimizer`` and the rest."""

    total_steps = 1000  # the schedule length the EMA momentum is computed over (its value barely matters here)

    def __init__(self, views: dict[str, Tensor], device: torch.device, amp: Optional[torch.dtype]) -> None:
        self.views, self.device, self.amp = views, device, amp
        self.step = 0
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer

    def loss(self) -> Tensor:
        raise NotImplementedError

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def __call__(self) -> Tensor:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.after_backward()
        self.optimizer.step()
        self.after_step()
        self.step += 1
        return loss.detach()

    def to_device(self, channels_last: bool) -> None:
        for value in list(vars(self).values()):
            if isinstance(value, nn.Module):
                value.to(self.device)
                if channels_last:
                    value.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------------------
# MoCo-v2
# --------------------------------------------------------------------------------------------------------------
class MoCoV2Peer(PeerStep):
    def __init__(self, cfg: Any, views: dict[str, Tensor], device: torch.device, amp: Optional[torch.dtype],
                 implementation: str = "plain", channels_last: bool = True) -> None:
        super().__init__(views, device, amp)
        m = cfg.method
        self.x_q, self.x_k = views[m.views[0]], views[m.views[1]]
        net, dim = trunk(cfg.model.arch)
        hidden = m.proj_hidden_dim or dim
        if implementation == "lightly":
            from lightly.loss import NTXentLoss
            from lightly.models.modules import MoCoProjectionHead

            head = MoCoProjectionHead(dim, hidden, m.proj_dim)
            self.criterion = NTXentLoss(temperature=m.temperature, memory_bank_size=(m.queue_size, m.proj_dim))
        else:
            head = mlp([dim, hidden, m.proj_dim], batch_norm=False)
            self.criterion = None
        self.model = nn.Sequential(net, head)
        self.key_encoder = frozen_copy(self.model)
        self.momentum, self.tau = m.momentum, m.temperature
        self.queue = F.normalize(torch.randn(m.queue_size, m.proj_dim), dim=1).to(device)
        self.ptr = 0
        self.to_device(channels_last)
        o = cfg.optim
        lr = o.lr * self.x_q.shape[0] / 256
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)

    def loss(self) -> Tensor:
        q = F.normalize(self.model(self.x_q), dim=1)
        with torch.no_grad():
            k = F.normalize(shuffled(self.key_encoder, self.x_k), dim=1)
        if self.criterion is not None:  # lightly: its memory bank holds and enqueues the keys
            return self.criterion(q, k)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], dim=1) / self.tau
        self._enqueue(k)
        return F.cross_entropy(logits.float(), torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    @torch.no_grad()
    def _enqueue(self, k: Tensor) -> None:
        n = k.shape[0]
        idx = (self.ptr + torch.arange(n, device=k.device)) % self.queue.shape[0]
        self.queue[idx] = k.float()
        self.ptr = (self.ptr + n) % self.queue.shape[0]

    def after_step(self) -> None:
        ema(self.model, self.key_encoder, self.momentum)


# --------------------------------------------------------------------------------------------------------------
# BYOL
# --------------------------------------------------------------------------------------------------------------
class BYOLPeer(PeerStep):
    def __init__(self, cfg: Any, views: dict[str, Tensor], device: torch.device, amp: Optional[torch.dtype],
                 implementation: str = "plain", channels_last: bool = True) -> None:
        super().__init__(views, device, amp)
        m = cfg.method
        self.x1, self.x2 = views[m.views[0]], views[m.views[1]]
        net, dim = trunk(cfg.model.arch)
        self.lightly = implementation == "lightly"
        if self.lightly:
            from lightly.loss import NegativeCosineSimilarity
            from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

            projector = BYOLProjectionHead(dim, m.proj_hidden_dim, m.proj_dim)
            self.predictor = BYOLPredictionHead(m.proj_dim, m.pred_hidden_dim, m.proj_dim)
            self.criterion = NegativeCosineSimilarity()
        else:
            projector = mlp([dim, m.proj_hidden_dim, m.proj_dim], batch_norm=True)
            self.predictor = mlp([m.proj_dim, m.pred_hidden_dim, m.proj_dim], batch_norm=True)
        self.online = nn.Sequential(net, projector)
        self.target = frozen_copy(self.online)
        self.model = nn.ModuleDict({"online": self.online, "predictor": self.predictor})
        self.m0, self.m1 = m.momentum, m.momentum_end
        self.to_device(channels_last)
        o = cfg.optim
        lr = o.lr * self.x1.shape[0] / 256
        groups = split_decay(self.model, o.weight_decay)
        if self.lightly:
            from lightly.utils.lars import LARS

            # lightly's LARS skips the adaptation of groups without weight decay (biases, norms)
            self.optimizer = LARS([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                  lr=lr, momentum=o.momentum)
        else:
            self.optimizer = PlainLARS(groups, lr=lr, momentum=o.momentum)

    def _direction(self, a: Tensor, b: Tensor) -> Tensor:
        p = self.predictor(self.online(a))
        with torch.no_grad():
            z = self.target(b)
        if self.lightly:
            return self.criterion(p, z)
        return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()

    def loss(self) -> Tensor:
        return self._direction(self.x1, self.x2) + self._direction(self.x2, self.x1)

    def after_step(self) -> None:
        m = cosine_momentum(self.m0, self.m1, self.step, self.total_steps)
        if self.lightly:
            from lightly.models.utils import update_momentum

            update_momentum(self.online, self.target, m)
        else:
            ema(self.online, self.target, m)


# --------------------------------------------------------------------------------------------------------------
# DINO
# --------------------------------------------------------------------------------------------------------------
class DINOHeadPeer(nn.Module):
    """MLP ``d -> h -> ... -> bottleneck`` (GELU), L2 normalisation, then ``x @ normalize(V).T`` (weight norm
    with the gain fixed to 1, DINO's ``norm_last_layer``)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, out_dim: int, layers: int) -> None:
        super().__init__()
        dims = [dim] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))


class DINOPeer(PeerStep):
    def __init__(self, cfg: Any, views: dict[str, Tensor], device: torch.device, amp: Optional[torch.dtype],
                 implementation: str = "plain", channels_last: bool = True) -> None:
        super().__init__(views, device, amp)
        m = cfg.method
        self.globals, self.locals = views[m.views[0]], [views[v] for v in m.views[1:]]
        self.n_global = m.global_crops
        self.lightly = implementation == "lightly"
        self.student = self._network(cfg)
        # the teacher is a second network given the student's weights: lightly's head uses the old weight_norm,
        # which cannot be deep-copied
        self.teacher = self._network(cfg).requires_grad_(False)
        self.teacher.load_state_dict(self.student.state_dict())
        self.head, self.model = self.student["head"], self.student
        if self.lightly:
            from lightly.loss import DINOLoss

            self.criterion = DINOLoss(output_dim=m.out_dim, warmup_teacher_temp=m.warmup_teacher_temp,
                                      teacher_temp=m.teacher_temp, student_temp=m.student_temp,
                                      center_momentum=m.center_momentum)
        else:
            self.center = torch.zeros(1, m.out_dim, device=device)
        self.m0, self.m1 = m.momentum, m.momentum_end
        self.tau_s, self.tau_t, self.center_m = m.student_temp, m.warmup_teacher_temp, m.center_momentum
        self.clip = cfg.optim.clip_grad
        self.to_device(channels_last)
        o = cfg.optim
        lr = o.lr * self.globals.shape[0] / self.n_global / 256
        groups = split_decay(self.student, o.weight_decay)
        self.optimizer = torch.optim.SGD([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                         lr=lr, momentum=o.momentum)

    def _network(self, cfg: Any) -> nn.ModuleDict:
        m = cfg.method
        net, dim = trunk(cfg.model.arch)
        if self.lightly:
            from lightly.models.modules import DINOProjectionHead

            head = DINOProjectionHead(dim, m.hidden_dim, m.bottleneck_dim, m.out_dim, batch_norm=m.use_bn_in_head,
                                      freeze_last_layer=1, norm_last_layer=m.norm_last_layer)
        else:
            head = DINOHeadPeer(dim, m.hidden_dim, m.bottleneck_dim, m.out_dim, m.head_layers)
        return nn.ModuleDict({"trunk": net, "head": head})

    @staticmethod
    def _forward(net: nn.ModuleDict, crops: list[Tensor]) -> Tensor:
        """The trunk once per resolution, the head once on all crops (DINO's multi-crop forward)."""
        return net["head"](torch.cat([net["trunk"](x) for x in crops]))

    def loss(self) -> Tensor:
        b = self.globals.shape[0] // self.n_global
        s = self._forward(self.student, [self.globals, *self.locals]).float().chunk(self.n_global + sum(
            x.shape[0] // b for x in self.locals))
        with torch.no_grad():
            t = self._forward(self.teacher, [self.globals]).float().chunk(self.n_global)
        if self.lightly:
            return self.criterion(list(t), list(s), epoch=0)
        return self._dino_loss(s, t)

    def _dino_loss(self, s: tuple[Tensor, ...], t: tuple[Tensor, ...]) -> Tensor:
        log_p = [F.log_softmax(x / self.tau_s, dim=-1) for x in s]
        q = [F.softmax((x - self.center) / self.tau_t, dim=-1) for x in t]
        terms = [-(qi * log_p[v]).sum(-1).mean() for i, qi in enumerate(q) for v in range(len(s)) if v != i]
        with torch.no_grad():
            self.center.mul_(self.center_m).add_(torch.cat(t).mean(0, keepdim=True), alpha=1 - self.center_m)
        return sum(terms) / len(terms)

    def after_backward(self) -> None:
        if self.clip > 0:
            clip_per_parameter(self.student.parameters(), self.clip)
        if self.lightly:
            self.head.cancel_last_layer_gradients(current_epoch=0)
        else:
            self.head.last_layer.weight.grad = None  # frozen in epoch 0 (DINO's freeze_last_layer = 1)

    def after_step(self) -> None:
        m = cosine_momentum(self.m0, self.m1, self.step, self.total_steps)
        if self.lightly:
            from lightly.models.utils import update_momentum

            update_momentum(self.student, self.teacher, m)
        else:
            ema(self.student, self.teacher, m)


def clip_per_parameter(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """DINO's clipping: each gradient scaled by ``min(1, max_norm / (||g|| + 1e-6))`` on its own (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        g.mul_(torch.clamp(max_norm / (torch.linalg.vector_norm(g) + 1e-6), max=1.0))


def build_peer(name: str, cfg: Any, views: dict[str, Tensor], device: torch.device, amp: Optional[torch.dtype],
               implementation: str, channels_last: bool = True) -> PeerStep:
    """The peer step of ``name`` (``mocov2``, ``byol``, ``dino``) for the semssl recipe ``cfg``."""
    cls = {"mocov2": MoCoV2Peer, "byol": BYOLPeer, "dino": DINOPeer}[name]
    return cls(cfg, views, device, amp, implementation=implementation, channels_last=channels_last)
