import pytest

from p2p.identity import Identity, b58decode, b58encode, peer_id_from_public_key, public_key_from_peer_id, verify_by_peer


def test_peer_id_matches_libp2p():
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    ident = Identity.generate()
    key = Ed25519PrivateKey.from_bytes(ident.seed)
    assert str(ID.from_pubkey(key.get_public_key())) == ident.peer_id
    assert ident.peer_id.startswith("12D3KooW")


def test_key_roundtrip_and_signatures(tmp_path):
    a = Identity.load_or_create(tmp_path)
    assert Identity.load_or_create(tmp_path) == a
    assert public_key_from_peer_id(a.peer_id) == a.public_key
    sig = a.sign(b"hello")
    assert verify_by_peer(a.peer_id, b"hello", sig)
    assert not verify_by_peer(a.peer_id, b"hellO", sig)
    assert not verify_by_peer(Identity.generate().peer_id, b"hello", sig)
    assert not verify_by_peer("not-a-peer-id", b"hello", sig)
    assert not verify_by_peer(a.peer_id, b"hello", sig[:-1])


def test_corrupt_key_file_is_a_clear_error(tmp_path):
    (tmp_path / "identity.key").write_bytes(b"short")
    with pytest.raises(ValueError, match="not a potluck identity key"):
        Identity.load_or_create(tmp_path)


def test_base58_roundtrip():
    for data in (b"", b"\0", b"\0\0abc", bytes(range(40))):
        assert b58decode(b58encode(data)) == data
    with pytest.raises(ValueError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA/sha256 id, not Ed25519
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"\1" * 31)
