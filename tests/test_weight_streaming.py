"""Loading a multi-file checkpoint straight into shards keeps host memory near one tensor.

A random Llama checkpoint of about 560 MB in three safetensors files is written in a separate
process, then loaded on 8 simulated CPU devices with FSDP over all of them. On CPU the loaded
shards live in host memory too, so the measure is the peak resident memory above the start and
above the loaded arrays themselves.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
# Fixed allowance for what loading allocates besides tensor buffers: the safetensors index and
# file handles, JAX's compiled placement programs and allocator slack.
MARGIN_BYTES = 96 * MIB

WRITE_CHECKPOINT = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    from safetensors.numpy import save_file
    folder = sys.argv[1]
    os.makedirs(folder, exist_ok=True)
    hidden, inner, layers, heads, vocab = 1024, 2816, 6, 8, 32000
    config = dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=vocab,
                  hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, rope_theta=10000.0)
    json.dump(config, open(os.path.join(folder, 'config.json'), 'w'))
    rng = np.random.default_rng(0)
    def tensor(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    files = {'model-00001-of-00003.safetensors': {'model.embed_tokens.weight': tensor(vocab, hidden)},
             'model-00002-of-00003.safetensors': {}, 'model-00003-of-00003.safetensors':
             {'lm_head.weight': tensor(vocab, hidden), 'model.norm.weight': np.ones(hidden, np.float32)}}
    for i in range(layers):
        part = files['model-00002-of-00003.safetensors' if i < 4 else 'model-00003-of-00003.safetensors']
        p = f'model.layers.{i}.'
        for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
            part[p + f'self_attn.{name}.weight'] = tensor(hidden, hidden)
        part[p + 'mlp.gate_proj.weight'] = tensor(inner, hidden)
        part[p + 'mlp.up_proj.weight'] = tensor(inner, hidden)
        part[p + 'mlp.down_proj.weight'] = tensor(hidden, inner)
        part[p + 'input_layernorm.weight'] = np.ones(hidden, np.float32)
        part[p + 'post_attention_layernorm.weight'] = np.ones(hidden, np.float32)
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, os.path.join(folder, name))
        weight_map.update({key: name for key in tensors})
    json.dump({'weight_map': weight_map}, open(os.path.join(folder, 'model.safetensors.index.json'), 'w'))
''')


@pytest.mark.slow
def test_sharded_loading_peak_host_memory(tmp_path):
  folder = str(tmp_path / 'checkpoint')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  subprocess.run([sys.executable, '-c', WRITE_CHECKPOINT, folder], check=True, timeout=600)
  files = sorted(name for name in os.listdir(folder) if name.endswith('.safetensors'))
  assert len(files) == 3
  checkpoint_bytes = sum(os.path.getsize(os.path.join(folder, name)) for name in files)
  assert checkpoint_bytes > 500 * MIB

  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tests', 'sharded', 'measure_loading.py'), folder, '8'],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  numbers = json.loads(result.stdout.strip().splitlines()[-1])
  print({key: (f'{value / MIB:.1f} MiB' if key.endswith('bytes') else value)
         for key, value in numbers.items()})
  # Every matrix is split over the 8 devices, so the devices together hold the model once.
  assert set(numbers['specs']) == {"P('fsdp', None)", "P(None, 'fsdp')", "P('fsdp',)"}
  assert numbers['device_bytes'] == numbers['model_bytes']
  assert numbers['largest_tensor_bytes'] == 32000 * 1024 * 4
  assert numbers['overhead_bytes'] < 2 * numbers['largest_tensor_bytes'] + MARGIN_BYTES
