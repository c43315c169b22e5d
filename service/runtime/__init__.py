"""The model runtime: sessions (session.py), the one batching primitive (batcher.py), where each batch of a
model runs and why (model.py), the worker's link to the inference process kept up (attach.py), and a
model's request queue for the event loop (model_queue.py)."""
