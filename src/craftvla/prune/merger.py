"""Stage 1: merge the vision tokens before the LLM (N -> M = round(merge_ratio * N)); and the optional
stage before it, `TowerPool`: the same windows averaged inside the vision towers.

Every merger maps `(vision (B, N, D), text (B, T, D), text_mask (B, T)) -> (merged (B, M, D),
sources (B or 1, N, M), stats)`. `sources` says which merged tokens stand for each input token (rows
sum to 1; one-hot for the hard mergers): `sources @ merged` puts every input position's stand-in back
in place (ToMe's "unmerge"), which is what a position-aware read-out of the patches reads. The learned
mergers report `merge_sparsity` (the mean normalised entropy of each merged token's weights over the
input tokens: 0 = each output copies one input, 1 = a uniform average).
Patches are grouped by `patch_groups`: windows of neighbouring patches of one camera (rows x cols 1x2 at 0.5,
2x2 at 0.25, 2x4 at 0.125), the `pool` baseline's windows and the learned mergers' starting point.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from craftvla.config import LEARNED_MERGERS
from craftvla.errors import ConfigError


def merged_count(num_tokens: int, ratio: float) -> int:
    return max(1, round(num_tokens * ratio))


def patch_groups(num_cameras: int, grid: int, ratio: float) -> torch.Tensor:
    """(N,) long: the output slot of every patch (raster order per camera, cameras concatenated).

    Windows of wh x ww patches with wh * ww = 1 / ratio (a power of two), wide before tall."""
    factor = round(1 / ratio)
    if factor < 1 or abs(factor * ratio - 1) > 1e-6 or factor & (factor - 1):
        raise ConfigError(
            f"pruning.merge_ratio={ratio}: grouping needs 1 / ratio to be a power of two (0.5, 0.25, ...)"
        )
    ww = 2 ** math.ceil(math.log2(factor) / 2)
    wh = factor // ww
    if grid % ww or grid % wh:
        raise ConfigError(f"pruning.merge_ratio={ratio}: {wh}x{ww} windows do not tile a {grid}x{grid} patch grid")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    per_camera = ((rows // wh) * (grid // ww) + cols // ww).flatten()  # (grid * grid,)
    slots = (grid // wh) * (grid // ww)
    return torch.cat([per_camera + c * slots for c in range(num_cameras)])


def group_matrix(groups: torch.Tensor) -> torch.Tensor:
    """(N,) slot ids -> (M, N) row-stochastic averaging weights."""
    one_hot = F.one_hot(groups, int(groups.max()) + 1).T.float()  # (M, N)
    return one_hot / one_hot.sum(dim=1, keepdim=True)


def slot_sources(groups: torch.Tensor) -> torch.Tensor:
    """(N,) slot ids -> (1, N, M) one-hot: each token stands in its own window's merged token."""
    return F.one_hot(groups, int(groups.max()) + 1).float().unsqueeze(0)


def normalised_entropy(weights: torch.Tensor) -> torch.Tensor:
    """weights (..., N) rows summing to 1 -> mean entropy / log N, a scalar in [0, 1]."""
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy.mean() / math.log(weights.shape[-1])


class PoolMerger(nn.Module):
    """Average each window of neighbouring patches (the `pool` baseline): (B, N, D) -> (B, M, D)."""

    def __init__(self, groups: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", group_matrix(groups), persistent=False)  # (M, N)
        self.register_buffer("sources", slot_sources(groups), persistent=False)  # (1, N, M)

    def forward(self, vision, text, text_mask):
        return torch.einsum("mn,bnd->bmd", self.weights.to(vision.dtype), vision), self.sources, {}


def mean_instruction(text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) instruction tokens, (B, T) real-token mask -> (B, D) their mean."""
    keep = text_mask.unsqueeze(-1).to(text.dtype)
    return (text * keep).sum(1) / keep.sum(1).clamp_min(1)


def window_order(groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N,) slot ids -> (the permutation that lists the patches window by window, the window size k);
    `x[:, order].unflatten(1, (-1, k))` is then (B, M, k, D). Needs equal windows (`patch_groups`'s)."""
    size = torch.bincount(groups)
    if not bool((size == size[0]).all()):
        raise ConfigError(f"window merging needs equal windows; got sizes {sorted(set(size.tolist()))}")
    return torch.sort(groups, stable=True).indices, int(size[0])


class GroupScores(nn.Module):
    """Weights within each group of tokens (a window of neighbouring patches, or one of ToMe's sets)
    from one instruction-aware score per token:

        s_n = v . tanh(W x_n + U t),   w = softmax over the group of s

    `v` starts at zero: uniform weights, i.e. each group's plain average, until trained. Scoring is
    O(N h), once per token, never per pair."""

    def __init__(self, dim: int, text_dim: int, hidden_dim: int = 64):
        super().__init__()
        self.vision = nn.Linear(dim, hidden_dim)
        self.text = nn.Linear(text_dim, hidden_dim, bias=False)
        self.score = nn.Linear(hidden_dim, 1, bias=False)
        nn.init.zeros_(self.score.weight)

    def logits(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """tokens (B, ..., D), instruction t (B, D_text) -> scores s (B, ..., 1)."""
        instruction = self.text(text).view(text.shape[0], *[1] * (tokens.dim() - 2), -1)  # (B, 1.., h)
        return self.score(torch.tanh(self.vision(tokens) + instruction))

    def forward(self, windows: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """windows (B, M, k, D), t (B, D_text) -> each window's weights (B, M, k, 1)."""
        return self.logits(windows, text).softmax(dim=2)

    def within_sets(self, tokens: torch.Tensor, members: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D), members (B, M, N) (> 0 where token n is in set m; every set non-empty),
        t (B, D_text) -> weights (B, M, N): each set's softmax of its members' scores, 0 elsewhere."""
        scores = self.logits(tokens, text).transpose(1, 2)  # (B, 1, N)
        return scores.masked_fill(members <= 0, float("-inf")).softmax(dim=-1)


def set_sparsity(weights: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Weights within sets (B, M, N) -> the mean over sets of more than one token of entropy / log(size):
    0 = each merged token copies one member, 1 = its members' plain average."""
    size = (members > 0).sum(dim=-1).to(weights.dtype)  # (B, M)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)
    several = (size > 1).to(weights.dtype)  # masked, not indexed: no host sync on a GPU
    ratio = entropy / size.log().clamp_min(1e-12)
    return (ratio * several).sum() / several.sum().clamp_min(1.0)


class TowerPool(nn.Module):
    """Inside every ViT tower, after the first `depth` of the blocks it runs, merge the patches of each
    image to M (prefix tokens such as CLS and registers pass through): the later blocks, the projector
    and the LLM run on M of the N patches. How (`merger`):

    - "pool": average windows of neighbouring patches (`PoolMerger`'s windows);
    - "learned_window": weight each window by the instruction (a `GroupScores` per tower, each
      tower's width in `dims`, the instruction `text_dim` wide), starting as the average;
    - "tome": ToMe's bipartite matching decides which patches merge (`ToMeMerger`; each merged token
      is its patches' mean);
    - "learned_tome": ToMe's sets, weighted within each set by the instruction (a `GroupScores` per
      tower), starting as "tome";
    - "learned_v2": the instruction-aware dense merger (`LearnableTokenMergerV2`, keys from the
      first tower's patches), starting as the window average; each merged token a weighted mean.

    "tome", "learned_tome" and "learned_v2" decide from the first tower's patches and every tower
    merges the same sets, so fused features stay aligned patch for patch (as the fixed windows do). No proportional attention
    (ToMe's log-size bias) in the blocks after it.

        (B, P + N, D) -> (B, P + M, D) at block `block(num_blocks)`"""

    def __init__(
        self,
        grid: int,
        ratio: float,
        depth: float,
        merger: str = "pool",
        dims: Optional[list[int]] = None,
        text_dim: int = 0,
        hidden_dim: int = 64,
    ):
        super().__init__()
        groups = patch_groups(1, grid, ratio)
        order, self.window = window_order(groups)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("windows", slot_sources(groups), persistent=False)  # (1, N, M)
        self.depth, self.kind = depth, merger
        self.num_out = len(order) // self.window  # M per image
        self.tome = ToMeMerger(self.num_out) if merger in ("tome", "learned_tome") else None
        self.scores = None  # learned_window / learned_tome: one GroupScores per tower
        if merger in ("learned_window", "learned_tome"):
            self.scores = nn.ModuleList(GroupScores(dim, text_dim, hidden_dim) for dim in dims)
        self.dense = (
            LearnableTokenMergerV2(dims[0], groups, hidden_dim, text_dim=text_dim) if merger == "learned_v2" else None
        )
        self.sparsity: list[torch.Tensor] = []  # learned: each tower's merge sparsity in the last forward
        self.weights: Optional[torch.Tensor] = None  # decided merges: the last forward's (n_img * B, M, N)

    @property
    def sources(self) -> torch.Tensor:
        """Which merged tokens each patch went into: the windows' (1, N, M) one-hot, or (n_img * B, N, M)
        from the last forward's matching (one-hot) or dense weights (soft)."""
        return self.windows if self.weights is None else stand_ins(self.weights)

    def instruction(self, text: torch.Tensor, text_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """What `forward` reads of the instruction: its mean token (B, D_text) when learned, else None."""
        return mean_instruction(text, text_mask) if self.kind in LEARNED_MERGERS else None

    def block(self, num_blocks: int) -> int:
        """Index of the block after which a tower running `num_blocks` blocks pools (>= 1 block unpooled)."""
        return min(num_blocks, max(1, round(self.depth * num_blocks))) - 1

    def forward(
        self, tokens: torch.Tensor, prefix: int, tower: int = 0, text: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """tokens (n_img * B, P + N, D), text (B, D_text) the mean instruction (learned only)."""
        if self.kind in LEARNED_MERGERS:
            if text is None:
                raise ValueError(f"a {self.kind} TowerPool needs the instruction (text)")
            text = text.repeat(tokens.shape[0] // text.shape[0], 1)  # cameras are stacked on the batch axis
        if self.kind in ("tome", "learned_tome", "learned_v2"):
            patches = tokens[:, prefix:]
            if tower == 0:
                self.weights = self._decide(patches, text)
            weights = self.weights
            if self.kind == "learned_tome":  # the same sets, each tower's own weights within them
                weights = self.scores[tower].within_sets(patches, self.weights, text)
                self.sparsity.append(set_sparsity(weights, self.weights))
            return torch.cat([tokens[:, :prefix], weights.to(tokens.dtype) @ patches], dim=1)
        windows = tokens[:, prefix:][:, self.order].unflatten(1, (-1, self.window))  # (n_img * B, M, k, D)
        if self.scores is None:
            merged = windows.mean(dim=2)
        else:
            weights = self.scores[tower](windows, text)  # (n_img * B, M, k, 1)
            self.sparsity.append(normalised_entropy(weights.squeeze(-1)))
            merged = (weights * windows).sum(dim=2)
        return torch.cat([tokens[:, :prefix], merged], dim=1)

    def _decide(self, patches: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor:
        """The first tower's patches (n_img * B, N, D) -> merge weights (n_img * B, M, N), rows summing to 1."""
        if self.tome is not None:  # each merged token: the mean of the patches ToMe put in it
            members = self.tome(patches, None, None)[1].detach().transpose(1, 2)  # (n_img * B, M, N)
            return members / members.sum(dim=2, keepdim=True)
        weights = self.dense.mix(patches, text)
        self.sparsity.append(normalised_entropy(weights))
        return weights


class LearnableTokenMerger(nn.Module):
    """Each of M outputs is a softmax-weighted average of the N input tokens:

        w_m = softmax_n(prior_mn + q_m . k(x_n) / sqrt(d)),    out_m = sum_n w_mn x_n

    `prior` starts at the window grouping (0 inside a window, -`spread` outside) and the slot
    queries `q` at zero, so the untrained merger equals the `pool` baseline; training moves both.
    Outputs stay in the input space (a weighted average of its tokens)."""

    def __init__(self, dim: int, groups: torch.Tensor, hidden_dim: int = 64, spread: float = 8.0):
        super().__init__()
        inside = F.one_hot(groups, int(groups.max()) + 1).T.float()  # (M, N)
        self.prior = nn.Parameter((inside - 1.0) * spread)
        self.queries = nn.Parameter(torch.zeros(inside.shape[0], hidden_dim))
        self.key = nn.Linear(dim, hidden_dim)
        self.scale = hidden_dim**-0.5

    def slot_queries(self, instruction: Optional[torch.Tensor], batch: int) -> torch.Tensor:  # -> (B, M, h)
        return self.queries.expand(batch, -1, -1)

    def mix(self, vision: torch.Tensor, instruction: Optional[torch.Tensor]) -> torch.Tensor:
        """vision (B, N, D), the mean instruction token (B, D_text) -> the merge weights w (B, M, N)."""
        queries = self.slot_queries(instruction, vision.shape[0])
        logits = self.prior + torch.einsum("bmh,bnh->bmn", queries, self.key(vision)) * self.scale
        return logits.softmax(dim=-1)

    def forward(self, vision, text, text_mask):  # (B, N, D), (B, T, D), (B, T) -> (B, M, D), (B, N, M), stats
        weights = self.mix(vision, mean_instruction(text, text_mask) if text is not None else None)
        return weights @ vision, stand_ins(weights), {"merge_sparsity": normalised_entropy(weights)}


def stand_ins(weights: torch.Tensor) -> torch.Tensor:
    """Soft merge weights (B, M, N) -> sources (B, N, M): each input's stand-in is the merged tokens in
    proportion to how much of it each one took."""
    return weights.transpose(1, 2) / weights.sum(dim=1).unsqueeze(-1).clamp_min(1e-12)


class LearnableTokenMergerV2(LearnableTokenMerger):
    """Instruction-aware: the slot queries are shifted by a projection of the pooled instruction
    (`text_dim` wide, default `dim`; zero-initialised, so it too starts as the `pool` baseline)."""

    def __init__(self, dim: int, groups: torch.Tensor, hidden_dim: int = 64, spread: float = 8.0, text_dim: int = 0):
        super().__init__(dim, groups, hidden_dim, spread)
        self.text_to_slots = nn.Linear(text_dim or dim, self.queries.numel())
        nn.init.zeros_(self.text_to_slots.weight)
        nn.init.zeros_(self.text_to_slots.bias)

    def slot_queries(self, instruction, batch):
        return self.queries + self.text_to_slots(instruction).view(-1, *self.queries.shape)


class WindowScoreMerger(nn.Module):
    """Score once, merge locally: each output averages its own window of patches (`pool`'s windows),
    weighted by `GroupScores` (a softmax over the window of one instruction-aware score per patch).
    Scoring is O(N h) and merging O(N D), the cost of `pool` plus one small projection, where the dense
    merger's (M, N) slot-by-patch weights grow with N^2; it starts as `pool`."""

    def __init__(self, dim: int, groups: torch.Tensor, hidden_dim: int = 64):
        super().__init__()
        order, self.window = window_order(groups)
        self.register_buffer("order", order, persistent=False)  # window-major
        self.register_buffer("sources", slot_sources(groups), persistent=False)  # (1, N, M)
        self.scores = GroupScores(dim, dim, hidden_dim)

    def forward(self, vision, text, text_mask):  # (B, N, D), (B, T, D), (B, T) -> (B, M, D), (1, N, M), stats
        windows = vision[:, self.order].unflatten(1, (-1, self.window))  # (B, M, k, D)
        weights = self.scores(windows, mean_instruction(text, text_mask))  # (B, M, k, 1)
        merged = (weights * windows).sum(dim=2)
        return merged, self.sources, {"merge_sparsity": normalised_entropy(weights.squeeze(-1))}


class ToMeSetMerger(nn.Module):
    """ToMe decides, a score weighs: ToMe's bipartite matching picks which tokens merge (parameter-free,
    no gradient), and each merged token is a softmax-weighted average of its set by `GroupScores`
    (one instruction-aware score per token) instead of the plain mean. The scores start at zero, so
    the untrained merger is `ToMeMerger`. (B, N, D) -> (B, M, D); one-hot sources (ToMe's sets)."""

    def __init__(self, dim: int, num_out: int, hidden_dim: int = 64):
        super().__init__()
        self.tome = ToMeMerger(num_out)
        self.scores = GroupScores(dim, dim, hidden_dim)

    def forward(self, vision, text, text_mask):  # (B, N, D), (B, T, D), (B, T) -> (B, M, D), (B, N, M), stats
        sources = self.tome(vision.detach(), None, None)[1]  # (B, N, M) one-hot
        members = sources.transpose(1, 2)  # (B, M, N)
        weights = self.scores.within_sets(vision, members, mean_instruction(text, text_mask))
        return weights @ vision, sources, {"merge_sparsity": set_sparsity(weights, members)}


class ToMeMerger(nn.Module):
    """ToMe bipartite soft matching (Bolya et al. 2023), parameter-free, repeated until M tokens remain:
    tokens alternate into sets A and B; each A token's most similar B token (cosine) is its edge; the
    r most similar edges merge (size-weighted averages). (B, N, D) -> (B, M, D); every input token's
    merged token is tracked through the rounds (one-hot `sources`)."""

    def __init__(self, num_out: int):
        super().__init__()
        self.num_out = num_out

    def forward(self, vision, text, text_mask):
        x, size = vision, torch.ones(*vision.shape[:2], 1, dtype=vision.dtype, device=vision.device)  # (B, N, 1)
        where = torch.arange(vision.shape[1], device=vision.device).expand(vision.shape[0], -1)  # (B, N)
        while x.shape[1] > self.num_out:
            x, size, moved = self._merge_step(x, size, min(x.shape[1] - self.num_out, x.shape[1] // 2))
            where = moved.gather(1, where)
        return x, F.one_hot(where, x.shape[1]).to(x.dtype), {}

    @staticmethod
    def _merge_step(x, size, r):
        """Merge r tokens of A into B: (B, N, D) -> (B, N - r, D), sizes, and where each of the N went (B, N)."""
        a, b = x[:, ::2], x[:, 1::2]  # (B, Na, D), (B, Nb, D)
        sa, sb = size[:, ::2], size[:, 1::2]
        sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)  # (B, Na, Nb)
        best, target = sim.max(dim=-1)  # (B, Na)
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values  # (B, r), (B, Na - r)
        dim = x.shape[-1]
        dst = target.gather(1, merged)  # (B, r)
        take = lambda t, idx: t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
        sum_b = (b * sb).scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, dim), take(a * sa, merged))
        size_b = sb.scatter_add(1, dst.unsqueeze(-1), take(sa, merged))
        kept_count = kept.shape[1]
        moved = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)  # (B, N): new index of each token
        moved[:, 1::2] = kept_count + torch.arange(b.shape[1], device=x.device)  # B tokens follow the kept A
        new_a = torch.empty_like(target)
        new_a.scatter_(1, kept, torch.arange(kept_count, device=x.device).expand_as(kept).contiguous())
        new_a.scatter_(1, merged, kept_count + dst)
        moved[:, ::2] = new_a
        merged_x = torch.cat([take(a, kept), sum_b / size_b], dim=1)
        return merged_x, torch.cat([take(sa, kept), size_b], dim=1), moved
