"""Signed report links: bound to a job and to the API keys, expiring, stable within an hour."""

from __future__ import annotations

from gateway.report_links import SHARED_PATH, make_token, token_valid

KEYS = ["k1", "k2"]


def test_a_token_opens_its_job_only_and_only_with_the_same_keys():
    token = make_token(KEYS, "job-a", now=1_000_000)
    assert token_valid(KEYS, "job-a", token, now=1_000_000)
    assert token_valid(list(reversed(KEYS)), "job-a", token, now=1_000_000)  # key order does not matter
    assert not token_valid(KEYS, "job-b", token, now=1_000_000)
    assert not token_valid(["k1"], "job-a", token, now=1_000_000)  # a rotated key revokes the links
    assert not token_valid([], "job-a", token, now=1_000_000)


def test_tokens_expire_and_are_stable_within_the_hour():
    token = make_token(KEYS, "job", ttl_s=3600, now=1_000_000)
    expires = int(token.split(".")[0])
    assert expires % 3600 == 0 and 1_003_600 <= expires < 1_007_200
    assert token == make_token(KEYS, "job", ttl_s=3600, now=1_000_060)
    assert token_valid(KEYS, "job", token, now=expires)
    assert not token_valid(KEYS, "job", token, now=expires + 1)


def test_malformed_tokens_are_refused():
    for token in ("", "abc", "123", "123.", ".abc", "x.y", "99999999999.AAAA"):
        assert not token_valid(KEYS, "job", token, now=0)
    assert SHARED_PATH.match("/v1/jobs/j/shared/t/index.html")
    assert not SHARED_PATH.match("/v1/jobs/j/files/index.html")
