"""The two-tower model: cross networks, towers, heads, history encoder, losses, LightningModule."""
