"""`build-llm bench`: speed and memory beside the baselines, measured side by side in one run."""
