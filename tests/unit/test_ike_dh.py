"""IKE Diffie-Hellman against published vectors: RFC 5903 section 8 (groups 19 and 20: the
public values as x | y, the shared secret as the x-coordinate) and RFC 7748 section 6.1
(X25519, group 31); and the refusals of a bad peer value."""

from __future__ import annotations

import pytest

from nfq_ipsec.ike.dh import KeyPair, private_size, public_size
from nfq_ipsec.ike.errors import IkeError, Notify

H = bytes.fromhex

RFC5903 = {  # group: (i, g^i x|y, r, g^r x|y, g^ir x)
    19: ("c88f01f510d9ac3f70a292daa2316de544e9aab8afe84049c62a9c57862d1433",
         "dad0b65394221cf9b051e1feca5787d098dfe637fc90b9ef945d0c3772581180"
         "5271a0461cdb8252d61f1c456fa3e59ab1f45b33accf5f58389e0577b8990bb3",
         "c6ef9c5d78ae012a011164acb397ce2088685d8f06bf9be0b283ab46476bee53",
         "d12dfb5289c8d4f81208b70270398c342296970a0bccb74c736fc7554494bf63"
         "56fbf3ca366cc23e8157854c13c58d6aac23f046ada30f8353e74f33039872ab",
         "d6840f6b42f6edafd13116e0e12565202fef8e9ece7dce03812464d04b9442de"),
    20: ("099f3c7034d4a2c699884d73a375a67f7624ef7c6b3c0f160647b67414dce655e35b538041e649ee3faef896783ab194",
         "667842d7d180ac2cde6f74f37551f55755c7645c20ef73e31634fe72b4c55ee6de3ac808acb4bdb4c88732aee95f41aa"
         "9482ed1fc0eeb9cafc4984625ccfc23f65032149e0e144ada024181535a0f38eeb9fcff3c2c947dae69b4c634573a81c",
         "41cb0779b4bdb85d47846725fbec3c9430fab46cc8dc5060855cc9bda0aa2942e0308312916b8ed2960e4bd55a7448fc",
         "e558dbef53eecde3d3fccfc1aea08a89a987475d12fd950d83cfa41732bc509d0d1ac43a0336def96fda41d0774a3571"
         "dcfbec7aacf3196472169e838430367f66eebe3c6e70c416dd5f0c68759dd1fff83fa40142209dff5eaad96db9e6386c",
         "11187331c279962d93d604243fd592cb9d0a926f422e47187521287e7156c5c4d603135569b9e9d09cf5d4a270f59746"),
}


@pytest.mark.parametrize("group", sorted(RFC5903))
def test_rfc5903_vectors(group: int) -> None:
    i, gi, r, gr, gir = (H(v) for v in RFC5903[group])
    a, b = KeyPair.from_scalar(group, i), KeyPair.from_scalar(group, r)
    assert a.public == gi and b.public == gr
    assert len(gi) == public_size(group)
    assert a.shared(gr) == gir and b.shared(gi) == gir


def test_rfc7748_x25519_vector() -> None:
    a = KeyPair(31, H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    b = KeyPair(31, H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
    assert a.public == H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert b.public == H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert a.shared(b.public) == shared and b.shared(a.public) == shared


@pytest.mark.parametrize("group", [19, 20, 31])
def test_two_random_sides_agree_and_keys_stay_out_of_the_repr(group: int) -> None:
    a = KeyPair(group, bytes(range(1, private_size(group) + 1)))
    b = KeyPair(group, bytes(range(100, 100 + private_size(group))))
    assert a.shared(b.public) == b.shared(a.public)
    assert repr(a) == f"KeyPair(group={group})"


@pytest.mark.parametrize("group", [19, 20])
def test_a_point_off_the_curve_is_refused(group: int) -> None:
    me = KeyPair(group, bytes(private_size(group)))
    peer = bytearray(KeyPair(group, b"\x07" * private_size(group)).public)
    peer[-1] ^= 1
    with pytest.raises(IkeError) as err:
        me.shared(bytes(peer))
    assert err.value.notify is Notify.INVALID_SYNTAX and "not a point" in str(err.value)


@pytest.mark.parametrize(("group", "value"), [(19, bytes(63)), (20, bytes(97)), (31, bytes(31))])
def test_a_value_of_the_wrong_length_is_refused(group: int, value: bytes) -> None:
    with pytest.raises(IkeError, match="key exchange data of"):
        KeyPair(group, bytes(private_size(group))).shared(value)


def test_a_low_order_x25519_point_is_refused() -> None:
    with pytest.raises(IkeError, match="all-zero shared secret"):
        KeyPair(31, bytes(range(32))).shared(bytes(32))


def test_a_group_we_do_not_speak_is_named() -> None:
    with pytest.raises(IkeError) as err:
        KeyPair(14, bytes(32))
    assert err.value.notify is Notify.INVALID_KE_PAYLOAD and "group 14" in str(err.value)
