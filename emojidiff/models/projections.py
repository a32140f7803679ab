"""Condition projections: identity embedding -> N tokens, expression features -> M tokens.

Both end in a LayerNorm over the token channel C (= the UNet's cross_attention_dim), as in
IP-Adapter(-FaceID), so the new K/V layers see inputs on the scale of the text tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IdentityProjection(nn.Module):
    """IP-Adapter-FaceID's MLPProjModel: (B, D_id) -> (B, N, C).

    Linear(D, hidden) -> GELU -> Linear(hidden, N*C) -> reshape -> LayerNorm(C).
    `hidden` defaults to 2*D as in IP-Adapter-FaceID.
    """

    def __init__(
        self, id_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, hidden_dim: int | None = None
    ):
        super().__init__()
        hidden_dim = hidden_dim or 2 * id_embed_dim
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Sequential(
            nn.Linear(id_embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_tokens * cross_attention_dim),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """id_embeds (B, D_id) float (e.g. L2-normalised ArcFace) -> tokens (B, N, C)."""
        x = self.proj(id_embeds.to(self.norm.weight.dtype))
        return self.norm(x.reshape(-1, self.num_tokens, self.cross_attention_dim))


class IdentityFeatureProjection(nn.Module):
    """The identity encoder's spatial feature map as tokens: (B, L, F) -> (B, L, C).

    Each of the L positions (e.g. the 4x4 cells of the encoder's last feature map) is projected on
    its own (Linear, GELU, Linear) plus a learned position embedding, then LayerNorm(C): the
    identity branch sees where the encoder found what (hair outline, face shape), not only the
    pooled embedding (IP-Adapter-FaceID-Plus and UniPortrait pair the two).
    """

    def __init__(self, feature_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(
            nn.Linear(feature_dim, cross_attention_dim),
            nn.GELU(),
            nn.Linear(cross_attention_dim, cross_attention_dim),
        )
        self.position = nn.Parameter(torch.zeros(1, num_tokens, cross_attention_dim))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, F), L = num_tokens -> tokens (B, L, C)."""
        if features.ndim != 3 or features.shape[1] != self.num_tokens:
            raise ValueError(
                f"identity features must be (B, {self.num_tokens}, F), got {tuple(features.shape)}"
            )
        return self.norm(self.proj(features.to(self.norm.weight.dtype)) + self.position)


class _ResamplerLayer(nn.Module):
    """Pre-norm cross-attention of M latent queries over [features | latents], then a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        )

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, m, c = latents.shape
        q_in = self.norm_q(latents)
        kv_in = torch.cat([self.norm_x(x), q_in], dim=1)
        q = self.to_q(q_in).view(b, m, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(kv_in).view(b, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, m, c)
        latents = latents + self.to_out(out)
        return latents + self.ff(latents)


class ExpressionProjection(nn.Module):
    """Expression features (B, L, F) or pooled (B, F) -> (B, M, C).

    A small Perceiver resampler (as IP-Adapter-Plus, shallower): features are projected F -> C,
    M learned queries attend over them in `depth` layers, then Linear(C, C) + LayerNorm(C).
    With `depth=0` it is an MLP on the mean-pooled features (IP-Adapter's ImageProjModel).
    With `depth=-1` each of the L feature tokens is projected on its own (Linear, GELU, Linear,
    LayerNorm; L must equal M): a spatial feature grid keeps its layout, and every output token
    depends on its input from the first step (learned queries start input-independent).
    """

    def __init__(
        self, feature_dim: int, cross_attention_dim: int, num_tokens: int = 4, depth: int = 2, heads: int = 4
    ):
        super().__init__()
        if cross_attention_dim % heads:
            raise ValueError(f"cross_attention_dim {cross_attention_dim} is not divisible by heads {heads}")
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.depth = depth
        self.proj_in = nn.Linear(feature_dim, cross_attention_dim)
        if depth < -1:
            raise ValueError(f"depth must be >= -1, got {depth}")
        if depth > 0:
            self.latents = nn.Parameter(
                torch.randn(1, num_tokens, cross_attention_dim) * cross_attention_dim**-0.5
            )
            self.layers = nn.ModuleList(_ResamplerLayer(cross_attention_dim, heads) for _ in range(depth))
            self.proj_out = nn.Linear(cross_attention_dim, cross_attention_dim)
        elif depth == 0:
            self.proj_out = nn.Sequential(
                nn.GELU(), nn.Linear(cross_attention_dim, num_tokens * cross_attention_dim)
            )
        else:
            self.proj_out = nn.Sequential(nn.GELU(), nn.Linear(cross_attention_dim, cross_attention_dim))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, F) or (B, F) -> what follows the first Linear: (B, C) pooled for depth 0,
        else (B, L, C)."""
        if features.ndim == 2:
            features = features[:, None]
        x = self.proj_in(features.to(self.norm.weight.dtype))
        if self.depth == -1 and x.shape[1] != self.num_tokens:
            raise ValueError(
                f"per-token expression projection: {x.shape[1]} feature tokens, {self.num_tokens} expected"
            )
        return x.mean(dim=1) if self.depth == 0 else x

    def pre_norm(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, F) or (B, F) -> the tokens before the final LayerNorm, (B, M, C)."""
        x = self.inputs(features)
        if self.depth == -1:
            return self.proj_out(x)
        if self.depth == 0:
            return self.proj_out(x).reshape(-1, self.num_tokens, self.cross_attention_dim)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.proj_out(latents)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, F) or (B, F) -> tokens (B, M, C)."""
        return self.norm(self.pre_norm(features))
