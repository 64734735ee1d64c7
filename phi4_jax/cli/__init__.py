"""Command-line entry points; each module has a `main(argv=None) -> int`.

- `train`: `python train.py` (the repository-root script calls it; also `python -m phi4_jax.cli.train`).
- `convert`: `python convert_weights.py` (also `python -m phi4_jax.cli.convert`).
- `chat`: `python -m phi4_jax.chat`.
- `plan`: `python -m phi4_jax.plan`.
- `serve`: `python -m phi4_jax.serve` (the OpenAI-compatible server).
- `pts`: `python -m phi4_jax.pts` (Pivotal Token Search).
- `decontaminate`: `python -m phi4_jax.decontaminate`.
- `tokenize`: `python -m phi4_jax.data.tokenize` (pre-tokenized ArrayRecord shards).

These parse arguments, call the library, and turn its errors into one-line messages and exit codes.
May import anything in `phi4_jax`.
"""
