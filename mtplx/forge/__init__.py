"""Train or refresh an MTP head by self-distillation from its frozen target (`mtplx forge`)."""

from .corpus import Corpus, load_corpus
from .forge import ForgeOptions, ForgeReport, forge

__all__ = ["forge", "ForgeOptions", "ForgeReport", "Corpus", "load_corpus"]
