# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""FAPrompt's learnable text side: compound abnormality prompts (CAP), the abnormality prior (DAP), deep prompts.

The normal prompt is ``"N N N N N object."`` whose five ``N`` embeddings are learned context tokens shared with
every abnormal prompt. Each of the ten abnormal prompts is ``"N N N N N A A damaged object."``: the shared
context, two tokens of its own and the fixed words. The data-dependent prior is an MLP over ten normalised patch
tokens of the query image; its output is added to every abnormal token, so the abnormal prompts are re-encoded
per image while the normal prompt is not.

The text encoder runs the frozen CLIP text transformer with deep prompts (MaPLe / AnomalyCLIP style): in text
layers ``1 .. depth - 1`` the token positions ``1 .. length`` of every prompt are replaced by that layer's
learned tokens, rounded to float16 as in the official code. The causal mask makes every output up to the
end-of-text token independent of the tokens after it, so prompts are encoded only up to their end-of-text token.

Example:
    >>> from anomalib_uas.models.components.clip import load_clip
    >>> from anomalib_uas.models.faprompt.prompt_learner import CompoundPromptLearner, encode_prompts
    >>> clip = load_clip("uas-tiny-ViT-L-14-336", force_quick_gelu=True)
    >>> learner = CompoundPromptLearner(clip.token_embedding, feature_dim=32)
    >>> encode_prompts(clip, learner.normal_prompt(), learner.normal_eot, learner.deep_prompts).shape
    torch.Size([1, 32])

Paper:
    Jiawen Zhu, Yew-Soon Ong, Chunhua Shen, Guansong Pang, "Fine-grained Abnormality Prompt Learning for
    Zero-shot Anomaly Detection", ICCV 2025.
"""

from __future__ import annotations

from collections import OrderedDict

import open_clip
import torch
import torch.nn.functional as F  # noqa: N812
from open_clip.transformer import QuickGELU
from torch import nn

__all__ = ["CompoundPromptLearner", "encode_prompts", "linear", "mlp", "multi_head_attention"]

PLACEHOLDER_NORMAL = "N"
PLACEHOLDER_ABNORMAL = "A"
QUICK_GELU_SCALE = 1.702
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _use_onednn(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN
        and not torch.is_grad_enabled()
        and inputs.device.type == "cpu"
        and inputs.dtype == weight.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, run through oneDNN for float32 CPU inference.

    oneDNN uses the CPU's widest vector units on every vendor, where the default BLAS may not; the result is the
    same matrix product up to float32 rounding. Training, tracing and other devices or dtypes use ``F.linear``.

    Args:
        inputs: ``[..., C_in]``.
        weight: ``[C_out, C_in]``.
        bias: ``[C_out]`` or ``None``.

    Returns:
        ``[..., C_out]``.
    """
    if _use_onednn(inputs, weight):
        return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), weight, bias, "none", [], "")
    return F.linear(inputs, weight, bias)


def mlp(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The MLP of an open_clip residual block (``c_fc``, activation, ``c_proj``) through :func:`linear`.

    On the oneDNN path QuickGELU is fused into ``c_fc`` as ``swish(1.702 y) / 1.702`` (the scale moves into the
    input and bias of ``c_fc`` and the output of ``c_proj``), which saves three passes over the hidden tokens.

    Args:
        block: The residual block.
        tokens: ``[..., C]`` (already layer-normalised).

    Returns:
        ``[..., C]``.
    """
    layers = block.mlp
    c_fc, c_proj = layers.c_fc, layers.c_proj
    if isinstance(layers.gelu, QuickGELU) and _use_onednn(tokens, c_fc.weight):
        fused = torch.ops.mkldnn._linear_pointwise
        scaled = fused(
            (tokens * QUICK_GELU_SCALE).contiguous(), c_fc.weight, c_fc.bias * QUICK_GELU_SCALE, "swish", [], ""
        )
        return fused(scaled, c_proj.weight, None, "none", [], "") / QUICK_GELU_SCALE + c_proj.bias
    return linear(layers.gelu(linear(tokens, c_fc.weight, c_fc.bias)), c_proj.weight, c_proj.bias)


def multi_head_attention(
    attention: nn.MultiheadAttention,
    tokens: torch.Tensor,
    causal: bool = False,
) -> torch.Tensor:
    """Self-attention of an ``nn.MultiheadAttention`` on batch-first tokens, through fused SDPA.

    Args:
        attention: The attention module (only its weights are used).
        tokens: ``[B, N, C]``.
        causal: Apply the causal mask of CLIP's text transformer.

    Returns:
        ``[B, N, C]``.
    """
    batch, length, width = tokens.shape
    heads = attention.num_heads
    qkv = linear(tokens, attention.in_proj_weight, attention.in_proj_bias)
    query, key, value = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=causal)
    out = out.transpose(1, 2).reshape(batch, length, width)
    return linear(out, attention.out_proj.weight, attention.out_proj.bias)


def encode_prompts(
    clip: nn.Module,
    prompts: torch.Tensor,
    eot_index: int,
    deep_prompts: nn.ParameterList | list[torch.Tensor],
) -> torch.Tensor:
    """Encode prompt embeddings with CLIP's text transformer and deep prompts.

    Args:
        clip: An open_clip ``CLIP`` model (its text tower is used, frozen).
        prompts: Token embeddings ``[P, L, D]``; at least ``eot_index + 1`` tokens long, longer ones are cut.
        eot_index: Position of the end-of-text token, the same for every prompt.
        deep_prompts: Learned tokens ``[n, D]`` for text layers ``1 .. len(deep_prompts)``; they replace the
            token positions ``1 .. n``.

    Returns:
        Text features ``[P, E]`` (``ln_final`` at the end-of-text token, times the text projection), not
        normalised.
    """
    length = eot_index + 1
    tokens = prompts[:, :length] + clip.positional_embedding[:length].to(prompts.dtype)
    count = tokens.shape[0]
    for layer, block in enumerate(clip.transformer.resblocks):
        if 1 <= layer <= len(deep_prompts):
            deep = deep_prompts[layer - 1]
            deep = deep.half().to(tokens.dtype).unsqueeze(0).expand(count, -1, -1)
            tokens = torch.cat([tokens[:, :1], deep, tokens[:, 1 + deep.shape[1] :]], dim=1)
        tokens = tokens + block.ls_1(multi_head_attention(block.attn, block.ln_1(tokens), causal=True))
        tokens = tokens + block.ls_2(mlp(block, block.ln_2(tokens)))
    features = clip.ln_final(tokens[:, eot_index])
    projection = clip.text_projection
    return projection(features) if isinstance(projection, nn.Module) else features @ projection


class CompoundPromptLearner(nn.Module):
    """Compound abnormality prompts, deep text prompts and the data-dependent abnormality prior.

    Parameter and buffer names follow the official ``prompt_learner`` so that official checkpoints map one to
    one (shapes without the official leading class dimensions).

    Args:
        token_embedding: CLIP's token embedding; it fills the frozen prefix/suffix buffers.
        feature_dim: Dimension of CLIP's joint embedding (the patch features fed to the prior).
        normal_tokens: Learned context tokens shared by all prompts (E = 5).
        abnormal_prompts: Number of abnormal prompts (K = 10).
        abnormal_tokens: Learned tokens of each abnormal prompt (E' = 2).
        deep_depth: Text layers with deep prompts plus one (9: layers 1 to 8).
        deep_length: Tokens of each deep prompt (4).
        prior_tokens: Patch tokens the prior MLP reads (M = 10).
        class_name: Object word of the prompts.
        abnormal_word: Fixed word of the abnormal prompts.
    """

    def __init__(
        self,
        token_embedding: nn.Embedding,
        feature_dim: int,
        normal_tokens: int = 5,
        abnormal_prompts: int = 10,
        abnormal_tokens: int = 2,
        deep_depth: int = 9,
        deep_length: int = 4,
        prior_tokens: int = 10,
        class_name: str = "object",
        abnormal_word: str = "damaged",
    ) -> None:
        super().__init__()
        if deep_length > normal_tokens:
            msg = f"deep_length ({deep_length}) must not exceed normal_tokens ({normal_tokens})."
            raise ValueError(msg)
        width = token_embedding.embedding_dim
        self.normal_tokens = normal_tokens
        self.abnormal_prompts = abnormal_prompts
        self.abnormal_tokens = abnormal_tokens
        self.prior_tokens = prior_tokens

        self.ctx_pos = nn.Parameter(torch.empty(normal_tokens, width))
        self.ctx_neg = nn.Parameter(torch.empty(abnormal_prompts, abnormal_tokens, width))
        self.compound_prompts_text = nn.ParameterList(
            nn.Parameter(torch.empty(deep_length, width)) for _ in range(deep_depth - 1)
        )
        for parameter in (self.ctx_pos, self.ctx_neg, *self.compound_prompts_text):
            nn.init.normal_(parameter, std=0.02)
        hidden = feature_dim * prior_tokens // 16
        self.patch_meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(feature_dim * prior_tokens, hidden)),
                    ("relu", nn.ReLU()),
                    ("linear2", nn.Linear(hidden, width)),
                ]
            )
        )

        context = " ".join([PLACEHOLDER_NORMAL] * normal_tokens)
        own = " ".join([PLACEHOLDER_ABNORMAL] * abnormal_tokens)
        token_ids = open_clip.tokenize([f"{context} {class_name}.", f"{context} {own} {abnormal_word} {class_name}."])
        self.token_ids = token_ids
        self.normal_eot = int(token_ids[0].argmax())
        self.abnormal_eot = int(token_ids[1].argmax())
        with torch.no_grad():
            embedded = token_embedding(token_ids.to(token_embedding.weight.device)).float()
        normal, abnormal = embedded[0], embedded[1].expand(abnormal_prompts, -1, -1)
        self.register_buffer("token_prefix_pos", normal[:1].clone())
        self.register_buffer("token_suffix_pos", normal[1 + normal_tokens :].clone())
        self.register_buffer("token_prefix_neg", abnormal[:, :1].clone())
        self.register_buffer("token_suffix_neg", abnormal[:, 1 + normal_tokens + abnormal_tokens :].clone())

    @property
    def deep_prompts(self) -> nn.ParameterList:
        """Deep text prompts of text layers ``1 .. deep_depth - 1``.

        Returns:
            The parameter list.
        """
        return self.compound_prompts_text

    def normal_prompt(self) -> torch.Tensor:
        """Embeddings of the normal prompt.

        Returns:
            ``[1, L, D]``.
        """
        return torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos]).unsqueeze(0)

    def abnormal_prompt_embeddings(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of the abnormal prompts, optionally shifted by per-image priors.

        Args:
            bias: Prior ``[B, D]`` added to every abnormal token, or ``None`` for the static prompts.

        Returns:
            ``[K, L, D]`` without a prior, ``[B * K, L, D]`` with one (image-major).
        """
        own = self.ctx_neg if bias is None else self.ctx_neg.unsqueeze(0) + bias[:, None, None, :]
        own = own.reshape(-1, self.abnormal_tokens, own.shape[-1])
        repeats = own.shape[0] // self.abnormal_prompts
        context = self.ctx_pos.unsqueeze(0).expand(own.shape[0], -1, -1)
        prefix = self.token_prefix_neg.repeat(repeats, 1, 1)
        suffix = self.token_suffix_neg.repeat(repeats, 1, 1)
        return torch.cat([prefix, context, own, suffix], dim=1)

    def prior(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """The data-dependent abnormality prior.

        Args:
            patch_tokens: The selected normalised patch features ``[B, M, E]``.

        Returns:
            The prior ``[B, D]`` added to the abnormal tokens.
        """
        return self.patch_meta_net(patch_tokens.flatten(1))
