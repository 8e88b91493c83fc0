"""The KV cache as vLLM 0.32 allocates and reports it (`vllm/v1/core/kv_cache_utils.py`).

- a layer's page is `block_size x kv_heads_per_rank x (head_dim_k + head_dim_v) x dtype bytes`; MLA stores
  one latent of `kv_lora_rank + qk_rope_head_dim` per token instead of K and V per head;
- layers are grouped (one group when all layers share a type; hybrid sliding/full models get groups of
  equal layer count), a block spans one page of every layer in the largest group, and
  `num_blocks = available_bytes // bytes_per_block`;
- a request at `max_model_len` needs `cdiv(L, block)` blocks per full-attention group and
  `cdiv(min(window - 1 + in_flight_tokens, L), block) + 1` per sliding-window group;
- vLLM logs `KV cache size: int(num_blocks / blocks_per_request * L) tokens`.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from tasks.register.shape import LayerKind, ModelShape

# Block sizes vLLM picks when --block-size is not given (vllm/platforms/cpu.py,
# CacheConfig.DEFAULT_BLOCK_SIZE,# FlashMLA's only kernel block size).
CPU_BLOCK_SIZE = 128
CPU_MLA_BLOCK_SIZE = 16
GPU_BLOCK_SIZE = 16
GPU_MLA_BLOCK_SIZE = 64


class KvLayout(BaseModel):
    """Per-rank KV cache geometry."""

    block_size: int
    kv_dtype_bytes: int
    kv_heads_per_rank: int
    per_layer_token_bytes: int = Field(description="One layer, one token, one rank.")
    page_bytes: int = Field(description="One layer's page: block_size tokens.")
    groups: list[LayerKind] = Field(description="KV cache groups; each holds layers_per_group layers.")
    layers_per_group: int
    bytes_per_block: int = Field(description="One block across every layer of the largest group.")
    token_bytes_rank: int = Field(description="All layers, one token, one rank.")


def kv_layout(s: ModelShape, *, kv_dtype_bytes: int, tp: int, block_size: int) -> KvLayout:
    if s.mla:
        kv_heads_rank = 1  # the latent is replicated on every rank
        per_layer = (s.mla.kv_lora_rank + s.mla.qk_rope_head_dim) * kv_dtype_bytes
    else:
        kv_heads_rank = max(1, s.num_kv_heads // tp)
        per_layer = kv_heads_rank * 2 * s.head_dim * kv_dtype_bytes
    page = block_size * per_layer
    counts: dict[LayerKind, int] = {}
    for k in s.layer_kinds:
        counts[k] = counts.get(k, 0) + 1
    if len(counts) == 1:
        kind = next(iter(counts))
        groups, size = [kind], s.num_layers
    else:
        # _get_kv_cache_groups_uniform_page_size: groups of equal layer count, the last one padded.
        size = min(counts.values())
        if max(counts.values()) < size * 1.5:
            size = max(counts.values())
        groups = [kind for kind, n in counts.items() for _ in range(math.ceil(n / size))]
    return KvLayout(
        block_size=block_size,
        kv_dtype_bytes=kv_dtype_bytes,
        kv_heads_per_rank=kv_heads_rank,
        per_layer_token_bytes=per_layer,
        page_bytes=page,
        groups=groups,
        layers_per_group=size,
        bytes_per_block=size * page,
        token_bytes_rank=s.num_layers * per_layer,
    )


def blocks_per_request(
    layout: KvLayout, max_model_len: int, sliding_window: int | None, in_flight_tokens: int
) -> int:
    """Blocks one request at max_model_len takes from the shared pool, summed over groups."""
    total = 0
    for kind in layout.groups:
        if kind == "full":
            total += math.ceil(max_model_len / layout.block_size)
        else:
            assert sliding_window is not None
            tokens = min(sliding_window - 1 + in_flight_tokens, max_model_len)
            total += math.ceil(tokens / layout.block_size) + 1
    return total


class KvCapacity(BaseModel):
    num_blocks: int
    blocks_per_request: int
    max_concurrency: float
    tokens: int = Field(description="vLLM's 'KV cache size: N tokens'.")


def kv_capacity(
    layout: KvLayout, available_bytes: int, max_model_len: int, blocks_per_req: int
) -> KvCapacity:
    """get_kv_cache_config_from_groups + get_kv_cache_capacity, with vLLM's own float arithmetic."""
    num_blocks = max(0, available_bytes // layout.bytes_per_block)
    conc = num_blocks / blocks_per_req
    return KvCapacity(
        num_blocks=num_blocks,
        blocks_per_request=blocks_per_req,
        max_concurrency=conc,
        tokens=int(conc * max_model_len),
    )


def kv_fits(layout: KvLayout, available_bytes: int, blocks_per_req: int, concurrency: int) -> bool:
    """vLLM refuses to start unless one request fits beside the reserved null block; we need `concurrency`."""
    return available_bytes - layout.bytes_per_block >= layout.bytes_per_block * blocks_per_req * concurrency
