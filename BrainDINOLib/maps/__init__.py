"""Maps of a volume's features, for looking at the representation: PCA colours, similarity to a point,
last-block attention and k-means clusters. Each is computed at patch resolution and upsampled once to the
input's voxel grid, so it is written with the input's exact geometry (`write_volume`)."""
from .attention import AttentionMap, LastBlockAttention, attention_map, last_block_attention
from .clusters import cluster_map
from .pca import PCAMap, pca_map
from .similarity import SimilarityIndex, similarity_map

__all__ = ["AttentionMap", "LastBlockAttention", "PCAMap", "SimilarityIndex", "attention_map", "cluster_map",
           "last_block_attention", "pca_map", "similarity_map"]
