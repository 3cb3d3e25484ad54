"""An image URL's fetch ends at its total deadline (policy.url_timeout), however slowly the peer sends: a
server that drips its headers or its body one byte a second used to hold a fetch for minutes, since every
single read returned within the per-read socket timeout."""
from __future__ import annotations

import time

import pytest

from ocula.errors import MediaError
from ocula.media import MediaPolicy, load_image
from slow_peers import DripServer


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_dripping_peer_is_cut_off_at_the_deadline(drip):
    policy = MediaPolicy(allow_private_urls=True, url_timeout=1.5)
    with DripServer(drip, interval=0.5) as server:
        t0 = time.monotonic()
        with pytest.raises(MediaError) as info:
            load_image(server.url(), policy)
        took = time.monotonic() - t0
    assert "URL: timed out after 1.5 s" in str(info.value)
    assert 1.4 < took < 2.5, took


def test_a_fast_enough_peer_is_not_cut_off():
    policy = MediaPolicy(allow_private_urls=True, url_timeout=5.0)
    with DripServer("body", interval=0.001) as server:
        assert load_image(server.url(), policy).size == (1, 1)
