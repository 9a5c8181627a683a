"""Ray Serve graphs: one file per deployment, one typed builder per graph.

Only the model tiers are deployments (they must scale, fail and be swapped on their own);
auth, validation and routing are Ray-free classes composed in the ingress, and the
cascade decision one composed in the cheap tier (escalate.py: each request is one call
from the ingress, which is the graph's busiest process).
"""
