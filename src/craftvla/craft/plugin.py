"""`CraftPlugin`: where CRaFT plugs into the training loop's `train_step`.

The loop (train/loop.py) calls, with the *unwrapped* policy and no DDP gradient sync:

    for micro_batch in step_batches:
        metrics = plugin.backward(policy, micro_batch, scale=1 / len(step_batches))
    plugin.before_optimizer_step()     # all-reduce g_act | g_ret once, surgery, write .grad
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    craft_metrics = plugin.after_optimizer_step()   # dual update; craft/* every log_freq steps
    craft_metrics = plugin.flush_metrics()          # at the run's end: what is still pending

`g_act` and `g_ret` accumulate over the micro-batches into one flat buffer (autograd adds into
views of it directly, so no per-micro-batch gradient copies); the surgery runs once per
optimizer step on the accumulated, rank-averaged gradients, never per micro-batch (a per-micro-batch
surgery would overwrite the accumulated gradient and run before DDP's all-reduce).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from craftvla.craft import functional as CF
from craftvla.craft.anchors import make_anchor_provider
from craftvla.craft.config import CraftConfig
from craftvla.errors import CraftVLAError
from craftvla.model.context import VLMContext, bridge_features

log = logging.getLogger(__name__)
METRIC_KEYS = ("craft/retention_loss", "craft/conflict", "craft/cos", "craft/beta")


class CraftPlugin:
    """CRaFT (and its baselines) for one policy's trainable parameters; see the module docstring.

    Build it on the policy holding its *initial* weights (before loading a resumed training
    state into it): that is what the anchors and L2-to-init refer to. `log_freq` is the run's
    logging frequency, used unless `cfg.log_freq` asks for another.
    """

    def __init__(self, policy: nn.Module, cfg: CraftConfig, seed: int = 0, log_freq: int = 1):
        self.cfg = cfg
        self.log_freq = cfg.log_freq or log_freq  # craft/* metrics every this many optimizer steps
        self._policy = policy
        named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        if not named:
            raise CraftVLAError("CRaFT: the policy has no trainable parameters")
        self.params = [p for _, p in named]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise CraftVLAError(f"CRaFT: trainable parameters mix dtypes {sorted(map(str, dtypes))}; use one")
        self._build_buffers()
        device = self.params[0].device
        self.lam = torch.tensor(float(cfg.retention_weight), device=device)  # stays on the device
        self.step, self._micro = 0, 0
        self._pending = None
        self._log_sum, self._log_n = torch.zeros(len(METRIC_KEYS), device=device), 0
        self.anchors = make_anchor_provider(policy, cfg, self._features, seed) if cfg.uses_features else None
        self.initial = [p.detach().clone() for p in self.params] if cfg.mode == "l2_init" else None
        log.info("CRaFT mode=%s over %d trainable tensors (%s values); anchors: %s", cfg.mode,
                 len(self.params), f"{self._numel:,}", getattr(self.anchors, "description", "none"))

    def _build_buffers(self) -> None:
        """One flat buffer [g_act | g_ret | L_ret]: one all-reduce covers everything."""
        p0 = self.params[0]
        self._numel = n = sum(p.numel() for p in self.params)
        self._buf = torch.zeros(2 * n + 1, dtype=p0.dtype, device=p0.device)
        self.g_act, self.g_ret, self._l_ret = self._buf[:n], self._buf[n : 2 * n], self._buf[2 * n :]
        sizes = [p.numel() for p in self.params]
        self._act_views = [v.view_as(p) for v, p in zip(self.g_act.split(sizes), self.params)]
        self._ret_views = [v.view_as(p) for v, p in zip(self.g_ret.split(sizes), self.params)]
        self._lengths = torch.tensor(sizes, device=p0.device)  # (K,) for per-tensor projection

    def _features(self, context: VLMContext) -> torch.Tensor:
        """(B, F) bridge features of a forward's VLM context, as configured."""
        return policy_features(self._policy, context, self.cfg)

    # ----- per micro-batch ----------------------------------------------------------------------
    def _accumulate(self, loss: torch.Tensor, views, retain_graph: bool) -> None:
        """Backward `loss` so that autograd adds the gradients straight into `views`."""
        for p, v in zip(self.params, views):
            p.grad = v
        loss.backward(inputs=self.params, retain_graph=retain_graph)

    def backward(self, policy: nn.Module, batch: dict, scale: float = 1.0) -> dict:
        """One micro-batch: forward once, add scale * grad(L_act) and scale * grad(L_ret) into the
        buffers. `policy` is the unwrapped module (no DDP sync here). Returns the model's metrics
        plus "loss" (a detached tensor: no host sync)."""
        if self._micro == 0:
            self._buf.zero_()
        self._policy = policy
        out = policy.compute_loss(batch)
        if self.anchors is not None:
            f_theta, f_anchor = self.anchors.retention_pair(policy, batch, out.context)
            l_ret = CF.retention_loss(f_theta, f_anchor)
            self._accumulate(l_ret * scale, self._ret_views, retain_graph=True)
            self._l_ret += l_ret.detach()
        self._accumulate(out.loss * scale, self._act_views, retain_graph=False)
        self._micro += 1
        return {**out.metrics, "loss": out.loss.detach()}

    # ----- per optimizer step -------------------------------------------------------------------
    def before_optimizer_step(self, params=None) -> None:
        """Average the buffers over micro-batches' L_ret and ranks, do the surgery, set `.grad`."""
        if self._micro == 0:
            raise CraftVLAError("CRaFT: before_optimizer_step() without any backward() since the last step")
        if params is not None and len(list(params)) != len(self.params):
            raise CraftVLAError("CRaFT: the optimizer's parameters are not the policy's trainable ones")
        self._l_ret /= self._micro
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._buf)  # one collective: g_act | g_ret | L_ret
            self._buf /= dist.get_world_size()
        stats = self._combine()
        for p, v in zip(self.params, self._act_views):
            p.grad = v  # the optimizer reads the combined gradient from the buffer, no copy
        self._pending = stats

    def _combine(self) -> dict[str, torch.Tensor]:
        """g_act <- the final gradient, per the mode."""
        cfg = self.cfg
        if cfg.mode == "l2_init":  # L2-SP: + alpha * (theta - theta0); penalty (alpha/2)||.||^2
            diff = torch._foreach_sub([p.detach() for p in self.params], self.initial)
            torch._foreach_add_(self._act_views, diff, alpha=cfg.retention_weight)
            penalty = 0.5 * cfg.retention_weight * torch.stack(torch._foreach_powsum(diff, 2)).sum()
            zero = torch.zeros((), device=penalty.device)
            return {"l_ret": penalty, "cos": zero, "beta": zero + cfg.retention_weight, "conflict": zero}
        lengths = self._lengths if cfg.projection_scope == "per_tensor" else None
        stats = CF.project_flat(self.g_act, self.g_ret, self.lam, cfg.projection_eps, lengths, cfg.projection_on)
        return {"l_ret": self._l_ret[0].clone(), **stats}

    def after_optimizer_step(self) -> dict[str, float]:
        """Dual update with this step's L_ret; every `log_freq` steps, the craft/* metrics averaged
        over the steps since the last log (craft/lambda: the value after this step's update)."""
        if self._pending is None:
            raise CraftVLAError("CRaFT: after_optimizer_step() without before_optimizer_step()")
        stats, self._pending = self._pending, None
        if self.cfg.dual_on:
            self.lam = CF.dual_update(self.lam, stats["l_ret"], self.cfg.retention_budget, self.cfg.dual_lr)
        self.step += 1
        self._micro = 0
        self._log_sum += torch.stack([stats["l_ret"], stats["conflict"], stats["cos"], stats["beta"]]).float()
        self._log_n += 1
        return {} if self.step % self.log_freq else self.flush_metrics()

    def flush_metrics(self) -> dict[str, float]:
        """The craft/* metrics averaged over the steps since the last log ({} if none): called
        every `log_freq` steps, and by the loop at the run's end so a short run still logs them."""
        if not self._log_n:
            return {}
        values = (self._log_sum / self._log_n).tolist()  # the one host sync per logged line
        self._log_sum.zero_()
        self._log_n = 0
        return {**dict(zip(METRIC_KEYS, values)), "craft/lambda": float(self.lam)}

    # ----- training state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"lambda": float(self.lam), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        missing = {"lambda", "step"} - set(state)
        if missing:
            raise CraftVLAError(f"CRaFT state is missing {sorted(missing)}; it has {sorted(state)}")
        self.lam = torch.tensor(float(state["lambda"]), device=self.lam.device)
        self.step = int(state["step"])


def policy_features(policy: nn.Module, context: VLMContext, cfg: CraftConfig) -> torch.Tensor:
    """The policy's bridge features from `context` with the configured layer, pooling and anchor type."""
    return bridge_features(context, policy.anchor_layer(cfg.anchor_layer_idx), pooling=cfg.online_pooling,
                           anchor_type=cfg.online_anchor_type)
