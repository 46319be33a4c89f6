"""Decoder fixtures shared by the backend tests: the barcode clip in every form, written once."""

from __future__ import annotations

import pytest

from medgrpo.testing.video_fixtures import write_clip_sources


@pytest.fixture(scope="session")
def decoder_sources(tmp_path_factory) -> dict[str, str]:
    """:func:`~medgrpo.testing.video_fixtures.write_clip_sources`: a JPEG folder and one video per codec."""
    return write_clip_sources(tmp_path_factory.mktemp("decoder_sources"))
