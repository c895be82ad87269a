"""The certificate authority: Istio's CA protocol, SPIFFE X509-SVIDs."""
