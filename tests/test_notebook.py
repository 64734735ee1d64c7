"""The Colab notebook cannot rot: it is generated from examples/colab_quickstart.py, which runs here on a tiny model.

The script goes through the notebook's whole path (convert a Hugging Face checkpoint with `hf_to_checkpoint`,
`load_model`, `chat` with streaming, multi-turn, batched `generate` with sampling) on a tiny random
Phi3ForCausalLM with phi-4's vocabulary; the notebook must equal what `examples/build_notebook.py` builds from it.
"""

import json
import os
import subprocess
import sys

from hf_models import make_tiny_phi3_model, save_phi3_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _builder():
    sys.path.insert(0, EXAMPLES)
    try:
        import build_notebook
    finally:
        sys.path.remove(EXAMPLES)
    return build_notebook


def test_notebook_is_built_from_the_script():
    builder = _builder()
    with open(builder.SCRIPT) as f:
        expected = builder.build_notebook(f.read())
    with open(builder.NOTEBOOK) as f:
        notebook = json.load(f)
    assert notebook == expected, "examples/phi4_jax_colab.ipynb is stale: run python examples/build_notebook.py"
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert any("".join(c["source"]).startswith("PHI4_JAX_REPO") and "!pip install" in "".join(c["source"])
               for c in code)
    assert any("chat_reply(model, tokenizer" in "".join(c["source"]) for c in code)


def test_notebook_script_runs_on_a_tiny_model(tmp_path):
    hf = make_tiny_phi3_model(seed=9, hidden=32, heads=4, kv_heads=2, layers=1, intermediate=64, vocab=100352)
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = 100257, 100265, 100349
    hf_dir = save_phi3_dir(hf, tmp_path / "hf", fmt="safetensors")
    env = {**os.environ, "PHI4_HF_DIR": str(hf_dir), "PHI4_CKPT_DIR": str(tmp_path / "ckpt"),
           "PHI4_DTYPE": "float32", "PHI4_MAX_NEW_TOKENS": "6", "JAX_PLATFORMS": "cpu", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "colab_quickstart.py")], cwd=tmp_path, env=env,
                          capture_output=True, timeout=400)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr[-3000:]
    assert os.path.exists(tmp_path / "ckpt" / "config.json")
    assert "parameters in float32" in stdout
    assert "Write a haiku about JAX. ->" in stdout and "Name three prime numbers. ->" in stdout
