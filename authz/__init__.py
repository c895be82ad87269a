"""authz: the Envoy ext_authz decision service on Casbin RBAC policies."""
