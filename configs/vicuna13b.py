"""CLAMP with a Vicuna-13B v1.5 text tower and a locked ViT-L/14 image tower at 336 px.

The reference recipe's setting. Fill the LLM folder once, on a machine with internet:

    hf download lmsys/vicuna-13b-v1.5 --include '*.json' '*.safetensors' '*.model' \\
        --local-dir ~/models/vicuna-13b-v1.5

If the download has only `.bin` files, convert them to safetensors first; pickle files are not
loaded. Plan and train as in configs/llama7b.py:

    python -m clamp_jax.main --config=configs/vicuna13b.py --workdir=/tmp/plan13b \\
        --config.mode=plan --config.plan.devices=64 --config.plan.device_memory_gib=32
"""

from clamp_jax.config_pod import pod_config

# Vicuna-13B v1.5 (a Llama-2-13B fine-tune) as in its config.json.
VICUNA_13B = dict(
    vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
    num_attention_heads=40, num_key_value_heads=40, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def get_config():
  return pod_config('~/models/vicuna-13b-v1.5', VICUNA_13B, image_size=336)
