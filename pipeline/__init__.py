"""Models and inference: serve transformer blocks, route prompts through peers, generate."""
