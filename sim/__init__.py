"""GPU-cluster LLM-serving simulator at operator granularity (no Gymnasium or torch here)."""
