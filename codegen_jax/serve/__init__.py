"""`codegen-jax serve`: an OpenAI-compatible completion server over the generation engine.

- `protocol`: request validation (pydantic) and OpenAI's response and error JSON;
- `worker`: the engine's thread, which owns the continuous-batching `Scheduler`;
- `app`: the FastAPI application (`/v1/completions` with streaming and fill-in-the-middle,
  `/v1/models`, `/infill`, `/health`).
"""
