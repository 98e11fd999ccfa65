"""The reference routed forward: pure PyTorch over Hugging Face Llama / Qwen2 weights.

This is the oracle the vLLM plugin is proven against. It computes every block for every token
and then keeps the block's output only for routed-in tokens, so a skipped token's hidden state
passes through bit-exactly (or gains the artifact's skip update, ``routing.skip_update``) while
its K/V at that block still come from the hidden state it carries in (KV consistency).
Sequences are flattened back to back, as vLLM lays them out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ftp_vllm.routing.factors import attention_scores
from ftp_vllm.routing.layout import TokenLayout
from ftp_vllm.routing.router import DenseRouter, RouterInputs, TokenRouter
from ftp_vllm.routing.skip_update import SkipUpdate

GateFn = Callable[[RouterInputs], Tensor]


@dataclass
class RoutedOutput:
    logits: Tensor  # [T, V], or [len(logits_at), V]
    keep: Tensor  # [L, T_routed] bool: block decisions for the routed (prompt) tokens
    layout: TokenLayout  # layout of the routed tokens


@dataclass
class GenerationResult:
    tokens: list[int]  # generated token ids
    keep: Tensor  # [L, n_prompt] bool: the prompt's routing decisions
    prompt_logits: Tensor  # [n_prompt, V] logits of the routed prefill

    @property
    def sparsity(self) -> float:
        return token_sparsity(self.keep)


def token_sparsity(keep: Tensor) -> float:
    """Fraction of (prompt token, block) pairs skipped."""
    return 1.0 - keep.float().mean().item()


def _block_targets(block_sparsity: Tensor | None, num_seqs: int, num_layers: int) -> Tensor:
    if block_sparsity is None:
        return torch.zeros(num_seqs, num_layers, dtype=torch.float64)
    bs = torch.as_tensor(block_sparsity, dtype=torch.float64)
    if bs.ndim == 1:
        bs = bs.expand(num_seqs, -1)
    if bs.shape != (num_seqs, num_layers):
        raise ValueError(f"block sparsity {tuple(bs.shape)} != ({num_seqs}, {num_layers}) or [L]")
    return bs


def routed_forward(
    model: torch.nn.Module,
    input_ids: Tensor,
    lengths: Sequence[int] | None = None,
    router: TokenRouter | None = None,
    block_sparsity: Tensor | None = None,
    routed_lengths: Sequence[int] | None = None,
    gate: GateFn | None = None,
    logits_at: Tensor | None = None,
    window: int | None = None,
    skip_update: SkipUpdate | None = None,
) -> RoutedOutput:
    """Forward of flattened sequences with per-token, per-block skip decisions.

    lengths: tokens of each sequence ([T] if omitted). routed_lengths: how many leading tokens
    of each sequence are the prompt and get routed (the rest, e.g. generated tokens, run
    dense); defaults to all. block_sparsity: [L] or [R, L] per-block targets. gate: training
    only; soft gates g in [0, 1] per routed token replace the hard decision, h + g * delta.
    logits_at: flattened indices of the tokens whose logits are wanted (default: all); the
    LM head is a fifth of this model's work, so scoring a few positions saves much.
    window: ``window`` routing (docs/ROUTER.md): decisions within aligned windows of this many
    prompt tokens; None: ``exact`` routing over each whole prompt. skip_update: what a skipped
    token's hidden state gains at each block (None: nothing).
    """
    inner = model.model
    cfg = model.config
    input_ids = input_ids.reshape(-1)
    num_tokens = input_ids.numel()
    lengths = list(lengths) if lengths is not None else [num_tokens]
    full = TokenLayout.from_lengths(lengths, device=input_ids.device)
    routed_lengths = list(routed_lengths) if routed_lengths is not None else lengths
    if any(r > n or r < 1 for r, n in zip(routed_lengths, lengths, strict=True)):
        raise ValueError(f"routed lengths {routed_lengths} must lie in [1, {lengths}]")
    if window:
        layout = TokenLayout.windows(routed_lengths, window, device=input_ids.device)
    else:
        layout = TokenLayout.from_lengths(routed_lengths, device=input_ids.device)
    limit = torch.as_tensor(routed_lengths, device=input_ids.device)[full.seq_ids]
    routed_idx = (full.positions < limit).nonzero().squeeze(1)
    router = router or DenseRouter()
    targets = _block_targets(block_sparsity, full.num_seqs, cfg.num_hidden_layers)
    targets = targets.to(input_ids.device)

    h = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(h[None], full.positions[None])
    same_seq = full.seq_ids[:, None] == full.seq_ids[None, :]
    causal = full.positions[None, :] <= full.positions[:, None]
    attn_mask = same_seq & causal
    keeps = []
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        head_dim = attn.head_dim
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(num_tokens, -1, head_dim)
        k = attn.k_proj(x).view(num_tokens, -1, head_dim)
        v = attn.v_proj(x).view(num_tokens, -1, head_dim)
        q, k = _rotate(q, k, cos, sin)
        inputs = RouterInputs(
            layer=i,
            layout=layout,
            block_sparsity=targets[full.seq_ids[routed_idx], i],
            scores=attention_scores(q[routed_idx], k[routed_idx], layout, attn.scaling)
            if (router.needs_scores or gate is not None)
            else None,
        )
        groups = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.repeat_interleave(groups, dim=1).transpose(0, 1)[None],
            v.repeat_interleave(groups, dim=1).transpose(0, 1)[None],
            attn_mask=attn_mask,
            scale=attn.scaling,
        )
        h_attn = h + attn.o_proj(o[0].transpose(0, 1).reshape(num_tokens, -1))
        h_out = h_attn + layer.mlp(layer.post_attention_layernorm(h_attn))
        h_skip = h if skip_update is None else h + skip_update.delta(i, x)
        if gate is not None:
            g = torch.ones(num_tokens, dtype=h.dtype, device=h.device)
            g = g.index_put((routed_idx,), gate(inputs).to(h.dtype))
            keeps.append(g[routed_idx].detach() > 0.5)
            h = h_skip + g[:, None] * (h_out - h_skip)
        else:
            keep = router.keep(inputs)
            keeps.append(keep)
            keep_all = torch.ones(num_tokens, dtype=torch.bool, device=h.device)
            keep_all[routed_idx] = keep
            h = torch.where(keep_all[:, None], h_out, h_skip)
    if logits_at is not None:
        h = h[logits_at]
    logits = model.lm_head(inner.norm(h))
    return RoutedOutput(logits=logits, keep=torch.stack(keeps), layout=layout)


def _rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding as transformers applies it ([T, H, D] in and out)."""
    cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, D]

    def rot(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    router: TokenRouter | None = None,
    schedule_blocks: Tensor | None = None,
    eos_token_id: int | None = None,
    window: int | None = None,
    skip_update: SkipUpdate | None = None,
) -> GenerationResult:
    """Greedy decoding without a KV cache: every step recomputes the whole sequence.

    Prompt tokens are routed (their decisions depend on the prompt alone, so they are the same
    at every step); generated tokens run dense. The vLLM plugin, which decodes through its paged
    cache, must produce the same tokens.
    """
    prompt_ids = prompt_ids.reshape(-1)
    n_prompt = prompt_ids.numel()
    ids = prompt_ids
    generated: list[int] = []
    first: RoutedOutput | None = None
    for _ in range(max_new_tokens):
        out = routed_forward(
            model, ids, [ids.numel()], router, schedule_blocks, routed_lengths=[n_prompt],
            window=window, skip_update=skip_update,
        )
        first = first or out
        nxt = int(out.logits[-1].argmax())
        generated.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        ids = torch.cat([ids, ids.new_tensor([nxt])])
    if first is None:
        first = routed_forward(model, ids, [n_prompt], router, schedule_blocks, window=window,
                               skip_update=skip_update)
    return GenerationResult(
        tokens=generated, keep=first.keep, prompt_logits=first.logits[:n_prompt]
    )
