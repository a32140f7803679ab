"""Decoupled cross-attention for the E-Adapter, as a diffusers attention processor.

For a cross-attention layer with query Q (from the image latents) the output before `to_out` is

    softmax(Q K_text^T / sqrt(d)) V_text
      + id_scale   * softmax(Q K_id^T   / sqrt(d)) V_id      (if the layer carries the id branch)
      + expr_scale * softmax(Q K_expr^T / sqrt(d)) V_expr    (if it carries the expression branch)

with K_text/V_text from the layer's own (frozen) to_k/to_v and K_id/V_id, K_expr/V_expr from new
Linear layers that exist only for the branches the layer carries. Following IP-Adapter
(diffusers' `IPAdapterAttnProcessor2_0`) the condition tokens arrive concatenated after the text
tokens in `encoder_hidden_states`:

    encoder_hidden_states: (B, T + N + M, C) = [text (T) | id (N) | expr (M)]

so every cross-attention layer of an adapted UNet must use this processor (a layer carrying no
branch just drops the N + M condition tokens). Self-attention layers keep `AttnProcessor2_0`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


class EmojiDiffAttnProcessor(nn.Module):
    """Text + identity + expression cross-attention with SDPA.

    Args:
        hidden_size: the layer's inner dim (output channels of to_k/to_v, = heads * head_dim).
        cross_attention_dim: channels C of the tokens in `encoder_hidden_states`.
        num_id_tokens / num_expr_tokens: N and M, the counts at the end of the sequence.
        has_id / has_expr: whether this layer carries the branch (and owns its K/V Linear layers).
        id_scale / expr_scale: branch weights; a branch with scale 0 is skipped entirely, so the
            layer then computes exactly what `AttnProcessor2_0` computes on the text tokens.
        bias: whether the new K/V layers have a bias (match the layer's to_k; False in SD).
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        num_id_tokens: int,
        num_expr_tokens: int,
        has_id: bool,
        has_expr: bool,
        id_scale: float = 1.0,
        expr_scale: float = 1.0,
        bias: bool = False,
    ):
        super().__init__()
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError(f"{type(self).__name__} requires PyTorch >= 2.0")
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_id_tokens = num_id_tokens
        self.num_expr_tokens = num_expr_tokens
        self.has_id = has_id
        self.has_expr = has_expr
        self.id_scale = id_scale
        self.expr_scale = expr_scale
        if has_id:
            self.to_k_id = nn.Linear(cross_attention_dim, hidden_size, bias=bias)
            self.to_v_id = nn.Linear(cross_attention_dim, hidden_size, bias=bias)
        if has_expr:
            self.to_k_expr = nn.Linear(cross_attention_dim, hidden_size, bias=bias)
            self.to_v_expr = nn.Linear(cross_attention_dim, hidden_size, bias=bias)
        #: When a list, each call of an identity layer appends {"query": (B, L, hidden) image
        #: queries, "id_keys": (B, N, hidden) identity keys} (ICA's contrast alignment reads them).
        self.recorder: list[dict[str, torch.Tensor]] | None = None

    @torch.no_grad()
    def init_from(self, attn: Attention) -> EmojiDiffAttnProcessor:
        """Copy the layer's to_k/to_v weights into the new K/V layers (IP-Adapter's initialisation)."""
        pairs = []
        if self.has_id:
            pairs += [(self.to_k_id, attn.to_k), (self.to_v_id, attn.to_v)]
        if self.has_expr:
            pairs += [(self.to_k_expr, attn.to_k), (self.to_v_expr, attn.to_v)]
        for new, old in pairs:
            if new.weight.shape != old.weight.shape:
                raise ValueError(
                    f"K/V shape {tuple(new.weight.shape)} does not match the layer's {tuple(old.weight.shape)}"
                )
            new.weight.copy_(old.weight)
            if new.bias is not None:
                new.bias.copy_(old.bias if old.bias is not None else torch.zeros_like(new.bias))
        return self

    @property
    def num_condition_tokens(self) -> int:
        return self.num_id_tokens + self.num_expr_tokens

    def split(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T + N + M, C) -> text (B, T, C), id (B, N, C), expr (B, M, C)."""
        n, m = self.num_id_tokens, self.num_expr_tokens
        total = encoder_hidden_states.shape[1]
        if total <= n + m:
            raise ValueError(
                f"encoder_hidden_states has {total} tokens but an E-Adapter layer expects [text | {n} id | {m} expr]"
                " tokens; build them with EAdapter.build_encoder_hidden_states"
            )
        t = total - n - m
        return (
            encoder_hidden_states[:, :t],
            encoder_hidden_states[:, t : t + n],
            encoder_hidden_states[:, t + n :],
        )

    @staticmethod
    def _branch(
        attn: Attention,
        query: torch.Tensor,
        tokens: torch.Tensor,
        to_k: nn.Linear,
        to_v: nn.Linear,
        head_dim: int,
    ) -> torch.Tensor:
        """query (B, heads, L, d), tokens (B, K, C) -> (B, L, heads * d) in the query's dtype."""
        b = query.shape[0]
        tokens = tokens.to(to_k.weight.dtype)
        key = to_k(tokens).to(query.dtype).view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = to_v(tokens).to(query.dtype).view(b, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states (B, L, hidden) or (B, hidden, H, W); encoder_hidden_states (B, T+N+M, C)."""
        residual = hidden_states
        id_states = expr_states = None
        if encoder_hidden_states is not None:
            encoder_hidden_states, id_states, expr_states = self.split(encoder_hidden_states)

        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            if attention_mask.shape[-1] == sequence_length + self.num_condition_tokens:
                attention_mask = attention_mask[..., :sequence_length]  # the mask covers the text tokens only
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if self.recorder is not None and self.has_id and id_states is not None and id_states.shape[1] > 0:
            self.recorder.append(
                {"query": query, "id_keys": self.to_k_id(id_states.to(self.to_k_id.weight.dtype))}
            )

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # (B, heads, L, d)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if self.has_id and self.id_scale != 0 and id_states is not None and id_states.shape[1] > 0:
            hidden_states = hidden_states + self.id_scale * self._branch(
                attn, query, id_states, self.to_k_id, self.to_v_id, head_dim
            )
        if self.has_expr and self.expr_scale != 0 and expr_states is not None and expr_states.shape[1] > 0:
            hidden_states = hidden_states + self.expr_scale * self._branch(
                attn, query, expr_states, self.to_k_expr, self.to_v_expr, head_dim
            )

        # linear proj, dropout
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, cross_attention_dim={self.cross_attention_dim}, "
            f"id={self.has_id}({self.num_id_tokens}, scale={self.id_scale}), "
            f"expr={self.has_expr}({self.num_expr_tokens}, scale={self.expr_scale})"
        )
