import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loader import ModelFileError, read_header
from loader.safetensors_file import ReadCounter, SafetensorsFile, parse_header


@pytest.fixture
def good_file(tmp_path):
    path = str(tmp_path / "good.safetensors")
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
              path, metadata={"format": "pt"})
    return path


def write_raw(path, header: bytes, data: bytes = b"", length: int | None = None):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return str(path)


def test_header_matches_safetensors_library(good_file):
    header = read_header(good_file)
    assert header.tensors["a"].shape == (2, 3) and header.tensors["a"].dtype == torch.float32
    assert header.tensors["b"].nbytes == 8
    assert header.metadata == {"format": "pt"}
    assert header.tensors["b"].end <= os.path.getsize(good_file)


def test_read_into_is_byte_exact_and_counted(good_file):
    counter = ReadCounter()
    f = SafetensorsFile(good_file, counter)
    a = f.read(f.header.tensors["a"])
    assert torch.equal(a, torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert counter.bytes_read == 24


@pytest.mark.parametrize("case, fault", [
    ("random", "header length"),
    ("too_long", "larger than the file"),
    ("not_json", "not valid JSON"),
    ("beyond_end", "beyond its end"),
    ("bad_span", "need"),
    ("bad_dtype", "unsupported dtype"),
    ("short", "too short"),
])
def test_bad_files_are_refused_with_the_fault_named(tmp_path, case, fault):
    p = tmp_path / f"{case}.safetensors"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "random":
        p.write_bytes(os.urandom(4096))
    elif case == "too_long":
        write_raw(p, b"{}", length=10**6)
    elif case == "not_json":
        write_raw(p, b"{not json}")
    elif case == "beyond_end":  # not cut short: the offsets skip past the bytes that are there
        write_raw(p, json.dumps({"t": {**entry, "data_offsets": [8, 16]}}).encode(), b"\0" * 8)
    elif case == "bad_span":
        write_raw(p, json.dumps({"t": {**entry, "shape": [3]}}).encode(), b"\0" * 8)
    elif case == "bad_dtype":
        write_raw(p, json.dumps({"t": {**entry, "dtype": "Q4"}}).encode(), b"\0" * 8)
    else:
        p.write_bytes(b"abc")
    with pytest.raises(ModelFileError, match=fault) as info:
        read_header(str(p))
    assert str(p) in str(info.value) and "Re-download" in str(info.value)


@pytest.mark.parametrize("cut_bytes", [1, 5, 27])
def test_truncated_real_file_is_refused_as_truncated(good_file, tmp_path, cut_bytes):
    with open(good_file, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-cut_bytes])
    with pytest.raises(ModelFileError, match="it is truncated: its header describes 32 bytes of tensor data") as info:
        read_header(str(cut))
    assert str(cut) in str(info.value) and f"only {32 - cut_bytes} follow" in str(info.value)
    assert "Download or copy the file again" in str(info.value)


def test_offsets_past_the_end_with_a_gap_are_corrupt_not_truncated(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [1000, 1004]}}
    path = write_raw(tmp_path / "gap.safetensors", json.dumps(header).encode(), b"\0" * 8)
    with pytest.raises(ModelFileError, match="tensor `b` ends at byte 1004 .* beyond its end .*corrupt"):
        read_header(path)


def test_a_file_changed_after_opening_is_not_read_stale(good_file):
    f = SafetensorsFile(good_file, ReadCounter())
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, good_file)
    os.utime(good_file, ns=(1, 1))
    with pytest.raises(ModelFileError, match="changed on disk"):
        f.read(f.header.tensors["a"])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=10**6))
def test_fuzzed_headers_raise_only_the_packs_error(raw, file_size):
    try:
        parse_header(raw, file_size, "fuzz.safetensors")
    except ModelFileError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.dictionaries(
    st.sampled_from(["dtype", "shape", "data_offsets"]),
    st.one_of(st.text(max_size=4), st.lists(st.integers(-5, 50), max_size=3), st.integers(), st.none())),
    max_size=4))
def test_fuzzed_json_headers_raise_only_the_packs_error(doc):
    try:
        parse_header(json.dumps(doc).encode(), 1000, "fuzz.safetensors")
    except ModelFileError:
        pass
