# %% [markdown]
# # Phi-4 in JAX: convert, load and chat (Colab quick start)
#
# This notebook installs `phi4_jax`, converts Microsoft's Phi-4 (14B) checkpoint from Hugging Face into this
# project's Orbax checkpoint, loads it in bfloat16 and chats with it in the phi-4 chat format.
#
# **Runtime:** a GPU runtime with at least 40 GB of GPU memory (A100 80GB or H100: bf16 weights are 29.3 GB,
# a 16K-token KV cache 3.4 GB) and about 90 GB of disk (download + converted copy).
# Smaller runtimes can point `PHI4_HF_DIR` at a smaller Phi3ForCausalLM checkpoint.
#
# This notebook is generated from `examples/colab_quickstart.py` by `python examples/build_notebook.py`;
# a test runs that script on a tiny model, so the code below stays working.

# %% [markdown]
# ## 1. Install
# Set `PHI4_JAX_REPO` to the git URL of this repository (your fork or clone).

# %%
PHI4_JAX_REPO = "https://github.com/<owner>/phi4_jax"  # <- edit
# !pip install -q "phi4_jax[gpu,torch] @ git+{PHI4_JAX_REPO}"

# %% [markdown]
# ## 2. Settings
# `PHI4_HF_DIR`: a local Hugging Face checkpoint directory; empty = download `microsoft/phi-4`.

# %%
import os

HF_DIR = os.environ.get("PHI4_HF_DIR", "")
CKPT_DIR = os.environ.get("PHI4_CKPT_DIR", "/content/phi4_jax_ckpt")
DTYPE = os.environ.get("PHI4_DTYPE", "bfloat16")
MAX_NEW_TOKENS = int(os.environ.get("PHI4_MAX_NEW_TOKENS", "256"))
SYSTEM = "You are a helpful assistant. Answer briefly."

# %% [markdown]
# ## 3. Download and convert (once)
# The converter streams tensor by tensor, so it needs little memory beyond one tensor.

# %%
from phi4_jax.checkpoint.hf_convert import hf_to_checkpoint

if not HF_DIR:
    from huggingface_hub import snapshot_download

    HF_DIR = snapshot_download("microsoft/phi-4", allow_patterns=["*.json", "*.safetensors"])
if not os.path.exists(os.path.join(CKPT_DIR, "config.json")):
    hf_to_checkpoint(HF_DIR, CKPT_DIR, dtype=DTYPE)
print("checkpoint:", CKPT_DIR)

# %% [markdown]
# ## 4. Load the model and the tokenizer

# %%
import jax

import phi4_jax
from phi4_jax.inference.chat_session import chat_reply

model = phi4_jax.load_model(CKPT_DIR, dtype=DTYPE)
tokenizer = phi4_jax.Tokenizer()
n_params = sum(x.size for x in jax.tree.leaves(model.params))
print(f"{n_params / 1e9:.2f}B parameters in {DTYPE} on {jax.devices()[0].device_kind}")

# %% [markdown]
# ## 5. Chat (tokens stream as they are generated)

# %%
messages = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of France? One sentence."}]
reply = chat_reply(model, tokenizer, messages, max_new_tokens=MAX_NEW_TOKENS,
             on_text=lambda piece: print(piece, end="", flush=True))
print()

# %%
messages += [{"role": "assistant", "content": reply},
             {"role": "user", "content": "And of Italy?"}]
reply = chat_reply(model, tokenizer, messages, max_new_tokens=MAX_NEW_TOKENS,
             on_text=lambda piece: print(piece, end="", flush=True))
print()

# %% [markdown]
# ## 6. Token-level API: a batch of prompts, with sampling
# `phi4_jax.generate` takes token-id prompts of different lengths and returns each one's new tokens
# (ending with a stop token, `<|im_end|>` or `<|endoftext|>`, when one is generated).

# %%
questions = ["Write a haiku about JAX.", "Name three prime numbers."]
prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
outputs = phi4_jax.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, top_p=0.95, seed=0)
for question, new_tokens in zip(questions, outputs):
    print(question, "->", tokenizer.decode([t for t in new_tokens if t not in tokenizer.stop_ids]))

# %% [markdown]
# ## 7. In a terminal
# The same model in an interactive chat (like `llama-cli -cnv -c 16384 -p "<system prompt>"`):
#
# ```
# python -m phi4_jax.chat --checkpoint /content/phi4_jax_ckpt --system "You are a helpful assistant."
# ```
