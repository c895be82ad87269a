"""The sidecar agent: fetch and renew SVIDs, serve them to Envoy over SDS."""
