from __future__ import annotations

import base64
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from citadel.agent.keys import KeyType, build_csr, expected_spiffe_id, generate_key
from citadel.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("cluster.local")


def _jwt(claims: object) -> str:
    def enc(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'RS256', 'kid': 'k'})}.{enc(claims)}.c2ln"


@pytest.mark.parametrize(
    ("key_type", "cls", "size"),
    [
        (KeyType.EC_P256, ec.EllipticCurvePrivateKey, 256),
        (KeyType.EC_P384, ec.EllipticCurvePrivateKey, 384),
        (KeyType.RSA_2048, rsa.RSAPrivateKey, 2048),
    ],
)
def test_key_types_and_csr_with_one_uri_san(key_type, cls, size):
    key = generate_key(key_type)
    assert isinstance(key, cls) and key.key_size == size
    sid = SpiffeId("spiffe://cluster.local/ns/default/sa/web")
    csr = x509.load_pem_x509_csr(build_csr(key=key, spiffe_id=sid))
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(sid)]
    assert len(list(san)) == 1


def test_csr_without_hint_has_no_san():
    csr = x509.load_pem_x509_csr(build_csr(key=generate_key(KeyType.EC_P256), spiffe_id=None))
    assert len(csr.extensions) == 0


K8S = {"namespace": "shop", "serviceaccount": {"name": "cart", "uid": "u"}}


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        pytest.param(
            _jwt({"sub": "system:serviceaccount:shop:cart", "kubernetes.io": K8S}),
            "spiffe://cluster.local/ns/shop/sa/cart",
            id="projected-token",
        ),
        pytest.param(
            _jwt({"sub": "system:serviceaccount:shop:cart"}),
            "spiffe://cluster.local/ns/shop/sa/cart",
            id="sub-only",
        ),
        pytest.param(
            _jwt({"kubernetes.io": K8S}),
            "spiffe://cluster.local/ns/shop/sa/cart",
            id="k8s-claim-only",
        ),
        pytest.param(
            _jwt({"sub": "system:serviceaccount:other:cart", "kubernetes.io": K8S}),
            None,
            id="sub-contradicts-k8s-claim",
        ),
        pytest.param(_jwt({"sub": "alice"}), None, id="not-a-service-account"),
        pytest.param(_jwt({"sub": "system:serviceaccount:a:b:c"}), None, id="too-many-parts"),
        pytest.param(_jwt({"sub": "system:serviceaccount:bad/ns:x"}), None, id="bad-segment"),
        pytest.param(_jwt(["not", "an", "object"]), None, id="payload-not-object"),
        pytest.param("opaque-token-not-a-jwt", None, id="not-a-jwt"),
        pytest.param("a.!!!.c", None, id="payload-not-base64"),
    ],
)
def test_expected_id_from_unverified_claims(token, expected):
    got = expected_spiffe_id(token, TD)
    assert (str(got) if got else None) == expected
