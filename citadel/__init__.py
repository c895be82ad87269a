"""citadel: the identity and authorization plane of a Kubernetes service mesh."""

from citadel.spiffe import SpiffeId, TrustDomain

__all__ = ["SpiffeId", "TrustDomain", "__version__"]
__version__ = "0.1.0"
