"""The reweighting head: a small MLP from detached features to one weight per trajectory (or per assistant turn).

Weights are normalised per batch to mean 1, so the weighted inner loss stays on the scale of plain SFT and the
policy learning rate keeps its meaning. The last layer starts at zero: every score is 0, every weight is 1, and
BOOST starts exactly as plain SFT on the mix.

"Per batch" means the global batch under data parallelism: the head itself holds no collectives; ``BoostModule``
gathers every rank's features, runs the head (and ``observe``) on all of them on every rank, and keeps its own rows,
so the normalisation, the regulariser and the running feature statistics are those of one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boost_lightning.models.features import DEFAULT_FEATURES, validate_feature_names


class RunningNorm(nn.Module):
    """Standardise features with running mean/variance, updated explicitly by :meth:`update`.

    Unlike batch statistics, the transform of one trajectory does not depend on the rest of its batch, so the
    head's scores are invariant to how a batch is split.
    """

    def __init__(self, num_features: int, momentum: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("var", torch.ones(num_features))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold a batch of raw features into the running statistics."""
        if x.shape[1] == 0 or x.shape[0] == 0:
            return
        mean, var = x.mean(0), x.var(0, unbiased=False)
        if not bool(self.initialized):
            self.mean.copy_(mean)
            self.var.copy_(var)
            self.initialized.fill_(True)
        else:
            self.mean.lerp_(mean, self.momentum)
            self.var.lerp_(var, self.momentum)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / torch.sqrt(self.var + self.eps)


class WeightHead(nn.Module):
    """Lightweight reweighting head: detached per-trajectory features → one weight per trajectory (mean 1).

    Args:
        features: Features the head sees, any of ``hidden`` (pooled policy hidden state), ``loss`` (agent-token
            NLL), ``surprise`` (observation-token NLL), ``reward`` (trajectory return), ``source`` (1 for
            synthetic), ``length`` (log token count), ``turns`` (agent turns), ``position`` (a turn's index within its
            trajectory: worth adding with ``granularity: turn``; always 0 for whole trajectories), ``val_similarity``
            (cosine of the pooled state to the running centroid of the validation rows' pooled states, from the
            outer step's validation forward at no extra cost; 0 until the first outer step: rows whose agent turns
            look plausible but sit away from the real validation data in the policy's own feature space),
            ``excess_loss`` and ``reference_surprise`` (from a reference adapter that the module trains next to the
            policy on the agent and observation tokens of trusted rows only, the real rows of each inner batch and the
            validation batch: the unit's agent NLL under the policy minus under the reference, RHO-LOSS style, and
            the observation NLL under the reference, a model of the real dynamics;
            either one turns the reference on, at one extra forward of the inner batch and one forward and
            backward of the trusted rows per step). Default: every feature except ``position`` and
            ``val_similarity``; leave out both reference features for the cheaper head without a reference. At turn
            granularity each feature is the turn's (its NLL, the surprise of the reply it got, its pooled state, its
            agent tokens); return, source and turns are its trajectory's.
        hidden_size: Size of the policy's hidden state; filled in from the policy when left unset.
        hidden_projection: The pooled hidden state is first projected to this many dimensions.
        mlp_width: Width of the MLP's hidden layers.
        num_layers: Number of linear layers (≥ 1). The last one is zero-initialised.
        normalization: ``softmax`` (w = B·softmax(s/T)) or ``sigmoid`` (w = σ(s/T) / mean σ(s/T)).
        temperature: Softmax/sigmoid temperature T; larger is flatter.
        clip: If set, no weight exceeds this value (weights are clipped, then renormalised to mean 1).
        regularizer: ``none``, ``ess`` (penalise 1 − ESS/B) or ``entropy`` (penalise 1 − H(w/B)/log B): pulls
            the weights toward uniform, trading lower empirical risk for a larger effective sample size.
        regularizer_strength: Coefficient of the regulariser in the outer objective.
        reweight: ``all``: every row's weight is learned. ``synthetic``: real rows keep weight 1 and only the
            synthetic rows are reweighted (normalised to mean 1 among themselves). Real rows are always the rows best
            aligned with a real validation set, so under ``all`` a one-step lookahead tends to pile the mass onto the
            few real rows (a collapse of the effective sample size towards ``real_only``); ``synthetic`` leaves them
            at plain SFT's weight and spends the head on ranking the synthetic pool.
        min_ess: ESS floor, a fraction of the batch in (0, 1]: weights whose effective sample size falls below
            ``min_ess`` · B are mixed with uniform, w ← (1 − λ)w + λ, with the smallest λ that lifts the ESS to the
            floor (closed form, differentiable: :func:`ess_floor`). Applied after ``clip``, to the rows the head
            normalises (the synthetic rows only under ``reweight="synthetic"``). Unlike the ``ess`` regulariser,
            which pulls the head's parameters, it holds on every batch, including before the head has learned.
            ``None``: no floor.
        validation_momentum: With the ``val_similarity`` feature: the weight of each outer step's validation batch
            in the running centroid of the validation rows' pooled states (an exponential moving average, so the
            centroid follows the policy's features as they train; the first batch sets it).
        seed: Seed of the head's random initialisation (the same config gives the same head). ``None`` (default): the
            seed given to ``seed_everything`` (``--seed_everything`` on the command line), or 0 without one.
    """

    def __init__(
        self,
        features: Sequence[str] = DEFAULT_FEATURES,
        hidden_size: int | None = None,
        hidden_projection: int = 32,
        mlp_width: int = 64,
        num_layers: int = 2,
        normalization: str = "softmax",
        temperature: float = 1.0,
        clip: float | None = None,
        regularizer: str = "none",
        regularizer_strength: float = 0.0,
        reweight: str = "all",
        min_ess: float | None = None,
        validation_momentum: float = 0.1,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if normalization not in ("softmax", "sigmoid"):
            raise ValueError(f"normalization must be 'softmax' or 'sigmoid', got {normalization!r}")
        if regularizer not in ("none", "ess", "entropy"):
            raise ValueError(f"regularizer must be 'none', 'ess' or 'entropy', got {regularizer!r}")
        if reweight not in ("all", "synthetic"):
            raise ValueError(f"reweight must be 'all' or 'synthetic', got {reweight!r}")
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if clip is not None and clip <= 1.0:
            raise ValueError("clip must be > 1 (weights have mean 1)")
        if not 0 < validation_momentum <= 1:
            raise ValueError(f"validation_momentum must be in (0, 1], got {validation_momentum}")
        if min_ess is not None and not 0 < min_ess <= 1:
            raise ValueError(f"min_ess must be in (0, 1] (a fraction of the batch), got {min_ess}")
        self.features = validate_feature_names(features)
        self.scalar_names = tuple(n for n in self.features if n != "hidden")
        self.normalization, self.temperature, self.clip = normalization, temperature, clip
        self.regularizer, self.regularizer_strength = regularizer, regularizer_strength
        self.reweight, self.min_ess, self.validation_momentum = reweight, min_ess, validation_momentum
        self.hidden_projection, self.mlp_width, self.num_layers = hidden_projection, mlp_width, num_layers
        # Resolved now: the layers are built later (bind), when the global seed may have been set again.
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.hidden_size: int | None = None
        self.norm = RunningNorm(len(self.scalar_names))
        if hidden_size is not None or "hidden" not in self.features:
            self.bind(hidden_size or 0)

    @property
    def uses_hidden(self) -> bool:
        return "hidden" in self.features

    def bind(self, hidden_size: int) -> None:
        """Build the layers for a policy whose pooled hidden state has ``hidden_size`` dimensions."""
        if self.hidden_size is not None:
            if self.uses_hidden and hidden_size != self.hidden_size:
                raise ValueError(f"head was built for hidden size {self.hidden_size}, policy has {hidden_size}")
            return
        self.hidden_size = hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._build(hidden_size)

    def _build(self, hidden_size: int) -> None:
        if "val_similarity" in self.features:
            # A buffer: checkpointed with the head, restored with the other running statistics when a step is skipped.
            self.register_buffer("val_centroid", torch.zeros(hidden_size))
            self.register_buffer("val_seen", torch.zeros((), dtype=torch.bool))
        in_dim = len(self.scalar_names)
        if self.uses_hidden:
            # LayerNorm without affine: pooled states of different models live on very different scales.
            self.project = nn.Sequential(nn.LayerNorm(hidden_size, elementwise_affine=False),
                                         nn.Linear(hidden_size, self.hidden_projection))
            in_dim += self.hidden_projection
        layers: list[nn.Module] = []
        for _ in range(self.num_layers - 1):
            layers += [nn.Linear(in_dim, self.mlp_width), nn.GELU()]
            in_dim = self.mlp_width
        last = nn.Linear(in_dim, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def scores(self, scalars: Tensor, pooled: Tensor | None = None) -> Tensor:
        """Unnormalised scores [B] from scalar features [B, k] (raw) and the pooled hidden state [B, H]."""
        if self.hidden_size is None:
            raise RuntimeError("WeightHead.bind(hidden_size) must be called before use")
        parts = [self.norm(scalars)]
        if self.uses_hidden:
            if pooled is None:
                raise ValueError("this head uses the 'hidden' feature but no pooled state was given")
            parts.insert(0, self.project(pooled.float()))
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)

    def observe_validation(self, pooled: Tensor) -> None:
        """Fold an outer step's validation pooled states [V, H] into the running centroid (``val_similarity`` only)."""
        if "val_similarity" not in self.features or pooled.numel() == 0:
            return
        with torch.no_grad():
            mean = pooled.float().mean(0).to(self.val_centroid.device)
            rate = self.validation_momentum if bool(self.val_seen) else 1.0
            self.val_centroid.mul_(1 - rate).add_(rate * mean)
            self.val_seen.fill_(True)

    def validation_similarity(self, pooled: Tensor) -> Tensor:
        """[B] cosine of each pooled state [B, H] to the validation centroid; 0 before the first outer step (the
        centroid is then 0, and the cosine's norm floor makes it exactly 0)."""
        return torch.nn.functional.cosine_similarity(pooled.float(), self.val_centroid[None].to(pooled.device), dim=1)

    def log_unnormalized(self, scores: Tensor) -> Tensor:
        """[B] log of each row's weight before the batch normalisation: s/T (softmax) or log σ(s/T) (sigmoid)."""
        z = scores / self.temperature
        return z if self.normalization == "softmax" else torch.nn.functional.logsigmoid(z)

    def observe(self, scalars: Tensor) -> None:
        """Fold a training batch's raw scalar features into the running feature statistics (once per batch)."""
        self.norm.update(scalars)

    def normalize(self, scores: Tensor, synthetic: Tensor | None = None) -> Tensor:
        """Scores [B] → weights [B] with mean 1 (differentiable).

        ``synthetic`` ([B], 1 for synthetic rows) is required when ``reweight="synthetic"``: real rows then get
        weight 1 and the synthetic rows are normalised among themselves.
        """
        if self.reweight == "synthetic":
            if synthetic is None:
                raise ValueError("reweight='synthetic' needs the rows' is_synthetic flags")
            mask = synthetic.bool()
            if not mask.any():
                return torch.ones_like(scores)
            index = mask.nonzero(as_tuple=True)
            return torch.ones_like(scores).index_put(index, self._normalize(scores[mask]))
        return self._normalize(scores)

    def _normalize(self, scores: Tensor) -> Tensor:
        batch = scores.shape[0]
        z = scores / self.temperature
        if self.normalization == "softmax":
            weights = torch.softmax(z, dim=0) * batch
        else:
            sig = torch.sigmoid(z)
            weights = sig / sig.mean()
        if self.clip is not None:
            # Cap, then give the mass cut off to the uncapped rows in proportion; rescaling can lift another row over
            # the cap, so repeat (each round caps at least one more row; clip > 1 leaves some row uncapped).
            capped = torch.zeros_like(weights, dtype=torch.bool)
            while bool((weights > self.clip * (1 + 1e-6)).any()):
                capped |= weights > self.clip
                free = weights.masked_fill(capped, 0.0)
                scale = (batch - self.clip * capped.sum()) / free.sum()
                weights = torch.where(capped, torch.full_like(weights, self.clip), free * scale)
        if self.min_ess is not None:
            weights = ess_floor(weights, self.min_ess)
        return weights

    def forward(self, scalars: Tensor, pooled: Tensor | None = None, synthetic: Tensor | None = None) -> Tensor:
        """Weights [B] (mean 1) for one batch; ``synthetic`` as in :meth:`normalize`."""
        return self.normalize(self.scores(scalars, pooled), synthetic)

    def regularization(self, weights: Tensor) -> Tensor:
        """The ESS / entropy penalty of ``weights`` (0 when disabled)."""
        if self.regularizer == "none" or self.regularizer_strength == 0:
            return weights.new_zeros(())
        if self.regularizer == "ess":
            penalty = 1.0 - effective_sample_size(weights) / weights.shape[0]
        else:
            p = weights / weights.sum()
            entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
            penalty = 1.0 - entropy / torch.log(torch.tensor(float(max(weights.shape[0], 2))))
        return self.regularizer_strength * penalty


def ess_floor(weights: Tensor, fraction: float) -> Tensor:
    """``weights`` [B] (mean 1) mixed with uniform just enough that their Kish ESS is at least ``fraction`` · B.

    With mean 1, Σ((1 − λ)w + λ)² = (1 − λ)²(Σw² − B) + B, so ESS = B·fraction is reached at
    λ = 1 − √((B/fraction − B) / (Σw² − B)); weights already above the floor are returned as they are. λ is a
    function of the weights, so gradients flow through it.
    """
    batch = weights.shape[0]
    squares = weights.pow(2).sum()
    target = batch / fraction  # the largest Σw² the floor allows
    if batch < 2 or bool(squares <= target):
        return weights
    keep = torch.sqrt((target - batch) / (squares - batch))  # 1 − λ, in [0, 1)
    return keep * weights + (1 - keep)


def effective_sample_size(weights: Tensor) -> Tensor:
    """Kish effective sample size (Σw)² / Σw² (equals B for uniform weights)."""
    return weights.sum() ** 2 / (weights.pow(2).sum()).clamp(min=1e-12)


def weight_statistics(weights: Tensor, synthetic: Tensor) -> dict[str, Tensor]:
    """What TensorBoard shows of a batch's weights [N] (``synthetic``: [N] bool): ESS, its fraction of N, the largest
    weight, the mean weight per source and the synthetic share of the mass."""
    ess = effective_sample_size(weights)
    stats = {"weights/ess": ess, "weights/ess_fraction": ess / weights.shape[0], "weights/max": weights.max(),
             "weights/mass_synthetic": weights[synthetic].sum() / weights.sum().clamp(min=1e-12)}
    if (~synthetic).any():
        stats["weights/mean_real"] = weights[~synthetic].mean()
    if synthetic.any():
        stats["weights/mean_synthetic"] = weights[synthetic].mean()
    return stats
