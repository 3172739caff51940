"""The result header: a fixed binary record; anything else a worker sends is a ProtocolError."""

from __future__ import annotations

import math
import struct

import pytest

from sandboxrun import _header as header
from sandboxrun._errors import ProtocolError, ResultTooLarge, SandboxrunError
from sandboxrun._header import Header, decode, encode

from .hostile_bytes import variants

FIXED = struct.Struct(">4sBBHQdIII")


@pytest.mark.parametrize("kind", header.KINDS)
def test_round_trip_every_kind(kind):
    sent = Header(kind, "pkg.mod.Type", "text é \udcff", "Traceback\n  x", 123 << 20, 1.25)
    assert decode(encode(sent)) == sent


def test_round_trip_from_a_memoryview_slice():
    data = b"junk" + encode(Header(header.RAISED, traceback_text="tb")) + b"more"
    with memoryview(data) as view:
        assert decode(view[4:-4]).traceback_text == "tb"


def test_encode_clips_long_texts_keeping_the_traceback_end():
    long = "é" * (header.MAX_TEXT_BYTES)  # 2 bytes each: twice the cap
    got = decode(encode(Header(header.RAISED, long, long, "start" + long + "THE ERROR")))
    assert len(got.text.encode()) <= header.MAX_TEXT_BYTES and got.text.startswith("éé")
    assert got.traceback_text.endswith("THE ERROR") and "cut" in got.traceback_text
    assert len(encode(Header(header.RAISED, long, long, long))) <= header.MAX_HEADER_BYTES


def test_encode_clamps_numbers_and_refuses_unknown_kinds():
    got = decode(encode(Header(header.RETURNED, max_rss_bytes=-5, cpu_time_seconds=math.nan)))
    assert (got.max_rss_bytes, got.cpu_time_seconds) == (0, 0.0)
    huge = decode(encode(Header(header.RETURNED, max_rss_bytes=2**70, cpu_time_seconds=math.inf)))
    assert (huge.max_rss_bytes, huge.cpu_time_seconds) == (2**63 - 1, 0.0)
    with pytest.raises(ValueError):
        encode(Header("pwned"))


def _raw(magic=b"SBR1", kind=0, pad1=0, pad2=0, rss=0, cpu=0.0, texts=(b"", b"", b""), sizes=None):
    sizes = sizes or [len(t) for t in texts]
    return FIXED.pack(magic, kind, pad1, pad2, rss, cpu, *sizes) + b"".join(texts)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"\x80\x05N.", "too short"),
        (_raw(magic=b"\x80\x05}q"), "magic"),
        (_raw(kind=5), "kind"),
        (_raw(kind=255), "kind"),
        (_raw(pad1=1), "padding"),
        (_raw(pad2=7), "padding"),
        (_raw(rss=2**63), "max_rss_bytes"),
        (_raw(cpu=math.inf), "cpu_time"),
        (_raw(cpu=math.nan), "cpu_time"),
        (_raw(cpu=-1.0), "cpu_time"),
        (_raw(sizes=[header.MAX_TEXT_BYTES + 1, 0, 0]), "over"),
        (_raw(sizes=[2**32 - 1, 0, 0]), "over"),
        (_raw(texts=(b"ab", b"", b""), sizes=[3, 0, 0]), "fields say"),
        (_raw(texts=(b"ab", b"", b"")) + b"x", "fields say"),
        (_raw(texts=(b"\xff\xfe", b"", b"")), "UTF-8"),
        (_raw(texts=(b"", b"\xc3", b"")), "UTF-8"),
    ],
)
def test_decode_refuses_field_by_field(data, match):
    with pytest.raises(ProtocolError, match=match):
        decode(data)


def test_random_bytes_and_mutations_raise_only_protocol_error():
    good = encode(Header(header.RAISED, "T", "text", "tb", 5, 0.5))
    for data in variants(good, 5000, seed=99, max_random=80):
        try:
            got = decode(data)
        except ProtocolError:
            continue
        assert got.kind in header.KINDS and math.isfinite(got.cpu_time_seconds)
        assert 0 <= got.max_rss_bytes < 2**63


def test_old_pickled_headers_are_protocol_errors():
    import pickle

    for old in ({"kind": "returned"}, ["returned"], SystemExit(1)):
        with pytest.raises(ProtocolError):
            decode(pickle.dumps(old, protocol=5))


def test_frame_lengths_are_checked_before_any_allocation():
    header.check_frame_lengths(FIXED.size, 10, max_result_bytes=10)
    with pytest.raises(ResultTooLarge) as info:
        header.check_frame_lengths(FIXED.size, 2**64 - 1, max_result_bytes=256 << 20)
    error = info.value
    assert (error.size, error.limit) == (2**64 - 1, 256 << 20)
    assert "max_result_bytes=268435456" in str(error) and isinstance(error, SandboxrunError)
    for bad_header in (0, FIXED.size - 1, header.MAX_HEADER_BYTES + 1, 2**64 - 1):
        with pytest.raises(ProtocolError):
            header.check_frame_lengths(bad_header, 0, max_result_bytes=1)
    assert header.MAX_HEADER_BYTES < 1 << 20


def test_body_must_match_the_kind():
    header.check_body_for_kind(Header(header.RETURNED), 5)
    header.check_body_for_kind(Header(header.ENTER_FAILED), 0)
    with pytest.raises(ProtocolError):
        header.check_body_for_kind(Header(header.ENTER_FAILED), 1)
    with pytest.raises(ProtocolError):
        header.check_body_for_kind(Header(header.RESULT_UNPICKLABLE), 9)
    with pytest.raises(ProtocolError):
        header.check_body_for_kind(Header(header.RETURNED), 0)


def test_result_too_large_survives_pickling():
    import pickle

    again = pickle.loads(pickle.dumps(ResultTooLarge(5, 4)))
    assert (again.size, again.limit) == (5, 4) and str(again) == str(ResultTooLarge(5, 4))
