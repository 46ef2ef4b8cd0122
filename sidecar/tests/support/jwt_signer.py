#!/usr/bin/env python3
"""An independent JWT signer for the sidecar's JWT tests (pyca/cryptography, i.e. OpenSSL).

Reads a JSON spec on stdin:
  {"keys":   [{"name": "rsa", "kty": "RSA" | "EC" | "OKP", "kid": "..."}, ...],
   "tokens": [{"key": "rsa", "header": {...}, "claims": {...},
               "sign": "key" (default) | "none" | "hs256-with-public-key"}, ...]}
Writes {"jwks": {"<name>": <public JWK>}, "tokens": ["<compact JWS>", ...]} on stdout.

The header defaults to {"alg": <the key's algorithm>, "typ": "JWT", "kid": <the key's kid>};
fields given in the spec's header replace or add to it (a field set to null is removed). The
signature is always made with the named key's own algorithm, whatever the header claims, so
tests can build algorithm- and key-confusion attacks.
"""
import base64
import hashlib
import hmac
import json
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def uint(n, size=None):
    size = size or (n.bit_length() + 7) // 8
    return n.to_bytes(size, "big")


def make_key(spec):
    kty = spec["kty"]
    if kty == "RSA":
        key = rsa.generate_private_key(public_exponent=65537, key_size=spec.get("bits", 2048))
        pub = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": b64(uint(pub.n)), "e": b64(uint(pub.e)), "alg": "RS256"}
        alg = "RS256"
    elif kty == "EC":
        key = ec.generate_private_key(ec.SECP256R1())
        pub = key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "x": b64(uint(pub.x, 32)), "y": b64(uint(pub.y, 32))}
        alg = "ES256"
    elif kty == "OKP":
        key = ed25519.Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
        alg = "EdDSA"
    else:
        raise SystemExit(f"unknown kty {kty}")
    jwk["kid"] = spec["kid"]
    jwk["use"] = "sig"
    return {"key": key, "jwk": jwk, "alg": alg}


def sign(k, msg):
    key = k["key"]
    if k["alg"] == "RS256":
        return key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    if k["alg"] == "ES256":
        r, s = decode_dss_signature(key.sign(msg, ec.ECDSA(hashes.SHA256())))
        return uint(r, 32) + uint(s, 32)
    return key.sign(msg)


def main():
    spec = json.load(sys.stdin)
    keys = {k["name"]: make_key(k) for k in spec.get("keys", [])}
    out = []
    for t in spec.get("tokens", []):
        k = keys[t["key"]]
        header = {"alg": k["alg"], "typ": "JWT", "kid": k["jwk"]["kid"]}
        for name, value in t.get("header", {}).items():
            if value is None:
                header.pop(name, None)
            else:
                header[name] = value
        signing_input = (
            b64(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64(json.dumps(t["claims"], separators=(",", ":")).encode())
        ).encode()
        how = t.get("sign", "key")
        if how == "none":
            sig = b""
        elif how == "hs256-with-public-key":
            public_pem = k["key"].public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            sig = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
        else:
            sig = sign(k, signing_input)
        out.append(signing_input.decode() + "." + b64(sig))
    json.dump({"jwks": {n: k["jwk"] for n, k in keys.items()}, "tokens": out}, sys.stdout)


if __name__ == "__main__":
    main()
