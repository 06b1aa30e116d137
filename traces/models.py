"""Model presets: the real dimensions of well-known MoE checkpoints, so a converted or synthetic trace
carries correct `expert_bytes` and `dense_bytes` without the weights at hand.

Parameter counts are computed from each model's published `config.json` dimensions (not typed in as
totals), and the totals are checked in the tests against the sizes the model cards state.

Bytes per parameter of the *expert* weights by dtype:
- `bf16`: 2.
- `fp8`: 1 (per-channel scales ignored: < 0.1 %).
- `int4`: 4 bits plus one bf16 scale per group of 128 weights (GPTQ/AWQ/HQQ-style), 4.125 bits.
- `mxfp4` (GPT-OSS's own format): 4 bits plus one 8-bit scale per 32 weights, 4.25 bits.
Non-expert (dense) weights are counted in bf16 whatever the expert dtype, as offloading runtimes keep
them.
"""

from __future__ import annotations

from dataclasses import dataclass

from traces.schema import ModelSpec

BITS_PER_PARAM: dict[str, float] = {"bf16": 16.0, "fp16": 16.0, "fp8": 8.0, "int8": 8.0 + 16 / 128, "int4": 4.0 + 16 / 128, "mxfp4": 4.25}


@dataclass(frozen=True)
class Dims:
    """Just the config.json numbers that decide the weight sizes."""

    name: str
    arch: str
    num_layers: int
    first_dense: int  # leading decoder layers with a dense MLP instead of MoE
    num_experts: int
    top_k: int
    hidden: int
    moe_inter: int
    vocab: int
    attn_params_per_layer: int
    shared_expert_params_per_layer: int = 0
    num_shared_experts: int = 0
    dense_mlp_inter: int = 0
    expert_bias_params: int = 0  # GPT-OSS experts carry biases
    router_bias: bool = False
    tied_embeddings: bool = False
    stated_total_b: float = 0.0  # total parameters stated on the model card, in billions
    native_dtype: str = "bf16"

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.first_dense, self.num_layers))

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_inter + self.expert_bias_params

    @property
    def dense_params(self) -> int:
        n_moe = self.num_layers - self.first_dense
        router = n_moe * (self.hidden * self.num_experts + (self.num_experts if self.router_bias else 0))
        shared = n_moe * self.shared_expert_params_per_layer
        dense_mlp = self.first_dense * 3 * self.hidden * self.dense_mlp_inter
        attn = self.num_layers * self.attn_params_per_layer
        norms = (2 * self.num_layers + 1) * self.hidden
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return router + shared + dense_mlp + attn + norms + emb

    @property
    def total_params(self) -> int:
        return self.dense_params + (self.num_layers - self.first_dense) * self.num_experts * self.expert_params


def _gqa(hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool = False, o_bias: bool = False) -> int:
    q, kv = heads * head_dim, kv_heads * head_dim
    p = hidden * q + 2 * hidden * kv + q * hidden
    if qkv_bias:
        p += q + 2 * kv
    if o_bias:
        p += hidden
    return p


def _mla(hidden: int, heads: int, kv_lora: int, nope: int, rope: int, v_dim: int) -> int:
    """DeepSeek multi-head latent attention without q compression (V2-Lite)."""
    q = hidden * heads * (nope + rope)
    kv_a = hidden * (kv_lora + rope) + kv_lora
    kv_b = kv_lora * heads * (nope + v_dim)
    o = heads * v_dim * hidden
    return q + kv_a + kv_b + o


PRESETS: dict[str, Dims] = {
    d.name: d
    for d in [
        Dims("mixtral-8x7b", "mixtral", 32, 0, 8, 2, 4096, 14336, 32000, _gqa(4096, 32, 8, 128), stated_total_b=46.7),
        Dims(
            "qwen1.5-moe-a2.7b", "qwen2_moe", 24, 0, 60, 4, 2048, 1408, 151936, _gqa(2048, 16, 16, 128, qkv_bias=True),
            shared_expert_params_per_layer=3 * 2048 * 5632 + 2048, num_shared_experts=1, stated_total_b=14.3,
        ),
        Dims("olmoe-1b-7b", "olmoe", 16, 0, 64, 8, 2048, 1024, 50304, _gqa(2048, 16, 16, 128) + 2 * 2048, stated_total_b=6.9),
        Dims(
            "deepseek-v2-lite", "deepseek_v2", 27, 1, 64, 6, 2048, 1408, 102400, _mla(2048, 16, 512, 128, 64, 128),
            shared_expert_params_per_layer=2 * 3 * 2048 * 1408, num_shared_experts=2, dense_mlp_inter=10944, stated_total_b=15.7,
        ),
        Dims(
            "qwen3-30b-a3b", "qwen3_moe", 48, 0, 128, 8, 2048, 768, 151936, _gqa(2048, 32, 4, 128) + 2 * 128,
            stated_total_b=30.5,
        ),
        Dims(
            "gpt-oss-20b", "gpt_oss", 24, 0, 32, 4, 2880, 2880, 201088,
            _gqa(2880, 64, 8, 64, qkv_bias=True, o_bias=True) + 64, expert_bias_params=3 * 2880,
            router_bias=True, stated_total_b=20.9, native_dtype="mxfp4",
        ),
    ]
}


def expert_bytes(params: int, dtype: str) -> int:
    try:
        bits = BITS_PER_PARAM[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(BITS_PER_PARAM)}") from None
    return int(round(params * bits / 8))


def model_preset(name: str, dtype: str | None = None) -> ModelSpec:
    """The `ModelSpec` of a preset, with expert bytes for `dtype` (default: the model's own)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    d = PRESETS[key]
    dtype = dtype or d.native_dtype
    return ModelSpec(
        name=d.name,
        arch=d.arch,
        num_layers=d.num_layers,
        moe_layers=d.moe_layers,
        num_experts=d.num_experts,
        top_k=d.top_k,
        num_shared_experts=d.num_shared_experts,
        hidden_size=d.hidden,
        moe_intermediate_size=d.moe_inter,
        dtype=dtype,
        expert_bytes=expert_bytes(d.expert_params, dtype),
        dense_bytes=d.dense_params * 2,
    )
