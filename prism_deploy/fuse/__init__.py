"""Plugin fusion: gated pipes of an exported graph -> ``prism::tile_dispatch`` nodes, and the
ONNX Runtime twin of that op (``prism_deploy.fuse.tile_dispatch_twin``)."""

from prism_deploy.fuse.gated_pipes import (
    DOMAIN,
    FUSION_KEY,
    OP_TYPE,
    export_fused,
    fuse_gated_pipes,
    fuse_onnx_file,
    is_fused,
    lowering_metadata,
)

__all__ = [
    "DOMAIN",
    "FUSION_KEY",
    "OP_TYPE",
    "export_fused",
    "fuse_gated_pipes",
    "fuse_onnx_file",
    "is_fused",
    "lowering_metadata",
]
