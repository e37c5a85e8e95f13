"""Training and evaluation input: digits, web-scale image-text sources and caption tokenization.

`clamp_jax.data.train_data.make_train_dataset` builds the training dataset from the config.
"""

from clamp_jax.data.quality import DataQualityError

__all__ = ['DataQualityError']
