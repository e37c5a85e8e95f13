"""CLAMP with a Llama-2-7B text tower and a locked ViT-L/14 image tower at 224 px, for pods.

Fill the LLM folder once, on a machine with internet, then copy it to every host (or to a shared
disk) at the same path:

    hf download meta-llama/Llama-2-7b-hf --include '*.json' '*.safetensors' '*.model' \\
        --local-dir ~/models/Llama-2-7b-hf

Plan the memory before renting the pod (no weights needed; compiles for simulated devices):

    python -m clamp_jax.main --config=configs/llama7b.py --workdir=/tmp/plan7b \\
        --config.mode=plan --config.plan.devices=32 --config.plan.device_memory_gib=32

Train (the same command on every host of a TPU pod or every task of a SLURM job):

    python -m clamp_jax.main --config=configs/llama7b.py --workdir=gs://BUCKET/clamp7b
"""

from clamp_jax.config_pod import pod_config

# Llama-2-7B as in its config.json; plan mode uses this when the folder is not on this machine.
LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def get_config():
  return pod_config('~/models/Llama-2-7b-hf', LLAMA2_7B, image_size=224)
