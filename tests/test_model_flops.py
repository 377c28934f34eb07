"""FLOPs per block per token against a hand computation."""

from pipeline.config import ModelConfig
from pipeline.flops import block_flops, decode_flops, head_flops, linear_flops_per_token, prefill_flops_per_token, span_flops

TINY = {"model_type": "mistral", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 12, "vocab_size": 10, "sliding_window": 3}


def test_hand_computed():
    cfg = ModelConfig.from_dict(TINY)
    # head_dim 4: q 8→8, k 8→4, v 8→4, o 8→8, gate/up 8→12, down 12→8
    linear = 2 * 8 * 8 + 2 * 8 * 4 + 2 * 8 * 4 + 2 * 8 * 8 + 3 * (2 * 8 * 12)  # = 960
    assert linear == 960 and linear_flops_per_token(cfg) == 960
    # attention per context position: 2 heads × head_dim 4 × (2 for qk + 2 for av) = 32
    assert decode_flops(cfg, 0) == 960 + 32 * 1
    assert decode_flops(cfg, 1) == 960 + 32 * 2
    assert decode_flops(cfg, 2) == 960 + 32 * 3
    assert decode_flops(cfg, 10) == 960 + 32 * 3  # sliding window of 3 caps the context
    # prefill of 5 from empty: contexts 1, 2, 3, 3, 3
    assert block_flops(cfg, 5) == 5 * 960 + 32 * (1 + 2 + 3 + 3 + 3)
    assert prefill_flops_per_token(cfg, 5) == block_flops(cfg, 5) / 5
    # prefill continuing at position 1 (contexts 2, 3, 3) = sum of decodes
    assert block_flops(cfg, 3, past_tokens=1) == sum(decode_flops(cfg, p) for p in (1, 2, 3))
    assert span_flops(cfg, 0, 2, 1, 4) == 2 * decode_flops(cfg, 4)
    assert head_flops(cfg, 3) == 3 * 2 * 8 * 10


def test_no_window_matches_sum_of_decodes():
    cfg = ModelConfig.from_dict({**TINY, "model_type": "llama"})
    assert cfg.sliding_windows == (None, None)
    for past, n in [(0, 1), (0, 7), (5, 9), (100, 3)]:
        assert block_flops(cfg, n, past) == sum(decode_flops(cfg, p) for p in range(past, past + n))


def test_smollm2_scale():
    cfg = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
                                 "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                                 "vocab_size": 49152, "tie_word_embeddings": True})
    # ≈ 2 × params per block (3.54 M params) per token
    params = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536
    assert linear_flops_per_token(cfg) == 2 * params
