"""emo-vision: visual emotion recognition with ResNet stage features.

Stage one (:mod:`emo.extract`) caches the pooled outputs of a frozen ResNet's five stages;
stage two (:mod:`emo.heads`) trains branch heads and their weighted stacking from that cache.
"""

__version__ = "0.1.0"
