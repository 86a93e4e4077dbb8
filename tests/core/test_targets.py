"""Which forwarding targets are allowed: refused before they are stored, with the reason, in
every spelling of a cloud metadata address (app/core/targets.py)."""

from __future__ import annotations

import pytest

from app.core.targets import blocked_address, check_url


@pytest.mark.parametrize("address", [
    "169.254.169.254", "169.254.0.1", "fe80::1", "fe80::1%eth0", "::ffff:169.254.169.254",
    "fd00:ec2::254", "100.100.100.200", "192.0.0.192", "64:ff9b::a9fe:a9fe",
])
def test_metadata_addresses_are_blocked_in_every_spelling(address: str) -> None:
    assert blocked_address(address)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.5", "192.168.1.10", "::1", "fd00::1", "100.100.100.201",
    "64:ff9b::a00:5", "example.com",
])
def test_own_networks_are_allowed(address: str) -> None:
    assert not blocked_address(address)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "https://crm.internal/hooks/dlr?tenant=7",
    "https://bücher.example/hook", "http://[::1]:9000/", "http://10.0.0.5/a%20b",
    "http://x." + "a" * 60 + ":8080/",  # a 60-character label is a valid one
])
def test_good_urls_pass_as_given(url: str) -> None:
    assert check_url(f"  {url} ") == url


@pytest.mark.parametrize(("url", "words"), [
    ("ftp://example.com/", "http:// or https://"),
    ("http:///path", "no host"),
    ("http://a." + "b" * 64 + ".example/", "not a valid domain name"),
    ("http://a..b/", "not a valid domain name"),
    ("http://user:pw@example.com/", "user name or password"),
    ("http://token@example.com/", "user name or password"),
    ("http://example.com/a b", "percent-encode"),
    ("http://example.com/caf\u00e9", "percent-encode"),
    ("http://example.com/a\x01", "percent-encode"),
    ("http://example.com/?q=\u2028x", "percent-encode"),
    ("http://example.com/\ud83d", "not valid Unicode"),
    ("http://example.com:99999/", "malformed"),
    ("http://169.254.169.254/latest/meta-data", "link-local or cloud metadata"),
    ("http://[fd00:ec2::254]/", "link-local or cloud metadata"),
    ("http://100.100.100.200/", "link-local or cloud metadata"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local or cloud metadata"),
    ("http://example.com/" + "a" * 2048, "longer than 2048"),
])
def test_bad_urls_are_refused_with_the_reason(url: str, words: str) -> None:
    with pytest.raises(ValueError) as exc:
        check_url(url)
    assert words in str(exc.value)
