"""The conv net of the experiment: four stride-2 3x3 convs, global mean pool, two dense layers."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_CHANNELS = (32, 64, 128, 256)
DEFAULT_DENSE = 128
NUM_CLASSES = 10


class ConvNet(nn.Module):
    """Takes uint8 (or float in [0, 255]) images (batch, H, W, 3); returns float32 logits (batch, classes).

    `dtype` is the compute dtype; parameters stay float32 whatever it is.
    """
    channels: Sequence[int] = DEFAULT_CHANNELS
    dense: int = DEFAULT_DENSE
    num_classes: int = NUM_CLASSES
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        # Images live on the devices as uint8; scaling here lets XLA fuse it into the first conv.
        x = images.astype(self.dtype) * (1.0 / 255.0)  # (batch, H, W, 3)
        for width in self.channels:
            x = nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype)(x)
            x = nn.gelu(x)
        x = jnp.mean(x, axis=(1, 2))  # (batch, channels[-1])
        x = nn.gelu(nn.Dense(self.dense, dtype=self.dtype)(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return logits.astype(jnp.float32)  # (batch, classes)


def param_count(params) -> int:
    return sum(p.size for p in jax.tree_util.tree_leaves(params))
