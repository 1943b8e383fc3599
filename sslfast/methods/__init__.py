"""The SSL methods as thin wrappers over sslfast's fused ops:

    views = method.augment(images)        # all views, per-sample parameters
    loss = method(views)
    loss.backward()
    method.before_optimizer_step()        # DINO: last-layer freeze (no-op elsewhere)
    optimizer.step()
    method.step_end(step, max_steps)      # EMA teacher with a cosine momentum
"""

from sslfast.methods.base import Method, infer_feature_dim
from sslfast.methods.byol import BYOL
from sslfast.methods.dino import DINO
from sslfast.methods.mocov2 import MoCoV2
from sslfast.methods.mocov3 import MoCoV3
from sslfast.methods.simclr import SimCLR
from sslfast.methods.simsiam import SimSiam

METHODS = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "byol": BYOL,
    "simsiam": SimSiam,
    "dino": DINO,
}

__all__ = ["BYOL", "DINO", "METHODS", "Method", "MoCoV2", "MoCoV3", "SimCLR", "SimSiam",
           "infer_feature_dim"]
