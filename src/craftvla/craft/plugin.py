"""`CraftPlugin`: where CRaFT plugs into the training loop's `train_step`; `build_craft_plugin`
makes one from a run's settings.

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

With `retention_every` k > 1, only every k-th optimizer step (and a process's first) computes
g_ret and L_ret; the steps between keep them in the buffer and reuse them for the projection,
lambda's term and the dual update, so they cost a plain step plus the surgery.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from craftvla.craft import functional as CF
from craftvla.craft.config import CraftConfig
from craftvla.craft.data import (
    BatchStream,
    anchor_batch_stream,
    calibration_batches,
    fixed_frames,
    open_anchor_dataset,
)
from craftvla.craft.providers import make_anchor_provider
from craftvla.craft.targets import combined_retention_loss, compute_targets, feature_variance
from craftvla.errors import CraftVLAError
from craftvla.model.context import VLMContext

log = logging.getLogger(__name__)
METRIC_KEYS = ("craft/retention_loss", "craft/conflict", "craft/cos", "craft/beta")


class CraftPlugin:
    """CRaFT (and its baselines) for one policy's trainable parameters; see the module docstring.

    Build it on the policy holding its *initial* weights (before loading a resumed training
    state into it): that is what the anchors and L2-to-init refer to. `log_freq` is the run's
    logging frequency, used unless `cfg.log_freq` asks for another. `anchor_batches` (step ->
    micro-batches) feeds online anchors from an anchor dataset. With `cfg.scale_free`, call
    `calibrate` before training (the loop does); until then each target's scale is 1 (raw MSE).
    """

    def __init__(
        self,
        policy: nn.Module,
        cfg: CraftConfig,
        seed: int = 0,
        log_freq: int = 1,
        anchor_batches: BatchStream | None = None,
    ):
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
        self.anchors = (
            make_anchor_provider(policy, cfg, self._features, seed, anchor_batches) if cfg.uses_features else None
        )
        self.targets = self._target_names()
        self.metric_keys = METRIC_KEYS + tuple(f"craft/ret/{t}" for t in self.targets if len(self.targets) > 1)
        self._build_buffers()
        device = self.params[0].device
        self.lam = torch.tensor(float(cfg.retention_weight), device=device)  # stays on the device
        self.scales = {t: torch.ones((), device=device) for t in self.targets}  # see calibrate()
        self.step, self._micro, self._started = 0, 0, False
        self._have_ret = False  # g_ret / L_ret computed at least once in this process (retention_every)
        self._pending = None
        self._log_sum, self._log_n = torch.zeros(len(self.metric_keys), device=device), 0
        self.initial = [p.detach().clone() for p in self.params] if cfg.mode == "l2_init" else None
        log.info(
            "CRaFT mode=%s over %d trainable tensors (%s values); anchors: %s",
            cfg.mode,
            len(self.params),
            f"{self._numel:,}",
            getattr(self.anchors, "description", "none"),
        )

    def _build_buffers(self) -> None:
        """One flat buffer [g_act | g_ret | L_ret | per-target terms]: one all-reduce covers everything."""
        p0 = self.params[0]
        self._numel = n = sum(p.numel() for p in self.params)
        self._buf = torch.zeros(2 * n + 1 + len(self.targets), dtype=p0.dtype, device=p0.device)
        self.g_act, self.g_ret, self._l_ret = self._buf[:n], self._buf[n : 2 * n], self._buf[2 * n :]
        # _l_ret[0] = L_ret, _l_ret[1:] = each target's scaled term
        sizes = [p.numel() for p in self.params]
        self._act_views = [v.view_as(p) for v, p in zip(self.g_act.split(sizes), self.params)]
        self._ret_views = [v.view_as(p) for v, p in zip(self.g_ret.split(sizes), self.params)]
        self._lengths = torch.tensor(sizes, device=p0.device)  # (K,) for per-tensor projection

    def _target_names(self) -> list[str]:
        """The retained targets: the config's, a cache's own, or none (L2-to-init)."""
        if self.anchors is None:
            return []
        return [self.anchors.target] if self.cfg.source == "cache" else self.cfg.target_names

    def _features(self, context: VLMContext) -> dict[str, torch.Tensor]:
        """{target: (B, ...)} of a forward's VLM context, as configured."""
        return compute_targets(self._policy, context, self.cfg)

    def calibrate(self, batches) -> dict[str, float]:
        """Measure each target's scale: the variance across anchor samples of the initial model's
        target (`batches`: anchor-data micro-batches; a cache uses its own stored targets). Call
        with the initial weights; the result is saved in the training state."""
        if self.anchors is None or not self.cfg.scale_free:
            return {}
        measured = self.anchors.measure_targets(self._policy, batches)
        for name, f in measured.items():
            self.scales[name] = feature_variance(f).clamp_min(1e-12).to(self.scales[name].device)
        values = {t: float(v) for t, v in self.scales.items()}
        log.info(
            "CRaFT retention scale (variance across %d anchor samples): %s",
            len(next(iter(measured.values()))),
            ", ".join(f"{t}={v:.4g}" for t, v in values.items()),
        )
        return values

    # ----- per micro-batch ----------------------------------------------------------------------
    @property
    def retention_step(self) -> bool:
        """Whether this optimizer step recomputes g_ret and L_ret (every `retention_every` steps,
        and on a process's first step: a resumed run has no last g_ret to reuse)."""
        if self.anchors is None:
            return False
        return self.step % self.cfg.every == 0 or not self._have_ret

    def _accumulate(self, loss: torch.Tensor, views, retain_graph: bool) -> None:
        """Backward `loss` so that autograd adds the gradients straight into `views`."""
        for p, v in zip(self.params, views):
            p.grad = v
        loss.backward(inputs=self.params, retain_graph=retain_graph)

    def backward(self, policy: nn.Module, batch: dict, scale: float = 1.0) -> dict:
        """One micro-batch: forward once, add scale * grad(L_act) and scale * grad(L_ret) into the
        buffers. `policy` is the unwrapped module (no DDP sync here). Returns the model's metrics
        plus "loss" (a detached tensor: no host sync)."""
        refresh = self.retention_step
        if self._micro == 0:
            (self._buf if refresh else self.g_act).zero_()  # between refreshes g_ret and L_ret are kept
        if not self._started and hasattr(self.anchors, "start"):
            # anchor batches continue where a resumed run stopped: one per retention step taken so far
            self.anchors.start(-(-self.step // self.cfg.every))
        self._started = True
        self._policy = policy
        out = policy.compute_loss(batch)
        if refresh:
            l_ret, terms = combined_retention_loss(
                self.anchors.retention_pairs(policy, batch, out.context), self.scales
            )
            # the anchor forward is separate from the task forward when anchors come from other data
            self._accumulate(l_ret * scale, self._ret_views, retain_graph=True)
            self._l_ret += torch.stack([l_ret.detach(), *[terms[t].detach() for t in self.targets]])
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
        refresh = self.retention_step
        if refresh:
            self._l_ret /= self._micro
        if dist.is_available() and dist.is_initialized():
            reduced = self._buf if refresh else self.g_act  # a reused g_ret is already averaged
            dist.all_reduce(reduced)  # one collective: g_act | g_ret | L_ret
            reduced /= dist.get_world_size()
        self._have_ret = self._have_ret or refresh
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
            return {
                "l_ret": penalty,
                "terms": self._l_ret[1:].clone(),
                "cos": zero,
                "beta": zero + cfg.retention_weight,
                "conflict": zero,
            }
        lengths = self._lengths if cfg.projection_scope == "per_tensor" else None
        stats = CF.project_flat(self.g_act, self.g_ret, self.lam, cfg.projection_eps, lengths, cfg.projection_on)
        return {"l_ret": self._l_ret[0].clone(), "terms": self._l_ret[1:].clone(), **stats}

    def after_optimizer_step(self) -> dict[str, float]:
        """Dual update with this step's L_ret; every `log_freq` steps, the craft/* metrics averaged
        over the steps since the last log (craft/lambda: the value after this step's update)."""
        if self._pending is None:
            raise CraftVLAError("CRaFT: after_optimizer_step() without before_optimizer_step()")
        stats, self._pending = self._pending, None
        if self.cfg.dual_on:
            cfg = self.cfg
            self.lam = CF.dual_update(self.lam, stats["l_ret"], cfg.retention_budget, cfg.dual_lr, cfg.dual_relative)
        self.step += 1
        self._micro = 0
        main = torch.stack([stats["l_ret"], stats["conflict"], stats["cos"], stats["beta"]]).float()
        terms = stats["terms"].float() if len(self.targets) > 1 else stats["terms"][:0].float()
        self._log_sum += torch.cat([main, terms])
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
        return {**dict(zip(self.metric_keys, values)), "craft/lambda": float(self.lam)}

    # ----- training state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"lambda": float(self.lam), "step": self.step, "scales": {t: float(v) for t, v in self.scales.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = {"lambda", "step"} - set(state)
        if missing:
            raise CraftVLAError(f"CRaFT state is missing {sorted(missing)}; it has {sorted(state)}")
        self.lam = torch.tensor(float(state["lambda"]), device=self.lam.device)
        self.step = int(state["step"])
        for name, value in state.get("scales", {}).items():  # as measured when the run started
            if name in self.scales:
                self.scales[name] = torch.tensor(float(value), device=self.lam.device)


def build_craft_plugin(
    policy: nn.Module,
    cfg: CraftConfig,
    *,
    seed: int,
    log_freq: int,
    micro_per_step: int = 1,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    task_dataset=None,
) -> CraftPlugin:
    """The plug-in of one training process (rank `rank` of `world_size`) with its anchor data
    wired up and its loss scale measured. Online anchors read --craft.anchor_dataset's batches
    when given (`micro_per_step` micro-batches per optimizer step, positioned by the step), else
    the training batch; the scale-free loss's spread is measured on the anchor data (else
    `task_dataset`, else fake batches) with the initial weights, so call this before a resumed
    training state is loaded."""
    if cfg.mode in ("craft", "dual_only") and cfg.source == "online" and not cfg.anchor_dataset:
        log.warning(
            "CRaFT anchors on the training batch: in the retention study (benchmarks/retention) "
            "that kept little of the old tasks (pooled features) or stopped the new one being learned "
            "(actions); give the old tasks' data with --craft.anchor_dataset DIR"
        )
    anchor_data = open_anchor_dataset(cfg.anchor_dataset, policy) if cfg.anchor_dataset else None
    if anchor_data is not None and cfg.frames is not None:
        anchor_data = fixed_frames(anchor_data, cfg.frames, seed + 3)
    stream = (
        None
        if anchor_data is None
        else anchor_batch_stream(
            anchor_data, cfg.anchor_batch_size, micro_per_step, seed + 1, rank, world_size, num_workers
        )
    )
    plugin = CraftPlugin(policy, cfg, seed=seed + rank, log_freq=log_freq, anchor_batches=stream)
    if cfg.uses_features and cfg.scale_free:
        data = anchor_data if anchor_data is not None else task_dataset
        plugin.calibrate(calibration_batches(data, cfg.scale_samples, seed + 2, policy.config))
    return plugin
