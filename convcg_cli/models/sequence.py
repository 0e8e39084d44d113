"""A small Transformer over the user's recent engaged items (TransAct-style), pooled to one vector.

Input is what ``convcg_cli.data.features.history.history_before`` produces: (B, L) item codes (corpus position
+ 1, 0 = padding) and (B, L) action codes (0 = padding), most recent first and right-padded.
"""

import torch
from torch import nn


class HistoryEncoder(nn.Module):
    """Item + action + position embeddings -> Transformer encoder -> [masked mean | most recent].

    Padding is read from ``items == 0``; padded positions are masked as attention keys and left out of
    the pooling, so their content cannot change the output. A row with no history at all returns zeros
    (with finite gradients): attention over zero keys would be NaN, so such rows attend to their first
    (padding) slot and the result is zeroed afterwards.

    Args:
        num_items: item vocabulary size including the padding code 0 (= number of corpus items + 1).
        num_actions: action vocabulary size including padding (see ``history.NUM_ACTIONS``).
        dim: model width of the embeddings and the Transformer.
        num_layers, num_heads: Transformer depth and attention heads (``dim % num_heads == 0``).
        max_len: longest sequence accepted (size of the learned position embedding).
        dropout: dropout inside the Transformer layers.
        ff_dim: feed-forward width of each layer; ``4 * dim`` when not given.

    Attributes:
        out_dim: ``2 * dim``: the masked mean of the outputs, then the most recent item's output.

    Example:
        >>> enc = HistoryEncoder(num_items=10, dim=8, max_len=4)
        >>> items = torch.tensor([[3, 1, 0, 0], [0, 0, 0, 0]])
        >>> enc(items, torch.tensor([[1, 3, 0, 0], [0, 0, 0, 0]])).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        num_items: int,
        num_actions: int = 4,
        dim: int = 32,
        num_layers: int = 1,
        num_heads: int = 2,
        max_len: int = 20,
        dropout: float = 0.0,
        ff_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items, dim, padding_idx=0)
        self.action_embedding = nn.Embedding(num_actions, dim, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim,
            num_heads,
            dim_feedforward=ff_dim or 4 * dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Pre-norm layers leave the residual stream unnormalised: close with a LayerNorm. Nested
        # tensors are off: they do not apply to norm_first layers and would only warn.
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.out_dim = 2 * dim

    def forward(self, items: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Map items (B, L) int64 and actions (B, L) int64 -> (B, 2 * dim)."""
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"History length {length} exceeds HistoryEncoder max_len={self.max_len}.")
        padding = items == 0  # (B, L)
        actions = actions.masked_fill(padding, 0)  # padded slots carry nothing but position
        positions = torch.arange(length, device=items.device)
        x = self.item_embedding(items) + self.action_embedding(actions) + self.position_embedding(positions)
        empty = padding.all(dim=1)  # (B,) rows without history
        # Give empty rows one visible key so attention stays finite; their output is zeroed below.
        key_padding = padding.clone()
        key_padding[:, 0] &= ~empty
        h = self.encoder(x, src_key_padding_mask=key_padding)  # (B, L, dim)

        keep = (~padding).unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        mean = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # (B, dim); 0 for empty rows
        latest = h[:, 0] * keep[:, 0]  # most recent first, so slot 0; 0 for empty rows
        return torch.cat([mean, latest], dim=-1)
