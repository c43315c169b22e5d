"""The HTTP routes, one APIRouter per concern: images (/sample, /generate, /interpolate), v2 (the Open
Inference Protocol), ops (/models, health, metrics) and page (the demo page). Shared lookups: service/dispatch.py."""
